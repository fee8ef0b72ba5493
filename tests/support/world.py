"""The lab world: test PKI, DNS, the policy host and MX sinks, composed for one test.

Owns wiring of lab servers into the F0 shape of RFC-CHECKLIST.md §0.1 and the relay config
that points at them (through documented config keys only). Knows the relay only through
its TOML configuration, never through its code.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tests.support.certs import TestPKI
from tests.support.dns import DnsServer
from tests.support.https import PolicyServer
from tests.support.smtp import MxSink, ReceivedMessage

BOUNCE_DOMAIN = "src.test"
BOUNCE_MX = "mx.src.test"
BOUNCE_IP = "127.0.0.20"


def policy_body(mode: str, mx: Iterable[str], max_age: int) -> str:
    """An RFC 8461 §3.2 policy text with CRLF line ends."""
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return "".join(line + "\r\n" for line in lines)


def free_port(ip: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((ip, 0))
        port: int = sock.getsockname()[1]
        return port


class World:
    """Everything a delivery test talks to. Start with `await start()`, end with `stop()`."""

    def __init__(self, tmp_dir: Path) -> None:
        self.tmp_dir = tmp_dir
        self.pki = TestPKI(tmp_dir / "pki")
        self.dns = DnsServer()
        self.policy_server = PolicyServer(self.pki)
        self.sinks: dict[str, MxSink] = {}
        self.delivery_port = 0
        self._next_ip = 30

    async def start(self) -> None:
        await self.dns.start()
        await self.policy_server.start()

    async def stop(self) -> None:
        for sink in self.sinks.values():
            await sink.stop()
        await self.policy_server.stop()
        await self.dns.stop()

    # -- MX hosts ------------------------------------------------------------------------

    async def add_mx(
        self,
        host: str,
        ip: str,
        *,
        cert_kind: str = "good",
        cert_names: Sequence[str] | None = None,
        starttls: bool = True,
        **sink_options: Any,
    ) -> MxSink:
        """Start a sink for `host` on ip:delivery_port and publish `host A ip`."""
        cert = self.pki.server_context(cert_names or [host], cert_kind) if starttls else None
        sink = MxSink(
            ip, self.delivery_port, hostname=host, starttls=starttls, cert=cert, **sink_options
        )
        await sink.start()
        if self.delivery_port == 0:
            self.delivery_port = sink.port
        self.dns.add(host, "A", ip)
        self.sinks[host.lower().rstrip(".")] = sink
        return sink

    async def remove_mx(self, host: str) -> None:
        """Stop the sink (connections to it are then refused) and keep its DNS records."""
        await self.sinks.pop(host.lower().rstrip(".")).stop()

    def sink(self, host: str) -> MxSink:
        return self.sinks[host.lower().rstrip(".")]

    @property
    def bounce_sink(self) -> MxSink:
        return self.sink(BOUNCE_MX)

    def allocate_ip(self) -> str:
        """A fresh loopback address (127.0.0.30 and up) for another sink."""
        if self._next_ip > 254:
            raise RuntimeError("out of lab loopback addresses")
        ip = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        return ip

    def messages(self) -> list[ReceivedMessage]:
        return [m for sink in self.sinks.values() for m in sink.messages]

    # -- DNS and policies ----------------------------------------------------------------

    def mx_record(self, domain: str, *entries: tuple[int, str]) -> None:
        """Replace the domain's MX records, e.g. mx_record("d.test", (10, "mx1.d.test"))."""
        self.dns.remove(domain, "MX")
        for preference, host in entries:
            target = host if host.endswith(".") else host + "."
            self.dns.add(domain, "MX", f"{preference} {target}")

    def publish_policy(
        self,
        domain: str,
        *,
        mode: str = "enforce",
        mx: Sequence[str] | None = None,
        max_age: int = 86400,
        policy_id: str = "1",
        body: str | None = None,
        cert: str = "good",
    ) -> None:
        """TXT `_mta-sts.<domain>` "v=STSv1; id=<id>", `mta-sts.<domain>` A, and the body."""
        self.dns.remove(f"_mta-sts.{domain}", "TXT")
        self.dns.txt(f"_mta-sts.{domain}", f"v=STSv1; id={policy_id}")
        self.dns.remove(f"mta-sts.{domain}", "A")
        self.dns.add(f"mta-sts.{domain}", "A", self.policy_server.ip)
        if body is None:
            body = policy_body(mode, mx if mx is not None else (f"mx1.{domain}",), max_age)
        self.policy_server.serve(domain, body, cert=cert)

    async def sts_domain(
        self,
        domain: str,
        *,
        mode: str | None = "enforce",
        cert_kind: str = "good",
        ip: str | None = None,
        **sink_options: Any,
    ) -> MxSink:
        """F0 for `domain`: MX 10 mx1.<domain> on a fresh IP, plus a policy unless mode=None."""
        host = f"mx1.{domain}"
        self.mx_record(domain, (10, host))
        sink = await self.add_mx(
            host, ip or self.allocate_ip(), cert_kind=cert_kind, **sink_options
        )
        if mode is not None:
            self.publish_policy(domain, mode=mode)
        return sink

    async def add_bounce_sink(self) -> MxSink:
        """`src.test MX 10 mx.src.test`, `mx.src.test A 127.0.0.20`: plain SMTP, no STS."""
        self.mx_record(BOUNCE_DOMAIN, (10, BOUNCE_MX))
        return await self.add_mx(BOUNCE_MX, BOUNCE_IP, starttls=False)

    # -- relay configuration -------------------------------------------------------------

    def relay_config(self, state_dir: Path, **overrides: dict[str, Any]) -> dict[str, Any]:
        """The relay's config as a nested dict; each keyword merges into that section."""
        config: dict[str, dict[str, Any]] = {
            # One process: most tests look at one process's limits and counters; the tests
            # of the multi-process relay ask for more (STS_TEST_PROCESSES runs them all so).
            "serve": {"processes": int(os.environ.get("STS_TEST_PROCESSES", "1"))},
            "listen": {"addresses": [f"127.0.0.1:{free_port()}"]},
            "state": {"path": str(state_dir)},
            "delivery": {
                "hostname": "relay.test",
                "port": self.delivery_port,
                "allow_loopback_mx": True,
            },
            "tls": {"ca_file": str(self.pki.ca_file)},
            "dns": {"nameservers": [self.dns.nameserver]},
            "policy": {"https_port": self.policy_server.port},
            "queue": {"retry_schedule": [1, 2, 4]},
            "log": {"format": "json"},
            "metrics": {"address": "127.0.0.1:0"},
        }
        for section, values in overrides.items():
            config.setdefault(section, {}).update(values)
        return dict(config)


def to_toml(config: dict[str, Any]) -> str:
    """Write a nested dict as TOML: scalars and arrays of scalars, tables for dicts."""
    out: list[str] = []
    _write_table(out, config, ())
    return "\n".join(out).lstrip("\n") + "\n"


def _write_table(out: list[str], table: dict[str, Any], path: tuple[str, ...]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if path and (scalars or not tables):
        out.append("")
        out.append("[" + ".".join(_key(p) for p in path) + "]")
    for key, value in scalars.items():
        out.append(f"{_key(key)} = {_value(value)}")
    for key, value in tables.items():
        _write_table(out, value, (*path, key))


def _key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        # JSON string escapes are a subset of TOML basic-string escapes.
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML: {value!r}")
