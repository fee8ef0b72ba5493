"""The recorder trusts only the protocol (issue 10): misbehaving MX servers over real sockets.

Each MX here is a scripted plain-SMTP server (asyncio.start_server on 127.0.0.1, no
STARTTLS) that breaks the one-reply-per-command sequence in one way: 250 to DATA, an extra
reply after RCPT (in the same segment, or a moment later), DATA's 354 sent before DATA
came, 354 to the final dot, a reply before the dot, more after the final reply. The real
client (`relay.delivery.client.connect`/`transact`) talks to it, and the attempt's pure
decision (`decide`, `conversation_failure`) turns the result into outcomes, as the MX
walk does. A violation must never become Delivered or Bounced before the MX's 2xx to the
final dot was read in sequence; a well-behaved MX still gets its mail.
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

MX = "mx.protocol.test"
BODY = b"Subject: protocol\r\n\r\nhello\r\n.dot line\r\n"
PAUSE = 0.05  # "a moment later": long after the client has read the reply and gone on
_DEFAULTS = {
    "EHLO": b"250-" + MX.encode() + b"\r\n250 8BITMIME\r\n",
    "DATA": b"354 go ahead\r\n",
    "QUIT": b"221 bye\r\n",
}


@dataclass
class ScriptedMx:
    """A plain-SMTP MX answering each verb with `replies[verb]` (written at once, so that
    several lines travel together) or a default, then `later[verb]` after a pause. After a
    354 to DATA it reads the data (sending `early` once the first byte is in, then waiting,
    so that the client is still writing), keeps it, answers `final`, and after a pause
    sends `notice`.

    `lines` holds every line read in command mode, `bodies` every data section received.
    """

    replies: dict[str, bytes] = field(default_factory=dict)
    later: dict[str, bytes] = field(default_factory=dict)
    final: bytes = b"250 2.0.0 queued as P1\r\n"
    early: bytes | None = None
    notice: bytes = b""  # sent a pause after the final reply, to an idle connection
    lines: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def verbs(self) -> list[str]:
        return [_verb(line) for line in self.lines]

    def after(self, verb: str) -> list[bytes]:
        """The command-mode lines read after the first `verb` (a body sent to an MX that
        never said 354 would show here)."""
        verbs = self.verbs()
        return self.lines[verbs.index(verb) + 1 :] if verb in verbs else []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.append(writer)
        writer.write(b"220 " + MX.encode() + b" ESMTP scripted\r\n")
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                self.lines.append(line)
                verb = _verb(line)
                reply = self.replies.get(verb, _DEFAULTS.get(verb, b"250 2.0.0 OK\r\n"))
                writer.write(reply)
                await writer.drain()
                if verb in self.later:
                    await asyncio.sleep(PAUSE)
                    writer.write(self.later[verb])
                    await writer.drain()
                if verb == "QUIT":
                    break
                if verb == "DATA" and reply.startswith(b"354"):
                    await self._data(reader, writer)
        writer.close()

    async def _data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = b""
        if self.early is not None:
            first = await reader.readexactly(1)
            writer.write(self.early)
            await writer.drain()
            await asyncio.sleep(0.2)  # the client stays blocked on a full socket meanwhile
        self.bodies.append(first + await reader.readuntil(b"\r\n.\r\n"))
        writer.write(self.final)
        await writer.drain()
        if self.notice:
            await asyncio.sleep(PAUSE)
            writer.write(self.notice)
            await writer.drain()


def _verb(line: bytes) -> str:
    words = line.split(maxsplit=1)
    return words[0].decode("ascii", "replace").upper() if words else ""


@pytest.fixture
async def mx() -> AsyncIterator[tuple[ScriptedMx, Dialer]]:
    """A ScriptedMx on an ephemeral loopback port and a Dialer pointing at it."""
    script = ScriptedMx()
    async with serving(script.serve, script.writers, tasks=script.tasks, limit=1 << 26) as dialer:
        yield script, dialer


async def _open(dialer: Dialer) -> Connection:
    conn = await connect("127.0.0.1", MX, TlsRequirement.OPPORTUNISTIC, dialer)
    assert isinstance(conn, Connection), conn
    return conn


async def _send(
    conn: Connection, *, data: bytes = BODY, rcpts: tuple[str, ...] = ("a@protocol.test",)
) -> tuple[ConversationResult, dict[str, Outcome]]:
    """One transaction over `conn` and its outcomes, decided as the MX walk decides."""
    envelope = Envelope("app@src.test", list(rcpts), data)
    result = await transact(conn, envelope, command_timeout=5.0, reused=conn.transactions > 0)
    if result.completed:
        return result, decide(envelope.recipients, result, [])
    failure = conversation_failure(result, enforced=False)
    return result, decide(envelope.recipients, None, [failure])


async def _deliver(
    dialer: Dialer, *, data: bytes = BODY, rcpts: tuple[str, ...] = ("a@protocol.test",)
) -> tuple[ConversationResult, dict[str, Outcome], Connection]:
    """A new connection and one transaction over it (the connection is returned open or
    not, as the client left it)."""
    conn = await _open(dialer)
    result, outcomes = await _send(conn, data=data, rcpts=rcpts)
    return result, outcomes, conn


def _violation_deferred(outcome: Outcome, result: ConversationResult, *said: str) -> None:
    """Deferred 4.5.0 because of the violation, whose text names what the MX did."""
    assert isinstance(outcome, Deferred), outcome
    assert outcome.reason.status == "4.5.0"
    assert result.violation is not None
    assert result.violation.startswith("protocol violation: ")
    assert result.violation in outcome.reason.text
    assert f"{MX}[127.0.0.1]" in outcome.reason.text
    for words in said:
        assert words in result.violation, result.violation
    assert "\r" not in outcome.reason.text
    assert "\n" not in outcome.reason.text


def _closed_for_good(result: ConversationResult, conn: Connection) -> None:
    """Closed, and refused by the pool (attempt._give_back keeps only error-free, live
    connections)."""
    assert not conn.alive
    assert result.error is not None


# --- (4) and (5a): a well-behaved MX ------------------------------------------------------


async def test_normal_mx_still_delivers_and_the_connection_is_reused(
    mx: tuple[ScriptedMx, Dialer],
) -> None:
    script, dialer = mx
    result, outcomes, conn = await _deliver(dialer)
    (outcome,) = outcomes.values()
    assert isinstance(outcome, Delivered), outcome
    assert outcome.reason.reply == "250 2.0.0 queued as P1"
    assert result.violation is None
    assert result.error is None
    assert script.bodies == [BODY.replace(b"\r\n.dot", b"\r\n..dot") + b".\r\n"]
    # Kept listening between transactions does not disturb the next one.
    assert conn.alive
    again, outcomes = await _send(conn)
    assert isinstance(outcomes["a@protocol.test"], Delivered), outcomes
    assert not again.stale
    assert again.violation is None
    assert script.verbs().count("RSET") == 1
    assert len(script.bodies) == 2
    conn.close()


async def test_354_then_250_after_the_dot_is_delivered(mx: tuple[ScriptedMx, Dialer]) -> None:
    script, dialer = mx
    script.final = b"250 2.0.0 Ok: queued as 4Xyz\r\n"
    result, outcomes, conn = await _deliver(dialer, rcpts=("a@protocol.test", "b@protocol.test"))
    assert all(isinstance(o, Delivered) for o in outcomes.values()), outcomes
    assert result.completed
    assert result.data_reply == (250, "2.0.0 Ok: queued as 4Xyz")
    assert len(script.bodies) == 1
    conn.close()


# --- (1) DATA answered with something else than 354 ---------------------------------------


async def test_250_to_data_defers_and_no_body_is_sent(mx: tuple[ScriptedMx, Dialer]) -> None:
    script, dialer = mx
    script.replies["DATA"] = b"250 2.0.0 sure\r\n"
    result, outcomes, conn = await _deliver(dialer)
    (outcome,) = outcomes.values()
    _violation_deferred(outcome, result, "MX answered 250 to DATA instead of 354")
    assert result.violation == "protocol violation: MX answered 250 to DATA instead of 354"
    assert not result.completed  # nothing of the message went out: the next host may try
    assert result.data_reply is None
    assert script.bodies == []
    assert script.after("DATA") == []
    _closed_for_good(result, conn)


@pytest.mark.parametrize("reply", [b"220 2.0.0 hello\r\n", b"334 go on\r\n", b"699 what\r\n"])
async def test_any_other_non_refusal_to_data_defers(
    mx: tuple[ScriptedMx, Dialer], reply: bytes
) -> None:
    script, dialer = mx
    script.replies["DATA"] = reply
    result, outcomes, conn = await _deliver(dialer)
    _violation_deferred(outcomes["a@protocol.test"], result, f"answered {reply[:3].decode()}")
    assert script.after("DATA") == []
    _closed_for_good(result, conn)


@pytest.mark.parametrize(
    ("reply", "kind", "status"),
    [
        (b"554 5.6.0 content refused\r\n", Bounced, "5.6.0"),
        (b"451 4.3.0 later\r\n", Deferred, "4.3.0"),
    ],
)
async def test_refusals_of_data_stay_ordinary(
    mx: tuple[ScriptedMx, Dialer], reply: bytes, kind: type, status: str
) -> None:
    # 5xx bounces the accepted recipients, 4xx defers them, as before: no violation.
    script, dialer = mx
    script.replies["DATA"] = reply
    result, outcomes, conn = await _deliver(dialer, rcpts=("a@protocol.test", "b@protocol.test"))
    assert result.violation is None
    assert result.completed
    for outcome in outcomes.values():
        assert type(outcome) is kind
        assert outcome.reason.status == status
    assert script.bodies == []
    conn.close()


async def test_more_after_a_refusal_of_data_defers_instead_of_bouncing(
    mx: tuple[ScriptedMx, Dialer],
) -> None:
    script, dialer = mx
    script.replies["DATA"] = b"554 5.6.0 content refused\r\n250 2.0.0 or not\r\n"
    result, outcomes, conn = await _deliver(dialer)
    _violation_deferred(outcomes["a@protocol.test"], result, "unsolicited reply after DATA")
    assert not result.completed
    assert result.data_reply is None
    assert script.after("DATA") == []
    _closed_for_good(result, conn)


# --- (2) an extra reply after RCPT ---------------------------------------------------------


async def test_extra_reply_in_the_same_segment_as_rcpt_reply_defers(
    mx: tuple[ScriptedMx, Dialer],
) -> None:
    script, dialer = mx
    script.replies["RCPT"] = b"250 2.1.5 OK\r\n250 2.0.0 one more\r\n"
    result, outcomes, conn = await _deliver(dialer)
    (outcome,) = outcomes.values()
    _violation_deferred(outcome, result, "unsolicited reply after RCPT: 250 2.0.0 one more")
    assert not result.completed
    assert "DATA" not in script.verbs()  # caught before DATA was written
    assert script.bodies == []
    _closed_for_good(result, conn)


async def test_extra_reply_a_moment_after_rcpt_reply_defers(
    mx: tuple[ScriptedMx, Dialer],
) -> None:
    # Sent after the RCPT reply, before the MX read DATA: the client has written DATA by
    # then, and reads the extra line as DATA's reply (a 250, never a go-ahead).
    script, dialer = mx
    script.later["RCPT"] = b"250 2.0.0 one more\r\n"
    result, outcomes, conn = await _deliver(dialer)
    (outcome,) = outcomes.values()
    _violation_deferred(outcome, result, "MX answered 250 to DATA instead of 354")
    assert not result.completed
    assert script.bodies == []
    assert script.after("DATA") == []
    _closed_for_good(result, conn)


async def test_extra_reply_between_two_rcpt_defers_every_recipient(
    mx: tuple[ScriptedMx, Dialer],
) -> None:
    # The second RCPT would be paired with the first one's extra line: neither is trusted,
    # not even a refusal read before the violation (never a bounce from this MX).
    script, dialer = mx
    script.replies["RCPT"] = b"550 5.1.1 no such user\r\n250 2.1.5 OK\r\n"
    result, outcomes, conn = await _deliver(dialer, rcpts=("a@protocol.test", "b@protocol.test"))
    for outcome in outcomes.values():
        _violation_deferred(outcome, result, "unsolicited reply after RCPT: 250 2.1.5 OK")
    assert script.verbs().count("RCPT") == 1
    _closed_for_good(result, conn)


# --- (3) DATA's reply before DATA ----------------------------------------------------------


async def test_354_sent_with_the_rcpt_reply_before_data_defers(
    mx: tuple[ScriptedMx, Dialer],
) -> None:
    script, dialer = mx
    script.replies["RCPT"] = b"250 2.1.5 OK\r\n354 go ahead\r\n"
    result, outcomes, conn = await _deliver(dialer)
    (outcome,) = outcomes.values()
    _violation_deferred(outcome, result, "unsolicited reply after RCPT: 354 go ahead")
    assert not result.completed
    assert "DATA" not in script.verbs()
    assert script.bodies == []
    _closed_for_good(result, conn)


async def test_354_sent_a_moment_before_data_is_read_never_delivers(
    mx: tuple[ScriptedMx, Dialer],
) -> None:
    # The early 354 reaches the client after it wrote DATA: it looks like DATA's reply.
    # The real one follows: caught right after the first (no body), or else read as the
    # reply to the final dot (354, not 2xx). Either way the mail is not recorded as sent.
    script, dialer = mx
    script.later["RCPT"] = b"354 go ahead, early\r\n"
    result, outcomes, conn = await _deliver(dialer)
    (outcome,) = outcomes.values()
    _violation_deferred(outcome, result, "354")
    assert result.completed is bool(script.bodies)  # completed only once the body went out
    _closed_for_good(result, conn)


async def test_reply_sent_while_idle_before_mail_defers_and_mail_is_not_sent(
    mx: tuple[ScriptedMx, Dialer],
) -> None:
    # Between commands aiosmtplib would drop it; kept and found before MAIL is written.
    script, dialer = mx
    script.later["EHLO"] = b"250 2.0.0 unasked\r\n"
    conn = await _open(dialer)
    await asyncio.sleep(4 * PAUSE)
    result, outcomes = await _send(conn)
    _violation_deferred(outcomes["a@protocol.test"], result, "unsolicited reply after EHLO")
    assert result.mail_reply is None
    assert "MAIL" not in script.verbs()
    _closed_for_good(result, conn)


async def test_reply_sent_while_pooled_makes_the_connection_stale(
    mx: tuple[ScriptedMx, Dialer],
) -> None:
    # A notice sent to an idle pooled connection: nothing of the next message was at stake,
    # so the connection is dropped like a dead one (stale, the caller opens a fresh one)
    # and the violation recorded. RSET is never written.
    script, dialer = mx
    script.notice = b"421 4.4.2 idle too long\r\n"
    conn = await _open(dialer)
    first, outcomes = await _send(conn)
    assert isinstance(outcomes["a@protocol.test"], Delivered), outcomes
    assert first.violation is None
    await asyncio.sleep(4 * PAUSE)
    second, _ = await _send(conn)
    assert second.stale
    assert second.violation == (
        "protocol violation: unsolicited reply while idle: 421 4.4.2 idle too long"
    )
    assert "RSET" not in script.verbs()
    _closed_for_good(second, conn)


async def test_unreadable_reply_is_a_violation(mx: tuple[ScriptedMx, Dialer]) -> None:
    script, dialer = mx
    script.replies["MAIL"] = b"hello there\r\n"
    result, outcomes, conn = await _deliver(dialer)
    _violation_deferred(outcomes["a@protocol.test"], result, "unreadable reply to MAIL")
    assert not result.completed
    _closed_for_good(result, conn)


# --- (5b) and the end of data ----------------------------------------------------------------


async def test_354_after_the_dot_defers(mx: tuple[ScriptedMx, Dialer]) -> None:
    script, dialer = mx
    script.final = b"354 go ahead again\r\n"
    result, outcomes, conn = await _deliver(dialer, rcpts=("a@protocol.test", "b@protocol.test"))
    for outcome in outcomes.values():
        _violation_deferred(outcome, result, "MX answered 354 to the end of data")
    assert result.completed  # the body went out: this MX may have it; no other MX tries
    assert result.data_reply is None
    assert len(script.bodies) == 1
    _closed_for_good(result, conn)


async def test_250_before_the_dot_defers(mx: tuple[ScriptedMx, Dialer]) -> None:
    # An acceptance before the MX can have seen the whole message is not one. The message
    # is larger than the socket buffers, so the client is still writing when it comes.
    script, dialer = mx
    script.early, script.final = b"250 2.0.0 got it already\r\n", b""
    data = b"Subject: big\r\n\r\n" + (b"z" * 76 + b"\r\n") * ((32 << 20) // 78)
    result, outcomes, conn = await _deliver(dialer, data=data)
    _violation_deferred(
        outcomes["a@protocol.test"], result, "MX answered 250 before the end of data"
    )
    assert result.completed
    (received,) = await eventually(lambda: script.bodies)
    assert received.endswith(b"\r\n.\r\n")  # the body went out whole, the "." last
    _closed_for_good(result, conn)


async def test_more_after_an_in_sequence_250_is_still_delivered(
    mx: tuple[ScriptedMx, Dialer],
) -> None:
    # The MX took responsibility with a 2xx read in sequence (RFC 5321 §6.1); deferring
    # would send the message twice. The violation is recorded and the connection dropped.
    script, dialer = mx
    script.final = b"250 2.0.0 queued\r\n250 2.0.0 and again\r\n"
    result, outcomes, conn = await _deliver(dialer)
    outcome = outcomes["a@protocol.test"]
    assert isinstance(outcome, Delivered), outcome
    assert result.data_reply == (250, "2.0.0 queued")
    assert result.violation == (
        "protocol violation: unsolicited reply after the end of data: 250 2.0.0 and again"
    )
    _closed_for_good(result, conn)


async def test_more_after_a_554_defers_instead_of_bouncing(
    mx: tuple[ScriptedMx, Dialer],
) -> None:
    script, dialer = mx
    script.final = b"554 5.6.0 refused\r\n250 2.0.0 or not\r\n"
    result, outcomes, conn = await _deliver(dialer)
    _violation_deferred(outcomes["a@protocol.test"], result, "after the end of data")
    assert result.data_reply is None
    _closed_for_good(result, conn)
