"""PIPELINING on delivery (RFC 2920): one group per transaction, every reply checked in order.

The MX here is a scripted plain-SMTP server on 127.0.0.1 that advertises PIPELINING (or
not) and can hold back every reply until it has read DATA: a client that waited for each
reply before the next command would then never get one. The real client
(`relay.delivery.client.connect`/`transact`) talks to it, and the attempt's pure decision
turns the result into outcomes, as the MX walk does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from relay.delivery.attempt import conversation_failure, decide
from relay.delivery.client import Connection, ConversationResult, Dialer, connect, transact
from relay.delivery.envelope import Envelope
from relay.delivery.outcome import Bounced, Deferred, Delivered, Outcome
from relay.delivery.tls import TlsRequirement
from tests.support.scripted_mx import serving
from tests.support.waiting import eventually

MX = "mx.pipelining.test"
BODY = b"Subject: pipelined\r\n\r\nhello\r\n"
_DEFAULTS = {"DATA": b"354 go ahead\r\n", "QUIT": b"221 bye\r\n"}


@dataclass
class PipeliningMx:
    """Answers each verb with `replies[verb]` (or a default). With `hold`, replies to
    everything but EHLO are kept back until DATA has been read, then written together
    (followed by `extra`). After a 354 it reads data up to the "." line, keeps it in
    `bodies` and answers `final`."""

    pipelining: bool = True
    hold: bool = False
    replies: dict[str, bytes] = field(default_factory=dict)
    rcpt_replies: list[bytes] = field(default_factory=list)  # in order, before `replies`
    extra: bytes = b""
    final: bytes = b"250 2.0.0 queued\r\n"
    lines: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def verbs(self) -> list[str]:
        return [line.split(b" ", 1)[0].strip().decode().upper() for line in self.lines]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        writer.write(b"220 " + MX.encode() + b" ESMTP scripted\r\n")
        held: list[bytes] = []
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                self.lines.append(line)
                verb = line.split(b" ", 1)[0].strip().decode().upper()
                if verb == "EHLO":
                    keywords = b"250-PIPELINING\r\n" if self.pipelining else b""
                    writer.write(b"250-" + MX.encode() + b"\r\n" + keywords + b"250 8BITMIME\r\n")
                    continue
                reply = self.replies.get(verb, _DEFAULTS.get(verb, b"250 2.0.0 OK\r\n"))
                if verb == "RCPT" and self.rcpt_replies:
                    reply = self.rcpt_replies.pop(0)
                if self.hold and verb not in ("DATA", "QUIT"):
                    held.append(reply)
                    continue
                writer.write(b"".join(held) + reply + (self.extra if verb == "DATA" else b""))
                held = []
                await writer.drain()
                if verb == "QUIT":
                    break
                if verb == "DATA" and reply.startswith(b"354"):
                    body = b""
                    while (data_line := await reader.readline()) != b".\r\n":
                        body += data_line
                    self.bodies.append(body)
                    writer.write(self.final)
        writer.close()


@pytest.fixture
async def mx() -> AsyncIterator[tuple[PipeliningMx, Dialer]]:
    script = PipeliningMx()
    async with serving(script.serve, script.writers, command_timeout=2.0) as dialer:
        yield script, dialer


async def _send(
    conn: Connection, *rcpts: str, reused: bool = False
) -> tuple[ConversationResult, dict[str, Outcome]]:
    envelope = Envelope("app@src.test", list(rcpts), BODY)
    result = await transact(conn, envelope, command_timeout=2.0, reused=reused)
    if result.completed:
        return result, decide(envelope.recipients, result, [])
    return result, decide(envelope.recipients, None, [conversation_failure(result, enforced=False)])


async def _open(dialer: Dialer) -> Connection:
    conn = await connect("127.0.0.1", MX, TlsRequirement.OPPORTUNISTIC, dialer)
    assert isinstance(conn, Connection), conn
    return conn


async def test_the_whole_group_goes_out_before_any_reply(mx: tuple[PipeliningMx, Dialer]) -> None:
    # The MX answers nothing until it has read DATA: only a pipelining client gets on.
    script, dialer = mx
    script.hold = True
    conn = await _open(dialer)
    result, outcomes = await _send(conn, "a@pipelining.test", "b@pipelining.test")
    assert all(isinstance(o, Delivered) for o in outcomes.values()), outcomes
    assert result.error is None
    assert script.verbs()[1:] == ["MAIL", "RCPT", "RCPT", "DATA"]
    assert script.bodies == [BODY]
    # Reused: RSET leads the next group, still with no reply awaited before DATA.
    again, outcomes = await _send(conn, "a@pipelining.test", reused=True)
    assert isinstance(outcomes["a@pipelining.test"], Delivered), outcomes
    assert not again.stale
    assert script.verbs()[5:] == ["RSET", "MAIL", "RCPT", "DATA"]
    assert conn.alive
    conn.close()


async def test_without_pipelining_each_command_waits_for_its_reply(
    mx: tuple[PipeliningMx, Dialer],
) -> None:
    # The same holding MX, without PIPELINING offered: the client waits for MAIL's reply,
    # which never comes; nothing more is written and the host fails (timed out).
    script, dialer = mx
    script.pipelining, script.hold = False, True
    conn = await _open(dialer)
    result, outcomes = await _send(conn, "a@pipelining.test")
    assert isinstance(outcomes["a@pipelining.test"], Deferred), outcomes
    assert result.timed_out
    assert script.verbs()[1:] == ["MAIL"]
    assert not conn.alive


async def test_each_recipient_gets_its_own_reply(mx: tuple[PipeliningMx, Dialer]) -> None:
    script, dialer = mx
    script.hold = True
    script.rcpt_replies = [b"550 5.1.1 no such user\r\n", b"250 2.1.5 OK\r\n", b"451 4.2.0 x\r\n"]
    conn = await _open(dialer)
    rcpts = ("gone@pipelining.test", "ok@pipelining.test", "later@pipelining.test")
    result, outcomes = await _send(conn, *rcpts)
    assert isinstance(outcomes["gone@pipelining.test"], Bounced), outcomes
    assert isinstance(outcomes["ok@pipelining.test"], Delivered), outcomes
    assert isinstance(outcomes["later@pipelining.test"], Deferred), outcomes
    assert result.rcpt_replies["gone@pipelining.test"] == (550, "5.1.1 no such user")
    assert script.bodies == [BODY]
    conn.close()


async def test_all_recipients_refused_and_data_refused_sends_no_body(
    mx: tuple[PipeliningMx, Dialer],
) -> None:
    script, dialer = mx
    script.replies = {"RCPT": b"550 5.1.1 no\r\n", "DATA": b"554 5.5.1 no valid recipients\r\n"}
    conn = await _open(dialer)
    result, outcomes = await _send(conn, "a@pipelining.test")
    assert isinstance(outcomes["a@pipelining.test"], Bounced), outcomes
    assert result.violation is None
    assert result.data_reply is None
    assert script.bodies == []
    assert conn.alive  # the connection is in a known state: it may carry the next message
    conn.close()


async def test_data_accepted_with_no_recipient_is_ended_with_an_empty_message(
    mx: tuple[PipeliningMx, Dialer],
) -> None:
    # RFC 2920 §3.1: the client cannot assume DATA is refused; accepted, it sends "." alone.
    script, dialer = mx
    script.replies = {"RCPT": b"550 5.1.1 no\r\n"}
    script.final = b"554 5.5.1 no valid recipients\r\n"
    conn = await _open(dialer)
    result, outcomes = await _send(conn, "a@pipelining.test")
    assert isinstance(outcomes["a@pipelining.test"], Bounced), outcomes
    assert script.bodies == [b""]
    assert result.violation is None
    again, outcomes = await _send(conn, "a@pipelining.test", reused=True)
    assert not again.stale  # the empty message's reply was read: the sequence holds
    conn.close()


async def test_mail_refused_decides_every_recipient_and_the_replies_after_it_are_read(
    mx: tuple[PipeliningMx, Dialer],
) -> None:
    script, dialer = mx
    script.replies = {
        "MAIL": b"550 5.7.1 sender refused\r\n",
        "RCPT": b"503 5.5.1 need MAIL\r\n",
        "DATA": b"503 5.5.1 need RCPT\r\n",
    }
    conn = await _open(dialer)
    result, outcomes = await _send(conn, "a@pipelining.test", "b@pipelining.test")
    for outcome in outcomes.values():
        assert isinstance(outcome, Bounced), outcome
        assert "sender refused" in outcome.reason.text
    assert result.rcpt_replies == {}  # consequences of the refused MAIL, not about anyone
    assert result.violation is None
    assert script.bodies == []
    conn.close()


async def test_mail_deferred_closes_the_connection(mx: tuple[PipeliningMx, Dialer]) -> None:
    script, dialer = mx
    script.replies = {"MAIL": b"451 4.3.0 try later\r\n", "RCPT": b"503 5.5.1 need MAIL\r\n"}
    script.replies["DATA"] = b"503 5.5.1 need RCPT\r\n"
    conn = await _open(dialer)
    result, outcomes = await _send(conn, "a@pipelining.test")
    assert isinstance(outcomes["a@pipelining.test"], Deferred), outcomes
    assert not result.completed  # about this host: the next one may be tried
    assert not conn.alive


async def test_more_after_the_groups_last_reply_is_a_violation(
    mx: tuple[PipeliningMx, Dialer],
) -> None:
    script, dialer = mx
    script.hold, script.extra = True, b"250 2.0.0 one more\r\n"
    conn = await _open(dialer)
    result, outcomes = await _send(conn, "a@pipelining.test")
    outcome = outcomes["a@pipelining.test"]
    assert isinstance(outcome, Deferred), outcome
    assert result.violation is not None
    assert "unsolicited reply after DATA: 250 2.0.0 one more" in result.violation
    assert not result.completed
    assert script.bodies == []
    assert not conn.alive


async def test_a_pooled_connection_closed_by_the_mx_is_stale(
    mx: tuple[PipeliningMx, Dialer],
) -> None:
    script, dialer = mx
    conn = await _open(dialer)
    first, _ = await _send(conn, "a@pipelining.test")
    assert first.error is None
    for writer in script.writers:
        writer.close()
    await eventually(lambda: not conn.alive)  # the pool's view of it before the next lease
    again, outcomes = await _send(conn, "a@pipelining.test", reused=True)
    assert again.stale  # nothing of this message reached the MX: retried elsewhere freely
    assert isinstance(outcomes["a@pipelining.test"], Deferred), outcomes
    assert len(script.bodies) == 1


async def test_a_refused_mail_followed_by_garbage_bounces_no_one(
    mx: tuple[PipeliningMx, Dialer],
) -> None:
    # The 5xx to MAIL came in sequence, but what follows is no reply: nothing read from
    # this MX is trusted, so the recipient is deferred (never bounced on its word).
    script, dialer = mx
    script.replies = {"MAIL": b"550 5.7.1 sender refused\r\n", "RCPT": b"not a reply\r\n"}
    conn = await _open(dialer)
    result, outcomes = await _send(conn, "a@pipelining.test")
    assert isinstance(outcomes["a@pipelining.test"], Deferred), outcomes
    assert result.violation is not None
    assert "unreadable reply to RCPT" in result.violation
    assert not result.completed
    assert not conn.alive
