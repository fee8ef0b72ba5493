"""Replies and log lines of a serving relay (issue 11 item 5, issue 13 item 1), through
`sts-relay serve`.

Long DATA lines (5,000 and 200,000 characters) are accepted and reach the MX unchanged; a
command line over the limit is told "line too long" whatever ends it; `RCPT TO:<postmaster>`
(no domain, RFC 5321 §4.5.1) gets a 550 that says why; a non-ASCII sender or recipient needs
SMTPUTF8 (RFC 6531: 553 5.6.7); and U+2028, U+2029, U+0085 and DEL in logged values are
escaped, so that a reader splitting with str.splitlines() sees one line per event.
"""

from __future__ import annotations

import asyncio
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from relay.events import EventLog
from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import RelayProcess
from tests.integration.test_listener import Client
from tests.support.smtp import MxSink, _SinkSMTP
from tests.support.world import World


class _LongLineSink(MxSink):
    """A lab MX that takes lines of any length (aiosmtpd's own limit is 1001 bytes)."""

    def _protocol(self) -> _SinkSMTP:
        proto = _NoLineLimitSinkSMTP(
            self,
            hostname=self.hostname,
            tls_context=self.cert,
            require_starttls=False,
            decode_data=False,
            enable_SMTPUTF8=self.smtputf8,
            loop=asyncio.get_running_loop(),
        )
        self._protocols.append(proto)
        return proto


class _NoLineLimitSinkSMTP(_SinkSMTP):
    line_length_limit = 1 << 20


async def _long_line_domain(world: World, domain: str) -> MxSink:
    """`domain` with an enforce policy and its MX, a _LongLineSink, as World.sts_domain."""
    host = f"mx1.{domain}"
    world.mx_record(domain, (10, host))
    sink = _LongLineSink(
        world.allocate_ip(),
        world.delivery_port,
        hostname=host,
        cert=world.pki.server_context([host], "good"),
    )
    await sink.start()
    world.dns.add(host, "A", sink.ip)
    world.sinks[host] = sink
    world.publish_policy(domain, mode="enforce")
    return sink


@pytest.mark.parametrize("length", [5_000, 200_000])
async def test_long_lines_are_delivered_unchanged(
    world: World, start_relay: StartRelay, length: int
) -> None:
    sink = await _long_line_domain(world, "long.test")
    relay = await start_relay()
    html = b"<p>" + b"x" * (length - 7) + b"</p>"
    body = b"Subject: long\r\nContent-Type: text/html\r\n\r\n" + html + b"\r\n.dot\r\n"
    await relay.send(["u@long.test"], body=body)
    await relay.delivery("u@long.test", "sent", within=30)
    [message] = sink.messages
    assert message.data.endswith(b"\r\n\r\n" + html + b"\r\n.dot\r\n")
    assert len(html) == length


async def _session(relay: RelayProcess) -> Client:
    reader, writer = await asyncio.open_connection(relay.host, relay.port)
    c = Client(reader, writer)
    await c.hello()
    return c


async def test_an_over_long_command_line_is_told_so(start_relay: StartRelay) -> None:
    relay = await start_relay()
    c = await _session(relay)
    try:
        # Ending in CRLF: "line too long", and the session goes on (over aiosmtpd's reader
        # buffer, and between its command limit and that buffer).
        for size in (5_000, 1_002, 1_001, 600):
            reply = await c.cmd(b"NOOP " + b"x" * (size - 7) + b"\r\n")
            assert reply == "500 5.5.2 Line too long", (size, reply)
            assert (await c.cmd(b"NOOP\r\n"))[:3] == "250"
    finally:
        c.writer.close()


async def test_postmaster_without_a_domain_gets_a_reply_that_says_why(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay()
    c = await _session(relay)
    try:
        assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n"))[:3] == "250"
        for postmaster in (b"<postmaster>", b"<Postmaster>", b" <POSTMASTER>"):
            reply = await c.cmd(b"RCPT TO:" + postmaster + b"\r\n")
            assert reply == (
                "550 5.1.1 No local mailboxes here: this relay only forwards mail,"
                " write to postmaster@<domain>"
            )
        assert (await c.cmd(b"RCPT TO:<postmaster@d.test>\r\n"))[:3] == "250"
    finally:
        c.writer.close()
    rejected = relay.find(event="rejected")
    assert [(e["code"], e["rcpt"]) for e in rejected] == [
        ("550 5.1.1", "postmaster"),
        ("550 5.1.1", "Postmaster"),
        ("550 5.1.1", "POSTMASTER"),
    ]


async def test_non_ascii_addresses_need_smtputf8(start_relay: StartRelay) -> None:
    relay = await start_relay()
    needs = "553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter on MAIL"
    c = await _session(relay)
    try:
        assert await c.cmd("MAIL FROM:<ñandú@src.test>\r\n".encode()) == needs
        assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n"))[:3] == "250"
        assert await c.cmd("RCPT TO:<пример@d.test>\r\n".encode()) == needs
        assert (await c.cmd(b"RSET\r\n"))[:3] == "250"
        assert (await c.cmd("MAIL FROM:<ñandú@src.test> SMTPUTF8\r\n".encode()))[:3] == "250"
        assert (await c.cmd("RCPT TO:<пример@d.test>\r\n".encode()))[:3] == "250"
    finally:
        c.writer.close()
    rejected = relay.find(event="rejected")
    stages = [(e["stage"], e["code"]) for e in rejected]
    assert stages == [("mail", "553 5.6.7"), ("rcpt", "553 5.6.7")]


async def test_postmaster_from_an_untrusted_client_is_a_relay_refusal(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(listen={"trusted_networks": ["10.0.0.0/8"]})
    c = await _session(relay)
    try:
        assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n"))[:3] == "250"
        assert await c.cmd(b"RCPT TO:<postmaster>\r\n") == "554 5.7.1 Relay access denied"
    finally:
        c.writer.close()


class _RawRelay(RelayProcess):
    """A relay process whose stdout is also kept as text, exactly as written."""

    raw = ""

    async def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        async for line in self._proc.stdout:  # split at b"\n" only
            text = line.decode("utf-8")
            self.raw += text
            if text.strip():
                self.events.append(json.loads(text))
            self._changed.set()


_TRICKY = "a\u2028b\u2029c\u0085d\x7fe"


async def test_log_lines_survive_str_splitlines(
    world: World, start_relay: StartRelay, tmp_path: Path
) -> None:
    first = await start_relay()  # writes the lab's relay.toml; its config is reused
    await first.stop()
    relay = _RawRelay(tmp_path / "relay.toml", f"{first.host}:{first.port}")
    await relay.start()
    try:
        c = await _session(relay)
        try:
            assert (await c.cmd(b"MAIL FROM:<app@src.test> SMTPUTF8\r\n"))[:3] == "250"
            # A well-formed UTF-8 address, refused (a literal) and logged with its rcpt.
            rcpt = f"u{_TRICKY}@[192.0.2.1]".replace("\x7f", "")
            assert (await c.cmd(f"RCPT TO:<{rcpt}>\r\n".encode()))[:3] == "550"
        finally:
            c.writer.close()
        event = await relay.wait_for(lambda e: e["event"] == "rejected")
    finally:
        await relay.stop()
    assert event["rcpt"] == rcpt
    lines = relay.raw.splitlines()
    assert len(lines) == relay.raw.count("\n")  # no line breaks but the newlines
    assert all(isinstance(json.loads(line), dict) for line in lines)
    assert "\\u2028" in relay.raw
    assert "\u2028" not in relay.raw


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_every_line_format_escapes_line_separators(fmt: str) -> None:
    out = io.StringIO()
    log = EventLog(out, fmt=fmt, clock=lambda: datetime(2026, 3, 1, tzinfo=UTC))
    user = "x" + _TRICKY
    log.auth_failed(client="192.0.2.1", user=user, mechanism="PLAIN", reason="bad credentials")
    log.rejected(client="192.0.2.1", stage="rcpt", code="550 5.1.2", reason="r", rcpt=_TRICKY)
    text = out.getvalue()
    assert len(text.splitlines()) == 2
    assert all(ch not in text for ch in "\u2028\u2029\u0085\x7f")
    if fmt == "json":
        first, second = (json.loads(line) for line in text.splitlines())
        assert (first["user"], second["rcpt"]) == (user, _TRICKY)
    else:
        assert 'user="xa\\u2028b\\u2029c\\u0085d\\u007fe"' in text
        assert text.count("\\u007f") == 2
