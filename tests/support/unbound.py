"""A real validating resolver for the lab: unbound (Debian's package) on a loopback port.

Owns unbound's configuration and process: it forwards every query to the lab DNS server
and validates what comes back against the trust anchors of the signed test zones
(tests/support/signed_dns.py), so the relay sees exactly what it would behind a local
unbound: the AD bit on secure answers, SERVFAIL on bogus ones, nothing on insecure ones.
`.ci/run` installs unbound when it is missing; without it (and outside CI) DANE tests skip.
Knows nothing of the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.message
import pytest

from tests.support.world import free_port


def unbound_binary() -> str:
    """The unbound executable; skips the test when there is none (fails under CI)."""
    found = shutil.which("unbound") or (
        "/usr/sbin/unbound" if Path("/usr/sbin/unbound").exists() else None
    )
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("unbound is not installed (.ci/run installs it: apt-get install unbound)")
        pytest.skip("unbound is not installed (apt-get install unbound)")
    return found


def unbound_config(
    directory: Path,
    port: int,
    forward: tuple[str, int],
    trust_anchors: Sequence[str],
    max_negative_ttl: int = 0,
) -> str:
    anchors = "".join(f'    trust-anchor: "{anchor}"\n' for anchor in trust_anchors)
    host, forward_port = forward
    return (
        "server:\n"
        "    interface: 127.0.0.1\n"
        f"    port: {port}\n"
        "    do-ip6: no\n"
        "    do-daemonize: no\n"
        "    use-syslog: no\n"
        '    logfile: ""\n'
        "    verbosity: 1\n"
        "    val-log-level: 2\n"
        '    username: ""\n'
        '    chroot: ""\n'
        f'    directory: "{directory}"\n'
        f'    pidfile: "{directory}/unbound.pid"\n'
        "    access-control: 127.0.0.0/8 allow\n"
        "    do-not-query-localhost: no\n"
        '    module-config: "validator iterator"\n'
        "    harden-dnssec-stripped: yes\n"
        "    ede: yes\n"
        "    qname-minimisation: no\n"
        "    aggressive-nsec: no\n"
        "    prefetch: no\n"
        "    num-threads: 1\n"
        "    so-reuseport: no\n"
        "    infra-host-ttl: 1\n"
        f"    cache-max-negative-ttl: {max_negative_ttl}\n"
        '    local-zone: "test." nodefault\n'
        f"{anchors}"
        "remote-control:\n"
        "    control-enable: no\n"
        "forward-zone:\n"
        '    name: "."\n'
        f"    forward-addr: {host}@{forward_port}\n"
    )


class Unbound:
    """unbound on 127.0.0.1:<free port>, forwarding to `forward`, validating with anchors."""

    def __init__(
        self, directory: Path, forward: tuple[str, int], trust_anchors: Sequence[str]
    ) -> None:
        self.directory = directory
        self.forward = forward
        self.trust_anchors = list(trust_anchors)
        self.port = 0
        # Tests change records mid-run: no negative caching (benchmarks raise it).
        self.max_negative_ttl = 0
        self._proc: asyncio.subprocess.Process | None = None
        self.log = b""

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        binary = unbound_binary()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = self.directory / "unbound.conf"
        conf.write_text(
            unbound_config(
                self.directory,
                self.port,
                self.forward,
                self.trust_anchors,
                self.max_negative_ttl,
            )
        )
        self._proc = await asyncio.create_subprocess_exec(
            binary,
            "-d",
            "-c",
            str(conf),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        query = dns.message.make_query("localhost.", "A")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while loop.time() < deadline:
            if self._proc is not None and self._proc.returncode is not None:
                break
            with contextlib.suppress(dns.exception.DNSException, OSError):
                await dns.asyncquery.udp(query, "127.0.0.1", timeout=0.3, port=self.port)
                return
            await asyncio.sleep(0.05)
        await self.stop()
        raise RuntimeError(f"unbound did not start: {self.log.decode(errors='replace')[-2000:]}")

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.terminate()
        try:
            async with asyncio.timeout(5):
                _, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            _, err = await proc.communicate()
        self.log += err or b""
