"""The SMTP listener over real loopback sockets, with a fake of our own store interface.

Covers DESIGN "Listener" and RFC-CHECKLIST SMTP-16/17/19, SMUG-01..04, DSN-01, RTLS-02 (cleartext).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailqueue.model import DsnRequest, NewMessage
from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite import SqliteStore
from mailqueue.store import StoreUnavailable
from relay.config import load_config, parse_hostport
from relay.events import EVENTS, EventLog
from relay.inbound.listener import Listener, MessageStore

IO_TIMEOUT = 10.0


class FakeStore:
    """Our store interface: records puts; can be told to fail."""

    def __init__(self) -> None:
        self.puts: list[NewMessage] = []
        self.fail: Exception | None = None

    async def put(self, msg: NewMessage) -> str:
        if self.fail is not None:
            raise self.fail
        self.puts.append(msg)
        return f"Q{len(self.puts)}"


@dataclass
class Lab:
    listener: Listener
    store: FakeStore
    log: io.StringIO
    woken: list[int] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        return parse_hostport(self.listener.bound_addresses[0])

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.log.getvalue().splitlines()]
        return [e for e in lines if e["event"] == name]


@asynccontextmanager
async def running(
    store: FakeStore | None = None,
    log: io.StringIO | None = None,
    real_store: MessageStore | None = None,
    extra: dict[str, str] | None = None,
    **env: str,
) -> AsyncIterator[Lab]:
    """A listener on an ephemeral loopback port; `env` are listen.* keys, `extra` any
    other STS_RELAY_* variables."""
    environ = {
        "STS_RELAY_LISTEN_ADDRESSES": "127.0.0.1:0",
        "STS_RELAY_LISTEN_HOSTNAME": "relay.test",
        "STS_RELAY_STATE_PATH": "/nonexistent/sts-relay-test",
    }
    environ.update({f"STS_RELAY_LISTEN_{k.upper()}": v for k, v in env.items()})
    environ.update(extra or {})
    cfg = load_config(None, environ, fqdn=lambda: "relay.test")
    lab = Lab(listener=None, store=store or FakeStore(), log=log or io.StringIO())  # type: ignore[arg-type]
    lab.listener = Listener(
        cfg,
        store=real_store or lab.store,
        events=EventLog(lab.log),
        on_queued=lambda: lab.woken.append(1),
    )
    await lab.listener.start()
    try:
        yield lab
    finally:
        await lab.listener.stop()


class Client:
    """A raw SMTP client on asyncio streams, so tests control every byte sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        lab: Lab | None = None,
        *,
        source: str | None = None,
        address: tuple[str, int] | None = None,
    ) -> AsyncIterator[Client]:
        """Connect to the lab's listener, or to `address`; from `source` if given."""
        target = address or (lab.address if lab is not None else None)
        assert target is not None
        async with asyncio.timeout(IO_TIMEOUT):
            reader, writer = await asyncio.open_connection(
                *target, local_addr=(source, 0) if source else None
            )
        client = cls(reader, writer)
        try:
            yield client
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(IO_TIMEOUT):
                    await writer.wait_closed()

    async def reply(self) -> list[str]:
        lines: list[str] = []
        async with asyncio.timeout(IO_TIMEOUT):
            while True:
                raw = await self.reader.readline()
                if not raw:
                    raise ConnectionError(f"closed after {lines!r}")
                line = raw.decode().rstrip("\r\n")
                lines.append(line)
                if line[3:4] != "-":
                    return lines

    async def cmd(self, raw: bytes) -> str:
        """Send `raw` as is (CRLF included by the caller); the last line of the reply."""
        self.writer.write(raw)
        await self.writer.drain()
        return (await self.reply())[-1]

    async def hello(self) -> list[str]:
        assert (await self.reply())[0].startswith("220 ")
        self.writer.write(b"EHLO app.example.test\r\n")
        return await self.reply()

    async def send(self, sender: str, rcpts: list[str], body: bytes) -> str:
        assert (await self.cmd(f"MAIL FROM:<{sender}>\r\n".encode())).startswith("250")
        for rcpt in rcpts:
            assert (await self.cmd(f"RCPT TO:<{rcpt}>\r\n".encode())).startswith("250")
        assert (await self.cmd(b"DATA\r\n")).startswith("354")
        return await self.cmd(body + b".\r\n")

    async def closed(self) -> bool:
        """True once the server has closed the connection (read until EOF, bounded)."""
        async with asyncio.timeout(IO_TIMEOUT):
            while await self.reader.read(4096):
                pass
        return True


MESSAGE = b"From: app@src.test\r\nTo: u@d.test\r\nSubject: hello\r\n\r\nHello.\r\n"


async def test_trusted_client_is_queued_with_envelope_and_headers() -> None:
    async with running() as lab, Client.connect(lab) as c:
        ehlo = await c.hello()
        assert ehlo[0] == "250-relay.test"
        assert "250-SIZE 52428800" in ehlo
        assert "250-DSN" in ehlo  # RFC 3461
        assert not any("REQUIRETLS" in line or "AUTH" in line for line in ehlo)  # RTLS-02
        assert ehlo[-1] == "250 HELP"
        reply = await c.send("app@src.test", ["u@d.test", "v@e.test"], MESSAGE)
        assert reply == "250 2.0.0 Ok: queued as Q1"
    [msg] = lab.store.puts
    assert msg.sender == "app@src.test"
    assert msg.recipients == ("u@d.test", "v@e.test")
    assert msg.client == "127.0.0.1"
    head, _, body = msg.data.partition(b"\r\n\r\n")
    assert head.startswith(b"Received: from app.example.test ([127.0.0.1])\r\n\tby relay.test")
    assert b"From: app@src.test\r\nTo: u@d.test\r\nSubject: hello\r\n" in head
    assert b"\r\nDate: " in head
    assert b"\r\nMessage-ID: <" in head
    assert body == b"Hello.\r\n"
    assert lab.woken == [1]
    [event] = lab.events("received")
    assert event["queue_id"] == "Q1"
    assert event["sender"] == "app@src.test"
    assert event["rcpts"] == ["u@d.test", "v@e.test"]
    assert event["client"] == "127.0.0.1"
    assert event["size"] == len(msg.data)
    assert event["message_id"].endswith("@relay.test>")
    assert event["message_id"].encode() in head
    assert event["level"] == "info"
    assert event["ts"].endswith("Z")


async def test_with_the_sqlite_store(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "queue.sqlite3", schedule=RetrySchedule((60.0,)), lifetime=3600)
    await store.open()
    try:
        async with running(real_store=store) as lab, Client.connect(lab) as c:
            await c.hello()
            reply = await c.send("app@src.test", ["u@d.test", "v@d.test"], MESSAGE)
        assert reply.startswith("250 2.0.0 Ok: queued as ")
        queue_id = reply.rsplit(" ", 1)[1]
        assert lab.events("received")[0]["queue_id"] == queue_id
        record = await store.get_message(queue_id)
        assert record is not None
        assert record.sender == "app@src.test"
        assert [r.address for r in record.recipients] == ["u@d.test", "v@d.test"]
        data = await store.read_data(queue_id)
        assert data.startswith(b"Received: ")
        assert data.endswith(b"\r\n\r\nHello.\r\n")
    finally:
        await store.close()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
async def test_ipv6_listener_trusts_loopback() -> None:
    async with running(addresses="[::1]:0") as lab, Client.connect(lab) as c:
        assert lab.listener.bound_addresses[0].startswith("[::1]:")
        await c.hello()
        assert (await c.send("app@src.test", ["u@d.test"], MESSAGE)).startswith("250 2.0.0")
    assert lab.store.puts[0].client == "::1"
    assert lab.store.puts[0].data.startswith(b"Received: from app.example.test ([IPv6:::1])")


async def test_existing_headers_are_kept_and_received_goes_on_top() -> None:
    # SMTP-16: two Received fields in, three out, ours first; Date/Message-ID untouched.
    original = (
        b"Received: from a by b; Sun, 01 Mar 2026 10:00:00 +0000\r\n"
        b"Received: from c by d; Sun, 01 Mar 2026 09:00:00 +0000\r\n"
        b"Date: Sun, 01 Mar 2026 10:00:01 +0000\r\n"
        b"Message-ID: <keep@app.test>\r\n"
        b"Subject: s\r\n\r\nbody\r\n"
    )
    async with running() as lab, Client.connect(lab) as c:
        await c.hello()
        assert (await c.send("", ["u@d.test"], original)).startswith("250 2.0.0")
    [msg] = lab.store.puts
    assert msg.sender == ""  # MAIL FROM:<> is allowed (SMTP-18)
    assert msg.data.endswith(original)
    added = msg.data[: -len(original)]
    assert added.startswith(b"Received: ")
    assert added.count(b"Received:") == 1
    assert b"for <u@d.test>" in added
    assert msg.data.count(b"\r\nReceived: ") + msg.data.startswith(b"Received: ") == 3
    assert lab.events("received")[0]["message_id"] == "<keep@app.test>"


async def test_untrusted_client_is_refused_and_nothing_stored() -> None:
    async with running(trusted_networks="10.0.0.0/8") as lab, Client.connect(lab) as c:
        await c.hello()
        assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n")).startswith("250")
        assert await c.cmd(b"RCPT TO:<u@d.test>\r\n") == "554 5.7.1 Relay access denied"
        assert (await c.cmd(b"DATA\r\n")).startswith("503")
    assert lab.store.puts == []
    [event] = lab.events("rejected")
    assert event["stage"] == "rcpt"
    assert event["code"] == "554 5.7.1"
    assert event["client"] == "127.0.0.1"
    assert event["rcpt"] == "u@d.test"


@pytest.mark.parametrize("rcpt", ["u@[127.0.0.11]", "u@[IPv6:::1]"])
async def test_trusted_client_cannot_address_a_literal(rcpt: str) -> None:
    # A literal has no MX and no MTA-STS policy (RFC 8461 §3.4): refused, never queued.
    async with running() as lab, Client.connect(lab) as c:
        await c.hello()
        assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n"))[:3] == "250"
        reply = await c.cmd(f"RCPT TO:<{rcpt}>\r\n".encode())
        assert reply.startswith("550 5.1.2"), reply
        assert (await c.cmd(b"RCPT TO:<u@d.test>\r\n"))[:3] == "250"
    assert lab.store.puts == []
    [event] = lab.events("rejected")
    assert event["rcpt"] == rcpt


RELAY_TRICKS = [
    "u@d.test",
    "U@D.TEST",
    "u%d.test@relay.test",  # percent hack
    "u%d.test@[127.0.0.1]",
    "@relay.test:u@d.test",  # source routes
    "@relay.test,@b.test:u@d.test",
    "u@d.test@relay.test",  # user@domain@other
    '"u@d.test"@relay.test',  # quoted local parts
    '"u%d.test"@relay.test',
    '"u@d.test"',
    "u!d.test@relay.test",  # bang paths
    "d.test!u@relay.test",
    "u@[127.0.0.1]",  # address literals
    "u@[IPv6:::1]",
    "u@[10.1.2.3]",
    "u@relay.test",  # the relay's own name, in other spellings
    "U@Relay.Test",
    "u@relay.test.",  # trailing dots
    "u@d.test.",
    "u@localhost",
    "postmaster",
    "u@d.test ",
]


@pytest.mark.parametrize("helo", [b"EHLO", b"HELO"])
async def test_untrusted_client_cannot_relay_with_any_address_trick(helo: bytes) -> None:
    # Issue 5 item 5: from an untrusted address, without AUTH, nothing is accepted.
    untrusted = running(trusted_networks="10.0.0.0/8", max_errors="1000")
    async with untrusted as lab, Client.connect(lab) as c:
        assert (await c.reply())[0].startswith("220")
        assert (await c.cmd(helo + b" app.example.test\r\n"))[:3] == "250"
        for sender in ("app@src.test", "u@relay.test", ""):
            assert (await c.cmd(f"MAIL FROM:<{sender}>\r\n".encode()))[:3] == "250"
            for rcpt in RELAY_TRICKS:
                for line in (f"RCPT TO:<{rcpt}>\r\n", f"RCPT TO:{rcpt}\r\n"):
                    reply = await c.cmd(line.encode())
                    assert reply[:1] == "5", (rcpt, reply)
            assert (await c.cmd(b"DATA\r\n"))[:3] == "503"
            assert (await c.cmd(b"RSET\r\n"))[:3] == "250"
    assert lab.store.puts == []
    assert lab.woken == []
    # Every well-formed one got the relay refusal; malformed ones a syntax error.
    codes = {e["code"] for e in lab.events("rejected") if e["stage"] == "rcpt"}
    assert codes <= {"554 5.7.1", "501 5.1.3", "501 5.5.2"}
    assert "554 5.7.1" in codes


@pytest.mark.parametrize(
    "body",
    [
        b"Subject: x\r\n\r\nline1\nline2\r\n",  # SMUG-01 bare LF
        b"Subject: x\r\n\r\nline1\rline2\r\n",  # SMUG-02 bare CR
        b"Subject: x\n\r\nbody\r\n",
    ],
)
async def test_bare_cr_or_lf_in_data_is_refused(body: bytes) -> None:
    async with running() as lab, Client.connect(lab) as c:
        await c.hello()
        assert await c.send("app@src.test", ["u@d.test"], body) == (
            "550 5.5.2 Message contains bare CR or LF"
        )
        # The session goes on: a clean message afterwards is accepted.
        assert (await c.send("app@src.test", ["u@d.test"], MESSAGE)).startswith("250 2.0.0")
    assert len(lab.store.puts) == 1
    assert b"line1" not in lab.store.puts[0].data
    assert lab.events("rejected")[0]["stage"] == "data"


async def test_smuggled_second_message_is_never_queued() -> None:
    # SMUG-03: only CRLF.CRLF ends DATA; the whole stream is one refused message.
    stream = (
        b"Subject: x\r\n\r\nTesting\n.\r\nMAIL FROM:<x@evil.test>\r\nRCPT TO:<u@d.test>\r\n"
        b"DATA\r\nspoofed\r\n"
    )
    async with running() as lab, Client.connect(lab) as c:
        await c.hello()
        assert (await c.send("app@src.test", ["u@d.test"], stream)).startswith("550 5.5.2")
        assert (await c.cmd(b"NOOP\r\n")).startswith("250")
    assert lab.store.puts == []


async def test_bare_lf_command_is_not_executed() -> None:
    # SMUG-04: only CRLF ends a command line.
    async with running() as lab, Client.connect(lab) as c:
        assert (await c.reply())[0].startswith("220")
        assert (
            await c.cmd(b"EHLO x\n") == "500 5.5.2 Syntax error: command lines must end with CRLF"
        )
        assert (await c.cmd(b"MAIL FROM:<a@src.test>\r\n")).startswith("503")


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"RCPT TO:<a@d.test\rRSET>\r\n", "501 5.1.3"),  # SMTP-19
        (b"RCPT TO:<a@d.test\x00>\r\n", "501 5.1.3"),
        (b"RCPT TO:<a b@d.test>\r\n", "501 5.1.3"),
        (b"RCPT TO:<>\r\n", "501 5.1.3"),
        (b"RCPT TO:<postmaster>\r\n", "550 5.1.1"),  # RFC 5321 §4.5.1: no local mailbox
        (b"RCPT TO:<a@d.test.>\r\n", "501 5.1.3"),
        (b"RCPT TO:<a@[300.1.1.1]>\r\n", "501 5.1.3"),
        (b"RCPT TO:<a@>\r\n", "501 5.1.3"),
        (b"RCPT TO:<u@d.test> NOTIFY=NEVER\r\n", "250"),  # DSN-01: DSN advertised
        (b"RCPT TO:<u@d.test> ORCPT=rfc822;u@d.test\r\n", "250"),
        (b"RCPT TO:<u@d.test> NOTIFY=NEVER,SUCCESS\r\n", "501 5.5.4"),  # DSN-02
        (b"RCPT TO:<u@d.test> NOTIFY=SOMETIMES\r\n", "501 5.5.4"),
        (b"RCPT TO:<u@d.test> NOTIFY=\r\n", "501 5.5.4"),
        (b"RCPT TO:<u@d.test> NOTIFY=DELAY NOTIFY=FAILURE\r\n", "501 5.5.4"),
        (b"RCPT TO:<u@d.test> ORCPT=u@d.test\r\n", "501 5.5.4"),
        (b"RCPT TO:<u@d.test> ORCPT=rfc822;a+0D+0Ab@d.test\r\n", "501 5.5.4"),
        (b"RCPT TO:<u@d.test> ORCPT=rfc822;a+zz@d.test\r\n", "501 5.5.4"),
        (b"RCPT TO:<u@d.test> XFOO=1\r\n", "555 5.5.4"),
        (b"RCPT TO:<u@[IPv6:::1]>\r\n", "550 5.1.2"),  # well-formed, but a literal
        (b'RCPT TO:<"x y"@d.test>\r\n', "250"),
        (b"RCPT TO:<@relay.test:u@d.test>\r\n", "250"),
    ],
)
async def test_recipient_syntax(line: bytes, reply: str) -> None:
    async with running() as lab, Client.connect(lab) as c:
        await c.hello()
        assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n")).startswith("250")
        assert (await c.cmd(line)).startswith(reply + " ")
    assert lab.store.puts == []


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL FROM:<app@src.test> REQUIRETLS\r\n", "530 5.7.10"),  # RTLS-02: cleartext
        (b"MAIL FROM:<app@src.test> RET=HDRS\r\n", "250"),  # DSN-01
        (b"MAIL FROM:<app@src.test> ENVID=abc\r\n", "250"),
        (b"MAIL FROM:<app@src.test> RET=ALL\r\n", "501 5.5.4"),
        (b"MAIL FROM:<app@src.test> RET=FULL RET=HDRS\r\n", "501 5.5.4"),
        (b"MAIL FROM:<app@src.test> ENVID=a+0D+0Ab\r\n", "501 5.5.4"),
        (b"MAIL FROM:<app@src.test> ENVID=" + b"x" * 101 + b"\r\n", "501 5.5.4"),
        (b"MAIL FROM:<app@src.test> XFOO\r\n", "555 5.5.4"),
        (b"MAIL FROM:<app@src.test> SIZE=52428801\r\n", "552 5.3.4"),
        (b"MAIL FROM:<a\rb@src.test>\r\n", "501 5.1.3"),
        (b"MAIL FROM:<app@src test>\r\n", "501 5.1.3"),
        (b"MAIL FROM:<> SIZE=10\r\n", "250"),
        (b"MAIL FROM:<app@src.test> BODY=8BITMIME SMTPUTF8\r\n", "250"),
        (b"MAIL FROM:<\xc3\xa9@src.test> SMTPUTF8\r\n", "250"),
    ],
)
async def test_sender_syntax_and_parameters(line: bytes, reply: str) -> None:
    async with running() as lab, Client.connect(lab) as c:
        await c.hello()
        assert (await c.cmd(line)).startswith(reply + " ")


async def test_message_over_size_limit_is_refused() -> None:
    async with running(max_message_size="1000") as lab, Client.connect(lab) as c:
        ehlo = await c.hello()
        assert "250-SIZE 1000" in ehlo
        big = b"Subject: big\r\n\r\n" + b"x" * 78 + b"\r\n"
        reply = await c.send("app@src.test", ["u@d.test"], big * 20)
        assert reply.startswith("552 5.3.4 ")
    assert lab.store.puts == []
    assert lab.events("rejected")[0]["code"] == "552 5.3.4"


async def test_too_many_recipients() -> None:
    async with running(max_recipients="2") as lab, Client.connect(lab) as c:
        await c.hello()
        assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n")).startswith("250")
        assert (await c.cmd(b"RCPT TO:<a@d.test>\r\n")).startswith("250")
        assert (await c.cmd(b"RCPT TO:<b@d.test>\r\n")).startswith("250")
        assert await c.cmd(b"RCPT TO:<c@d.test>\r\n") == "452 4.5.3 Too many recipients"
        assert (await c.cmd(b"DATA\r\n")).startswith("354")
        assert (await c.cmd(MESSAGE + b".\r\n")).startswith("250 2.0.0")
    assert lab.store.puts[0].recipients == ("a@d.test", "b@d.test")


async def test_mail_loop_is_refused() -> None:
    # SMTP-17: more than 100 Received fields.
    loop = b"Received: from x by y; Sun, 01 Mar 2026 10:00:00 +0000\r\n" * 101 + MESSAGE
    async with running() as lab, Client.connect(lab) as c:
        await c.hello()
        reply = await c.send("app@src.test", ["u@d.test"], loop)
        assert reply == "554 5.4.6 Too many Received headers (mail loop?)"
        ok = b"Received: from x by y; Sun, 01 Mar 2026 10:00:00 +0000\r\n" * 100 + MESSAGE
        assert (await c.send("app@src.test", ["u@d.test"], ok)).startswith("250 2.0.0")
    assert len(lab.store.puts) == 1


@pytest.mark.parametrize(
    "failure", [StoreUnavailable("disk full"), RuntimeError("secret internal detail")]
)
async def test_store_failure_is_a_temporary_error(failure: Exception) -> None:
    store = FakeStore()
    store.fail = failure
    async with running(store) as lab, Client.connect(lab) as c:
        await c.hello()
        reply = await c.send("app@src.test", ["u@d.test"], MESSAGE)
        assert reply == "451 4.3.0 Temporary storage failure, try again later"
        # The transaction is over; a retry in the same session works once the store does.
        store.fail = None
        assert (await c.send("app@src.test", ["u@d.test"], MESSAGE)).startswith("250 2.0.0")
    assert len(store.puts) == 1
    [event] = lab.events("store_error")
    assert event["level"] == "error"
    assert lab.events("received")[0]["queue_id"] == "Q1"
    assert lab.woken == [1]


class _FailingRejectLog(io.StringIO):
    """A log whose `rejected` lines cannot be written: an internal error in the session."""

    def write(self, s: str) -> int:
        if '"event":"rejected"' in s:
            raise OSError("log device gone: internal detail")
        return super().write(s)


async def test_internal_error_answers_451_without_details() -> None:
    log = _FailingRejectLog()
    async with running(log=log, trusted_networks="10.0.0.0/8") as lab, Client.connect(lab) as c:
        await c.hello()
        assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n")).startswith("250")
        reply = await c.cmd(b"RCPT TO:<u@d.test>\r\n")
        assert reply == "451 4.3.0 Internal error, try again later"
        # The transaction was voided: a new MAIL is not "nested".
        assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n")).startswith("250")
    assert lab.store.puts == []
    [event] = lab.events("session_error")
    assert "log device gone" in event["error"]


async def test_session_limit() -> None:
    async with (
        running(max_sessions="1") as lab,
        Client.connect(lab) as first,
        Client.connect(lab) as second,
    ):
        assert (await second.reply()) == ["421 4.7.0 Too many connections, try again later"]
        assert await second.closed()
        await first.hello()  # the first session is unaffected
    assert lab.events("rejected")[0]["stage"] == "connect"


async def test_session_slot_is_freed_when_a_client_leaves() -> None:
    async with running(max_sessions="1") as lab:
        async with Client.connect(lab) as first:
            await first.hello()
            assert (await first.cmd(b"QUIT\r\n")).startswith("221")
            assert await first.closed()
        # connection_lost runs soon after the close; poll with a deadline.
        async with asyncio.timeout(IO_TIMEOUT):
            while True:
                async with Client.connect(lab) as again:
                    if (await again.reply())[0].startswith("220"):
                        break
                await asyncio.sleep(0.01)


async def test_idle_client_is_disconnected_after_command_timeout() -> None:
    async with running(command_timeout="0.2") as lab, Client.connect(lab) as c:
        await c.hello()
        assert (await c.reply()) == ["421 4.4.2 Timeout, closing connection"]
        assert await c.closed()
    [event] = lab.events("rejected")
    assert (event["stage"], event["code"]) == ("command", "421 4.4.2")


async def test_each_command_restarts_the_command_timeout() -> None:
    # The session keeps one timer armed and moves its deadline (RelaySMTP._reset_timeout):
    # a client that keeps talking is never cut off, one that stops is, after the timeout.
    async with running(command_timeout="1.0") as lab, Client.connect(lab) as c:
        await c.hello()
        for _ in range(5):  # 1.5 s in all: past the first deadline, never idle for 1 s
            await asyncio.sleep(0.3)
            assert (await c.cmd(b"NOOP\r\n")).startswith("250")
        assert (await c.reply()) == ["421 4.4.2 Timeout, closing connection"]
        assert await c.closed()
    [event] = lab.events("rejected")
    assert (event["stage"], event["code"]) == ("command", "421 4.4.2")


async def test_stalled_data_is_disconnected_after_data_timeout() -> None:
    async with (
        running(command_timeout="30", data_timeout="0.2") as lab,
        Client.connect(lab) as c,
    ):
        await c.hello()
        assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n")).startswith("250")
        assert (await c.cmd(b"RCPT TO:<u@d.test>\r\n")).startswith("250")
        assert (await c.cmd(b"DATA\r\n")).startswith("354")
        c.writer.write(b"Subject: slow\r\n")
        assert (await c.reply()) == ["421 4.4.2 Timeout, closing connection"]
        assert await c.closed()
    assert lab.store.puts == []
    assert lab.events("rejected")[0]["stage"] == "data"


async def test_stop_closes_sessions_and_the_port() -> None:
    async with running() as lab, Client.connect(lab) as c:
        await c.hello()
        address = lab.address
        await lab.listener.stop()
        assert (await c.reply()) == ["421 4.3.2 Service shutting down, try again later"]
        assert await c.closed()
        with pytest.raises(OSError, match=r"."):
            await asyncio.open_connection(*address)


async def test_dsn_parameters_are_kept_with_the_message() -> None:
    # DSN-01, DSN-07, DSN-08: RET/ENVID on MAIL, NOTIFY/ORCPT per recipient, xtext decoded.
    async with running() as lab, Client.connect(lab) as c:
        await c.hello()
        assert (await c.cmd(b"MAIL FROM:<app@src.test> RET=hdrs ENVID=AbC+2Bdef\r\n"))[:3] == "250"
        rcpts = [
            b"RCPT TO:<u@d.test> NOTIFY=success,FAILURE ORCPT=rfc822;Orig+2Bx@d.test\r\n",
            b"RCPT TO:<v@d.test> NOTIFY=NEVER\r\n",
            b"RCPT TO:<w@d.test>\r\n",
        ]
        for line in rcpts:
            assert (await c.cmd(line))[:3] == "250"
        assert (await c.cmd(b"DATA\r\n"))[:3] == "354"
        assert (await c.cmd(MESSAGE + b".\r\n")).startswith("250 2.0.0")
        # The next transaction starts without them.
        assert (await c.send("app@src.test", ["x@d.test"], MESSAGE)).startswith("250 2.0.0")
    first, second = lab.store.puts
    assert first.recipients == ("u@d.test", "v@d.test", "w@d.test")
    assert first.dsn == DsnRequest(
        ret="HDRS",
        envid="AbC+def",
        notify={"u@d.test": ("SUCCESS", "FAILURE"), "v@d.test": ("NEVER",)},
        orcpt={"u@d.test": "rfc822;Orig+x@d.test"},
    )
    assert second.dsn == DsnRequest()


async def test_dsn_of_a_refused_recipient_is_not_kept() -> None:
    async with running(max_recipients="1") as lab, Client.connect(lab) as c:
        await c.hello()
        assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n"))[:3] == "250"
        assert (await c.cmd(b"RCPT TO:<a@d.test> NOTIFY=DELAY\r\n"))[:3] == "250"
        assert (await c.cmd(b"RCPT TO:<b@d.test> NOTIFY=NEVER\r\n"))[:3] == "452"
        assert (await c.cmd(b"DATA\r\n"))[:3] == "354"
        assert (await c.cmd(MESSAGE + b".\r\n")).startswith("250 2.0.0")
    assert lab.store.puts[0].dsn.notify == {"a@d.test": ("DELAY",)}


async def test_dsn_parameters_need_ehlo() -> None:
    async with running() as lab, Client.connect(lab) as c:
        assert (await c.reply())[0].startswith("220")
        assert (await c.cmd(b"HELO app.test\r\n"))[:3] == "250"
        assert (await c.cmd(b"MAIL FROM:<app@src.test> RET=FULL\r\n"))[:3] == "501"
        assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n"))[:3] == "250"
        assert (await c.cmd(b"RCPT TO:<u@d.test> NOTIFY=NEVER\r\n"))[:3] == "501"
    assert lab.store.puts == []


async def test_sessions_per_client_address() -> None:
    async with (
        running(max_sessions_per_client="2") as lab,
        Client.connect(lab) as first,
        Client.connect(lab) as second,
        Client.connect(lab) as third,
    ):
        assert (await third.reply()) == [
            "421 4.7.0 Too many connections from your address, try again later"
        ]
        assert await third.closed()
        await first.hello()
        await second.hello()
        # Another client address is not affected by this one's sessions.
        async with Client.connect(lab, source="127.0.0.2") as other:
            await other.hello()
    event = lab.events("rejected")[0]
    assert (event["stage"], event["code"], event["client"]) == ("connect", "421 4.7.0", "127.0.0.1")


async def test_too_many_errors_drop_the_session() -> None:
    async with running(max_errors="3", max_recipients="1") as lab, Client.connect(lab) as c:
        await c.hello()
        assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n"))[:3] == "250"
        assert (await c.cmd(b"RCPT TO:<a@d.test>\r\n"))[:3] == "250"
        for _ in range(3):  # 452 for the recipient limit is flow control, not an error
            assert (await c.cmd(b"RCPT TO:<b@d.test>\r\n"))[:3] == "452"
        assert (await c.cmd(b"BOGUS\r\n"))[:3] == "500"
        assert (await c.cmd(b"RCPT TO:<bad address>\r\n"))[:3] == "501"
        c.writer.write(b"VRFY\r\n")
        assert (await c.reply())[0][:3] == "501"
        assert (await c.reply()) == ["421 4.7.0 Too many errors, closing connection"]
        assert await c.closed()
    assert lab.store.puts == []
    assert lab.events("rejected")[-1]["stage"] == "session"


async def test_error_count_starts_again_after_an_accepted_message() -> None:
    async with running(max_errors="2") as lab, Client.connect(lab) as c:
        await c.hello()
        for _ in range(3):
            assert (await c.cmd(b"BOGUS\r\n"))[:3] == "500"
            assert (await c.send("app@src.test", ["u@d.test"], MESSAGE)).startswith("250 2.0.0")
    assert len(lab.store.puts) == 3


async def test_received_names_esmtp_without_tls() -> None:
    async with running() as lab, Client.connect(lab) as c:
        await c.hello()
        assert (await c.send("app@src.test", ["u@d.test"], MESSAGE)).startswith("250 2.0.0")
    head = lab.store.puts[0].data.split(b"\r\n\r\n")[0]
    assert b" with ESMTP id " in head
    assert b"(using " not in head


def test_every_event_has_a_method_with_exactly_its_fields() -> None:
    for name, fields in EVENTS.items():
        method = getattr(EventLog, name)
        params = inspect.signature(method).parameters.values()
        keyword_only = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert tuple(keyword_only) == fields, name


def test_text_format_quotes_values_with_spaces() -> None:
    out = io.StringIO()
    log = EventLog(out, fmt="text", clock=lambda: datetime(2026, 3, 1, 12, 0, 0, 123456, UTC))
    log.rejected(client="127.0.0.1", stage="rcpt", code="554 5.7.1", reason="relay denied")
    assert out.getvalue() == (
        "2026-03-01T12:00:00.123Z info rejected client=127.0.0.1 stage=rcpt"
        ' code="554 5.7.1" reason="relay denied" sender=- rcpt=-\n'
    )


def test_json_lines_and_level_filter() -> None:
    out = io.StringIO()
    log = EventLog(out, level="warning", clock=lambda: datetime(2026, 3, 1, tzinfo=UTC))
    log.rejected(client="c", stage="rcpt", code="554 5.7.1", reason="r")  # info: filtered
    log.store_error(error="disk full")
    assert out.getvalue() == (
        '{"ts":"2026-03-01T00:00:00.000Z","level":"error","event":"store_error",'
        '"error":"disk full"}\n'
    )
