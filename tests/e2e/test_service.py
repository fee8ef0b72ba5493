"""The relay as a service: graceful SIGTERM, SIGHUP reload, TLS overrides, and the Docker
image's own command line and health check run against the lab."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import RelayProcess, run_cli
from tests.support.waiting import eventually, read_events
from tests.support.world import World, free_port, to_toml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


class GatedSink:
    """A plaintext MX whose reply to DATA waits until `release` is set."""

    def __init__(self, ip: str, port: int) -> None:
        self.ip, self.port = ip, port
        self.data_started = asyncio.Event()
        self.release = asyncio.Event()
        self.messages: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        self.data_started.set()
        await self.release.wait()
        self.messages.append(bytes(envelope.original_content or b""))
        return "250 2.0.0 OK"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def protocol() -> SMTP:
            return SMTP(self, hostname="mx.gated.test", decode_data=False, loop=loop)

        self._server = await loop.create_server(protocol, self.ip, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def gated(world: World) -> AsyncIterator[GatedSink]:
    """`gated.test MX 10 mx.gated.test`, no MTA-STS policy, a sink that holds DATA."""
    ip = world.allocate_ip()
    sink = GatedSink(ip, world.delivery_port)
    await sink.start()
    world.dns.add("mx.gated.test", "A", ip)
    world.mx_record("gated.test", (10, "mx.gated.test"))
    yield sink
    sink.release.set()
    await sink.stop()


def refuses_connections(relay: RelayProcess) -> bool:
    try:
        with socket.create_connection((relay.host, relay.port), timeout=2):
            return False
    except OSError:
        return True


async def test_sigterm_lets_a_delivery_in_flight_finish_and_exits_0(
    start_relay: StartRelay, gated: GatedSink
) -> None:
    relay = await start_relay(delivery={"shutdown_grace": 60})
    await relay.send(["u@gated.test"])
    async with asyncio.timeout(15):
        await gated.data_started.wait()

    os.kill(relay.pid, signal.SIGTERM)
    await relay.wait_for(lambda e: e["event"] == "stopping")
    await eventually(lambda: refuses_connections(relay), message="listener still accepting")
    gated.release.set()

    assert await relay.stop() == 0
    assert relay.find(event="stopping")[0]["reason"] == "SIGTERM"
    assert relay.find(event="delivery", rcpt="u@gated.test", status="sent")
    assert relay.find(event="stopped")[0]["abandoned"] == 0
    assert len(gated.messages) == 1


async def test_sigterm_past_the_deadline_exits_0_and_keeps_the_message_queued(
    start_relay: StartRelay, gated: GatedSink, world: World
) -> None:
    relay = await start_relay(delivery={"shutdown_grace": 1})
    await relay.send(["u@gated.test"])
    queue_id = (await relay.wait_for(lambda e: e["event"] == "received"))["queue_id"]
    async with asyncio.timeout(15):
        await gated.data_started.wait()

    os.kill(relay.pid, signal.SIGTERM)
    assert await relay.stop() == 0  # RelayProcess.stop waits 15 s at most, then kills
    assert relay.find(event="stopped")[0]["abandoned"] == 1
    assert relay.find(event="delivery") == []

    listed = await run_cli(relay.config_path, "queue", "list", "--json")
    assert queue_id in listed.stdout, listed.stderr

    gated.release.set()
    again = await start_relay()
    event = await again.delivery("u@gated.test", "sent", within=30)
    assert event["queue_id"] == queue_id
    assert gated.messages


async def test_sighup_reloads_tls_overrides_and_survives_a_broken_config(
    start_relay: StartRelay, world: World
) -> None:
    domain = "enforce-broken-tls.test"
    sink = await world.sts_domain(domain, cert_kind="self")
    relay = await start_relay()
    await relay.send([f"a@{domain}"])
    first = await relay.delivery(f"a@{domain}", "deferred")
    assert first["tlsrpt_result"] == "certificate-not-trusted"

    text = relay.config_path.read_text(encoding="utf-8")
    relay.config_path.write_text(text + "\n[nonsense]\nkey = 1\n", encoding="utf-8")
    os.kill(relay.pid, signal.SIGHUP)
    failed = await relay.wait_for(lambda e: e["event"] == "reload_failed")
    assert "nonsense" in failed["error"]

    config = world.relay_config(Path(relay.find(event="started")[0]["state_path"]))
    config["listen"]["addresses"] = [f"{relay.host}:{relay.port}"]
    config["tls"]["overrides"] = [f"{domain}=opportunistic"]
    relay.config_path.write_text(to_toml(config), encoding="utf-8")
    os.kill(relay.pid, signal.SIGHUP)
    reloaded = await relay.wait_for(lambda e: e["event"] == "reloaded")
    assert "tls_overrides" in reloaded["parts"]

    await relay.send([f"b@{domain}"])
    sent = await relay.delivery(f"b@{domain}", "sent")
    assert sent["verified"] is False
    override = relay.find(event="tls_override", domain=domain)
    assert override
    assert override[0]["override"] == "opportunistic"
    assert override[0]["decision"] == "opportunistic"
    assert any(f"b@{domain}" in m.rcpt_tos for m in sink.messages)


async def test_require_verified_override_defers_a_domain_without_policy_on_a_bad_certificate(
    start_relay: StartRelay, world: World
) -> None:
    bad = await world.sts_domain("no-policy-bad.test", mode=None, cert_kind="self")
    good = await world.sts_domain("no-policy-good.test", mode=None)
    overrides = [
        "no-policy-bad.test=require-verified match=mx1.no-policy-bad.test",
        "No-Policy-Good.test.=require-verified match=*.no-policy-good.test",
    ]
    relay = await start_relay(tls={"overrides": overrides})

    await relay.send(["u@no-policy-bad.test", "u@no-policy-good.test"])

    deferred = await relay.delivery("u@no-policy-bad.test", "deferred")
    assert deferred["tlsrpt_result"] == "certificate-not-trusted"
    sent = await relay.delivery("u@no-policy-good.test", "sent")
    assert sent["verified"] is True
    assert bad.messages == []
    assert len(good.messages) == 1
    decisions = {e["domain"]: e["decision"] for e in relay.find(event="tls_override")}
    assert decisions == {"no-policy-bad.test": "verified", "no-policy-good.test": "verified"}


async def test_require_verified_refuses_a_spoofed_mx_outside_its_patterns(
    start_relay: StartRelay, world: World
) -> None:
    """The override carries its own MX names: an MX record pointing elsewhere (what a DNS
    spoofer would publish, even with a valid certificate for its own name) is never used."""
    spoofed = await world.sts_domain("spoofed-mx.test", mode=None)
    relay = await start_relay(
        tls={"overrides": ["spoofed-mx.test=require-verified match=mx.genuine.test"]}
    )

    await relay.send(["u@spoofed-mx.test"])

    deferred = await relay.delivery("u@spoofed-mx.test", "deferred")
    assert deferred["tls_policy"] == "override"
    assert "not permitted by the tls.overrides entry" in deferred["reason"]
    assert spoofed.messages == []
    assert spoofed.connections == 0


async def test_require_verified_without_patterns_is_a_config_error_naming_the_key(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[tls]\noverrides = ["a.test=require-verified"]\n', encoding="utf-8")
    done = await run_cli(cfg, "config", "check")
    assert done.code == 2
    assert "tls.overrides" in done.stderr
    assert "match=" in done.stderr
    assert "Traceback" not in done.stderr


# -- the Docker image: its command line and health check, run here ----------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    out = []
    for line in lines:
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def instruction(name: str) -> list[str]:
    return [args for word, args in dockerfile_instructions() if word == name]


def test_dockerfile_shape() -> None:
    (base,) = instruction("FROM")
    assert base.startswith("python:3.")
    assert base.endswith("-slim")
    (user,) = instruction("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert instruction("VOLUME") == ['["/var/lib/sts-relay"]']
    exposed = {int(p) for line in instruction("EXPOSE") for p in line.split()}
    assert {25, 587, 465, 9025} <= exposed
    env = image_env()
    assert env["STS_RELAY_DEFAULTS"] == str(ROOT / "docker" / "defaults.toml")
    assert env["STS_RELAY_CONFIG"] == str(ROOT / "docker" / "relay.toml")
    # No STS_RELAY_<SECTION>_<KEY> in the image: it would override the operator's file.
    assert not [name for name in env if re.fullmatch(r"STS_RELAY_[A-Z]+_[A-Z_]+", name)]
    defaults = tomllib.loads(Path(env["STS_RELAY_DEFAULTS"]).read_text(encoding="utf-8"))
    assert defaults["state"]["path"] == "/var/lib/sts-relay"
    assert defaults["metrics"]["address"] == "0.0.0.0:9025"
    assert defaults["listen"]["addresses"] == ["0.0.0.0:25", "0.0.0.0:587"]
    assert tomllib.loads(Path(env["STS_RELAY_CONFIG"]).read_text(encoding="utf-8")) == {}
    assert "curl" not in " ".join(instruction("HEALTHCHECK"))


def image_env() -> dict[str, str]:
    """The image's ENV, with the files it COPYs into /etc/sts-relay/ read from docker/."""
    copied = {}
    for line in instruction("COPY"):
        *sources, target = line.split()
        if target == "/etc/sts-relay/":
            copied.update({target + Path(src).name: str(ROOT / src) for src in sources})
    env = {}
    for line in instruction("ENV"):
        for pair in line.split():
            name, _, value = pair.partition("=")
            env[name] = copied.get(value, value)
    return env


def image_command() -> list[str]:
    (cmd,) = instruction("CMD")
    argv: list[str] = json.loads(cmd)
    return argv


def healthcheck_command() -> list[str]:
    (check,) = instruction("HEALTHCHECK")
    argv: list[str] = json.loads(check[check.index("CMD ") + 4 :])
    return argv


async def test_the_image_command_serves_mail_and_its_healthcheck_passes(
    world: World, tmp_path: Path
) -> None:
    """`CMD` run as is with the image's environment and the operator's TOML file (its keys
    win over the image's defaults: listening on 0.0.0.0:25 would fail here), then
    `HEALTHCHECK` with the metrics address set in that file only."""
    await world.sts_domain("enforce-ok.test")
    config = world.relay_config(tmp_path / "state")
    config["metrics"]["address"] = f"127.0.0.1:{free_port()}"
    path = tmp_path / "image.toml"
    path.write_text(to_toml(config), encoding="utf-8")
    argv = image_command()
    assert argv == ["sts-relay", "serve"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STS_RELAY_")}
    env = {**env, **image_env(), "STS_RELAY_CONFIG": str(path)}
    proc = await asyncio.create_subprocess_exec(
        str(BIN / argv[0]),
        *argv[1:],
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    relay = RelayProcess(path, config["listen"]["addresses"][0])
    lines: list[bytes] = []
    try:
        async with asyncio.timeout(20):
            while not any(b'"listening"' in line for line in lines):
                lines.append(await proc.stdout.readline())
        metrics = next(e for e in read_events(lines) if e["event"] == "metrics_listening")
        assert metrics["address"] == config["metrics"]["address"]
        await relay.send(["u@enforce-ok.test"])

        check = healthcheck_command()
        assert check == ["sts-relay", "health"]
        health = await asyncio.create_subprocess_exec(
            str(BIN / check[0]), *check[1:], env=env, stdout=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(20):
            out, _ = await health.communicate()
        assert health.returncode == 0
        assert b"healthy" in out
        await eventually(lambda: world.sink("mx1.enforce-ok.test").messages, timeout=15)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await proc.wait() == 0


async def test_healthcheck_fails_when_nothing_answers(tmp_path: Path) -> None:
    check = healthcheck_command()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STS_RELAY_")}
    health = await asyncio.create_subprocess_exec(
        str(BIN / check[0]),
        *check[1:],
        env={**env, **image_env(), "STS_RELAY_METRICS_ADDRESS": f"127.0.0.1:{free_port()}"},
        stderr=asyncio.subprocess.DEVNULL,
    )
    async with asyncio.timeout(20):
        assert await health.wait() != 0
