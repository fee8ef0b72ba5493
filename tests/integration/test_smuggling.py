"""SMTP smuggling through the running relay to a lab MX (RFC-CHECKLIST §8, SMUG-01..05).

`sts-relay serve` runs as a subprocess against the lab world. A raw client hides a second
message behind each known fake end-of-data sequence, and pipelines commands behind
STARTTLS; the receiving MX must get exactly the one clean message sent afterwards, never
the hidden one, never a split one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.relay_process import RelayProcess
from tests.integration.test_listener import Client
from tests.support.world import World, to_toml

StartRelay = Callable[..., Awaitable[RelayProcess]]

DOMAIN = "smuggle.test"
RCPT = f"u@{DOMAIN}"
HIDDEN = (
    b"MAIL FROM:<x@evil.test>\r\nRCPT TO:<" + RCPT.encode() + b">\r\nDATA\r\n"
    b"From: x@evil.test\r\nSubject: spoofed\r\n\r\nspoofed\r\n"
)
CLEAN = b"From: app@src.test\r\nSubject: clean\r\n\r\nclean body\r\n"


@pytest.fixture
async def start_relay(world: World, tmp_path: Path) -> AsyncIterator[StartRelay]:
    started: list[RelayProcess] = []

    async def start(**overrides: dict[str, Any]) -> RelayProcess:
        config = world.relay_config(tmp_path / "state", **overrides)
        path = tmp_path / "relay.toml"
        path.write_text(to_toml(config), encoding="utf-8")
        relay = RelayProcess(path, config["listen"]["addresses"][0])
        started.append(relay)
        await relay.start()
        return relay

    yield start
    for relay in started:
        await relay.stop()


async def _only_the_clean_message_arrives(world: World, relay: RelayProcess) -> None:
    await relay.delivery(RCPT, "sent", within=20)
    sink = world.sink(f"mx1.{DOMAIN}")
    [message] = sink.messages
    assert message.mail_from == "app@src.test"
    assert message.rcpt_tos == [RCPT]
    assert b"Subject: clean" in message.data
    assert b"spoofed" not in message.data
    assert sink.mail_commands == 1
    assert all(b"spoofed" not in m.data for m in world.messages())
    assert [e["sender"] for e in relay.find(event="received")] == ["app@src.test"]


async def _send_clean(c: Client) -> None:
    assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n"))[:3] == "250"
    assert (await c.cmd(f"RCPT TO:<{RCPT}>\r\n".encode()))[:3] == "250"
    assert (await c.cmd(b"DATA\r\n"))[:3] == "354"
    assert (await c.cmd(CLEAN + b".\r\n")).startswith("250 2.0.0")


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n"],
    ids=["LF.LF", "LF.CRLF", "CRLF.LF", "CR.CR", "CR.CRLF"],
)
async def test_hidden_message_behind_a_fake_end_of_data_never_reaches_the_mx(
    world: World, start_relay: StartRelay, fake_end: bytes
) -> None:
    await world.sts_domain(DOMAIN)
    relay = await start_relay()
    async with Client.connect(address=(relay.host, relay.port)) as c:
        await c.hello()
        assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n"))[:3] == "250"
        assert (await c.cmd(f"RCPT TO:<{RCPT}>\r\n".encode()))[:3] == "250"
        assert (await c.cmd(b"DATA\r\n"))[:3] == "354"
        stream = b"From: app@src.test\r\nSubject: first\r\n\r\nTesting" + fake_end + HIDDEN
        # SMUG-03: one reply for the whole stream, the refusal; no reply for a hidden MAIL.
        assert await c.cmd(stream + b".\r\n") == "550 5.5.2 Message contains bare CR or LF"
        assert (await c.cmd(b"HELP\r\n")).startswith("250 Supported commands")
        await _send_clean(c)
    await _only_the_clean_message_arrives(world, relay)
    [rejected] = relay.find(event="rejected")
    assert (rejected["stage"], rejected["code"]) == ("data", "550 5.5.2")


async def test_commands_pipelined_behind_starttls_are_discarded(
    world: World, start_relay: StartRelay, tmp_path: Path
) -> None:
    # SMUG-05 (RFC 3207 §4.2, aiosmtpd CVE-2024-34083).
    await world.sts_domain(DOMAIN)
    leaf = world.pki.ca.issue_cert("relay.test")
    cert, key = tmp_path / "relay-cert.pem", tmp_path / "relay-key.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    relay = await start_relay(tls={"cert_file": str(cert), "key_file": str(key)})
    async with Client.connect(address=(relay.host, relay.port)) as c:
        assert "250-STARTTLS" in await c.hello()
        c.writer.write(
            b"STARTTLS\r\nMAIL FROM:<x@evil.test>\r\nRCPT TO:<" + RCPT.encode() + b">\r\n"
        )
        assert (await c.reply())[0].startswith("220")
        async with asyncio.timeout(10):
            await c.writer.start_tls(world.pki.client_context(), server_hostname="relay.test")
        c.writer.write(b"EHLO app.example.test\r\n")
        assert "250 HELP" in await c.reply()
        # The injected MAIL never took effect: there is no transaction to add to.
        assert (await c.cmd(f"RCPT TO:<{RCPT}>\r\n".encode()))[:3] == "503"
        assert (await c.cmd(b"DATA\r\n"))[:3] == "503"
        await _send_clean(c)
    await _only_the_clean_message_arrives(world, relay)
    [received] = relay.find(event="received")
    assert received["sender"] == "app@src.test"
