"""One SMTP conversation with one IP address of one MX host.

Owns the STARTTLS decision and the transaction for a single session over the wire
(`smtp_wire.SmtpWire`): the adapter where every wire, ssl and socket exception becomes a
field of `ConversationResult`. It knows the TLS
requirement (`TlsRequirement`) but not where it came from (MTA-STS, overrides), and it
never decides what an outcome means for a recipient (that is `attempt.decide`).

Security (CONVENTIONS "Security parameters"): we send STARTTLS ourselves with SNI = the MX
name without its trailing dot (RFC 8461 §7.1, STS-97). Under VERIFIED nothing is ever sent
in the clear after a missing or failed STARTTLS (RFC 8461 §5, STS-90/91). The wire
discards bytes received before the TLS handshake and the EHLO keywords learnt before it
(RFC 3207 §4.2, STS-100); we send EHLO again. A connection for REQUIRETLS mail (RFC 8689
§4.2.1) must be held to VERIFIED or DANE, and the server must offer REQUIRETLS in that
second EHLO, else it is closed before MAIL (`requiretls_missing`). The message goes out
through `transfer.send_data` (chunked, CRLF normalised then dot-stuffed: RFC 5321 §2.3.8,
§4.5.2; SMTP-14/15, SMUG-06).

TLS sessions are resumed (policy/webpki.py `ResumingContext`): a context built with
`resume=True` offers the session it kept for the exact MX name, and keeps the session of a
full handshake once the first reply after it has been read (TLS 1.3 tickets come after
the handshake); a failed or abandoned handshake, or a session that fails its first EHLO,
drops it. Every check after the handshake runs whether or not it was resumed. DANE and
ENCRYPTED sessions never resume (`dane.dane_context` is a plain context): DANE matches the
chain the server sends, and a resumed handshake sends none.

The recorder trusts only the protocol (issue 10): one reply per command, in order, nothing
more. When the server offers PIPELINING, RSET (on a reused connection), MAIL, every RCPT
and DATA go out in one group and their replies are read in that order (RFC 2920 §3.1);
otherwise each command waits for its reply. Before a command or group is written and
after its last reply, nothing else may have come from the MX (`SmtpWire.unsolicited`);
DATA must be answered 354 and the final "." by a 2xx read in sequence
(`transfer.send_data`). A violation closes the connection (never reused or pooled) and
becomes `ConversationResult.violation`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from policy.model import TlsRptResult
from policy.webpki import ResumingContext, classify_certificate_error
from relay.delivery.dane import DaneMatch, Tlsa, dane_context, peer_chain, verify_chain
from relay.delivery.envelope import Envelope, mail_params, path, rcpt_params
from relay.delivery.outcome import Hop
from relay.delivery.smtp_wire import MalformedReply, SmtpWire
from relay.delivery.smtp_wire import Reply as WireReply
from relay.delivery.tls import TlsRequirement
from relay.delivery.transfer import data_reply_problem, send_data

Reply = tuple[int, str]
"""An SMTP reply: code and text (multi-line replies joined with newlines)."""

# ssl.SSLError, ConnectionError (the wire's ConnectionLost) and TimeoutError are OSError
# subclasses; ValueError covers names or addresses the wire refuses to write.
_ERRORS = (MalformedReply, OSError, ValueError)


@dataclass(frozen=True, slots=True)
class ConversationResult:
    """What one session achieved. Replies are raw; `error` and details are safe lines.

    `completed` means the transaction reached a point that decides this message at this
    attempt: MAIL refused with 5xx, every RCPT answered without one accepted, or DATA
    begun (a retry elsewhere could then duplicate the message). Anything else (refused
    connection, TLS failure, 421, 4xx to MAIL, a drop before DATA) leaves it False so the
    caller tries the next address or host.

    `violation` (a safe line, "protocol violation: ...") says how the MX broke the reply
    sequence; `error` then says the same. It leaves `completed` False unless the message
    body had been written. Every reply kept here was read in sequence: a violation keeps
    no reply it makes doubtful, so `data_reply` beside a violation is a 2xx that came
    before it (the MX took the message; what followed changes nothing).
    """

    hop: Hop
    connected: bool = False
    tls_failure: TlsRptResult | None = None  # set under VERIFIED/REPORT only
    tls_failure_detail: str | None = None
    error: str | None = None
    error_reply: Reply | None = None  # the reply that ended the session early, if any
    mail_reply: Reply | None = None
    rcpt_replies: dict[str, Reply] = field(default_factory=dict)
    data_reply: Reply | None = None
    completed: bool = False
    stale: bool = False  # a pooled connection was found dead before MAIL was answered
    timed_out: bool = False  # the host did not answer in time (connect, greeting, command)
    repeat: bool = False  # over a connection that already carried this policy domain's mail
    violation: str | None = None  # the MX broke the one-reply-per-command sequence
    requiretls_missing: bool = False  # REQUIRETLS mail, and the MX did not offer it after TLS
    # No SMTP reply at all: the connection was refused, timed out (connect or greeting) or
    # found no route, or the address is marked down after such a timeout (pool.mark_down).
    unreachable: bool = False


@dataclass(frozen=True, slots=True)
class _TlsFail:
    result: TlsRptResult
    detail: str
    usable: bool  # the plaintext session may go on (STARTTLS not offered, or refused)


_CONTROLS_TO_SPACE = {c: " " for c in (*range(0x20), 0x7F)}


def safe_line(text: str, limit: int = 300) -> str:
    """One line of printable text: control characters (CR, LF, ...) become spaces."""
    line = " ".join(text.translate(_CONTROLS_TO_SPACE).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe(exc: BaseException) -> str:
    """One safe line naming an exception (ssl errors by their OpenSSL reason)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        text = exc.verify_message
    elif isinstance(exc, ssl.SSLError) and exc.reason:
        text = exc.reason
    else:
        text = str(exc) or type(exc).__name__
    return safe_line(f"{type(exc).__name__}: {text}", 200)


class _Conversation:
    """Mutable state of one connection attempt or transaction; `result()` freezes it."""

    def __init__(
        self, ip: str, sni: str, port: int, helo: str, timeouts: tuple[float, float]
    ) -> None:
        self.ip, self.sni, self.port, self.helo = ip, sni, port, helo
        self.connect_timeout, self.command_timeout = timeouts
        self.clients: list[SmtpWire] = []
        self.connected = False
        self.tls_version: str | None = None
        self.tls_context: ssl.SSLContext | None = None  # the context of the TLS that is up
        self.tls_resumed = False  # the handshake resumed an earlier session
        self.on_handshake: Callable[[bool], None] | None = None  # told `tls_resumed`
        self.verified = False
        self.tls_failure: _TlsFail | None = None
        self.error: str | None = None
        self.error_reply: Reply | None = None
        self.mail_reply: Reply | None = None
        self.rcpt_replies: dict[str, Reply] = {}
        self.data_reply: Reply | None = None
        self.completed = False
        self.stale = False
        self.timed_out = False
        self.dsn = False  # the server advertised DSN (RFC 3461 parameters passed on)
        self.tlsa: tuple[Tlsa, ...] = ()  # under DANE: the usable records to match
        self.dane: str | None = None  # the record the chain matched
        self.violation: str | None = None
        self.requiretls = False  # the session is for REQUIRETLS mail (RFC 8689)
        self.requiretls_missing = False
        self.unreachable = False  # the first connection failed before any reply
        self.last = "after EHLO"  # where a stray reply would have come from, for the text

    @classmethod
    def over(cls, conn: Connection, command_timeout: float) -> _Conversation:
        """The state of a transaction over an already open connection."""
        conv = cls(conn.ip, conn.mx, 0, "", (0.0, command_timeout))
        conv.connected = True
        conv.tls_version, conv.verified, conv.tls_failure = (
            conn.tls_version,
            conn.verified,
            conn.tls_failure,
        )
        conv.tls_resumed = conn.tls_resumed
        conv.dsn = conn.smtp.supports("dsn")
        conv.dane = conn.dane
        return conv

    def result(self, *, repeat: bool = False) -> ConversationResult:
        """The frozen result (the conversation is not used after this)."""
        fail = self.tls_failure
        return ConversationResult(
            hop=Hop(
                mx=self.sni,
                ip=self.ip,
                tls=self.tls_version,
                verified=self.verified,
                dsn=self.dsn,
                dane=self.dane,
                tls_resumed=self.tls_resumed,
            ),
            connected=self.connected,
            tls_failure=fail.result if fail else None,
            tls_failure_detail=fail.detail if fail else None,
            error=self.error,
            error_reply=self.error_reply,
            mail_reply=self.mail_reply,
            rcpt_replies=self.rcpt_replies,
            data_reply=self.data_reply,
            completed=self.completed,
            stale=self.stale,
            timed_out=self.timed_out,
            violation=self.violation,
            requiretls_missing=self.requiretls_missing,
            repeat=repeat,
            unreachable=self.unreachable,
        )

    def close_all(self) -> None:
        for smtp in self.clients:
            smtp.close()

    def fail_reply(self, stage: str, code: int, message: str) -> None:
        self.error_reply = (code, message)
        self.error = safe_line(f"{stage} refused: {code} {message}")

    def no_requiretls(self, why: str) -> None:
        """RFC 8689 §4.2.1: this server may not receive the REQUIRETLS message."""
        self.requiretls_missing = True
        self.error = safe_line(f"REQUIRETLS: {self.sni}: {why}")

    def dropped(self, stage: str, exc: BaseException) -> None:
        self.timed_out = self.timed_out or isinstance(exc, TimeoutError)
        self.error = f"connection lost or timed out at {stage}: {describe(exc)}"

    def violated(self, smtp: SmtpWire, what: str) -> None:
        """The MX broke the reply sequence: recorded, and the connection closed for good
        (no QUIT: its reply could not be told from what is still in flight)."""
        self.violation = self.error = safe_line(f"protocol violation: {what}")
        smtp.close()

    def unsolicited(self, smtp: SmtpWire) -> bool:
        """Whether the MX sent something since the last reply (a violation, recorded)."""
        stray = smtp.unsolicited()
        if stray is None:
            return False
        self.violated(smtp, f"unsolicited reply {self.last}: {stray}")
        return True

    async def open(self) -> SmtpWire | None:
        """A new connection, greeted and EHLO'd; None (with `error` set) on failure."""
        self.tls_version, self.verified = None, False
        self.tls_context, self.tls_resumed = None, False
        try:
            smtp = await SmtpWire.open(self.ip, self.port, timeout=self.connect_timeout)
        except MalformedReply as exc:
            self.connected = True
            self.error = safe_line(f"greeting unreadable: {exc}")
            return None
        except _ERRORS as exc:
            self.timed_out = isinstance(exc, TimeoutError)
            self.unreachable = not self.connected  # a reconnect after a reply is no proof
            self.error = f"connect to {self.ip} port {self.port} failed: {describe(exc)}"
            return None
        self.clients.append(smtp)
        self.connected = True
        if smtp.greeting.code != 220:
            self.fail_reply("greeting", *smtp.greeting)
            return None
        return smtp if await self.hello(smtp) else None

    async def hello(self, smtp: SmtpWire) -> bool:
        """EHLO, falling back to HELO when EHLO is refused and the server stays."""
        try:
            reply = await smtp.ehlo(self.helo, timeout=self.command_timeout)
        except _ERRORS as exc:
            self.dropped("EHLO", exc)
            return False
        if reply.code == 250:
            return True
        if not smtp.is_connected:
            self.fail_reply("EHLO", *reply)
            return False
        try:
            reply = await smtp.command(b"HELO " + self.helo.encode(), timeout=self.command_timeout)
        except _ERRORS as exc:
            self.dropped("HELO", exc)
            return False
        if reply.code == 250:
            return True
        self.fail_reply("HELO", *reply)
        return False

    async def starttls(self, smtp: SmtpWire, ctx: ssl.SSLContext) -> _TlsFail | None:
        """STARTTLS with SNI = the MX name (the caller sends EHLO again). None when TLS is
        up; a failed or abandoned handshake drops the session kept for the name."""
        if not smtp.supports("starttls"):
            return _TlsFail(TlsRptResult.STARTTLS_NOT_SUPPORTED, "STARTTLS not offered", True)
        try:
            fail = await self._handshake(smtp, ctx)
        except BaseException:  # cut off (the attempt's deadline): abandoned
            _forget_session(ctx, self.sni)
            raise
        if fail is not None:
            _forget_session(ctx, self.sni)
            return fail
        tls = smtp.ssl_object
        self.tls_version = (tls.version() if tls else None) or "TLS"
        self.tls_context, self.tls_resumed = ctx, tls is not None and tls.session_reused
        if self.on_handshake is not None:
            self.on_handshake(self.tls_resumed)
        return None

    async def _handshake(self, smtp: SmtpWire, ctx: ssl.SSLContext) -> _TlsFail | None:
        try:
            reply = await smtp.starttls(ctx, self.sni, timeout=self.command_timeout)
        except ssl.SSLCertVerificationError as exc:
            return _TlsFail(classify_certificate_error(exc), describe(exc), False)
        except MalformedReply as exc:
            detail = safe_line(f"STARTTLS answered unreadably: {exc}")
            return _TlsFail(TlsRptResult.STARTTLS_NOT_SUPPORTED, detail, False)
        except _ERRORS as exc:
            # Protocol below TLS 1.2 (RFC 8996), aborted handshake, bad SNI name, ...
            detail = f"TLS handshake failed: {describe(exc)}"
            return _TlsFail(TlsRptResult.VALIDATION_FAILURE, detail, False)
        if reply.code != 220:
            detail = safe_line(f"STARTTLS refused: {reply.code} {reply.message}")
            return _TlsFail(TlsRptResult.STARTTLS_NOT_SUPPORTED, detail, smtp.is_connected)
        return None

    async def hello_over_tls(self, smtp: SmtpWire) -> bool:
        """EHLO again after the handshake (RFC 3207 §4.2). Its reply is the first read over
        TLS: TLS 1.3 tickets have come by then, so the session is kept now; a session
        that fails here is dropped."""
        ctx = self.tls_context
        if not await self.hello(smtp):
            if ctx is not None:
                _forget_session(ctx, self.sni)
            return False
        ssl_object = smtp.ssl_object
        if isinstance(ctx, ResumingContext) and ssl_object is not None:
            ctx.remember(ssl_object)
        return True

    def dane_check(self, smtp: SmtpWire) -> _TlsFail | None:
        """RFC 7672 §3: the chain the server sent must match a usable TLSA record of the MX
        host (relay/delivery/dane.py); checked before any mail command. None on a match."""
        ssl_object = smtp.ssl_object
        if ssl_object is None:
            return _TlsFail(TlsRptResult.VALIDATION_FAILURE, "no TLS session to check", False)
        verdict = verify_chain(peer_chain(ssl_object), self.tlsa, self.sni, datetime.now(UTC))
        if isinstance(verdict, DaneMatch):
            self.verified, self.dane = True, verdict.record.text
            return None
        return _TlsFail(verdict.result, safe_line(f"DANE: {verdict.detail}"), False)

    async def command(self, smtp: SmtpWire, verb: bytes, *args: bytes) -> Reply | None:
        """The reply to one command, None when the session ended (dropped, or a violation:
        something came before the command was written, or with or after its reply)."""
        if self.unsolicited(smtp):
            return None
        name = verb.split(b" ", 1)[0].decode()
        try:
            smtp.send(b" ".join((verb, *args)))
        except _ERRORS as exc:
            self.dropped(name, exc)
            return None
        reply = await self.read(smtp, name)
        if reply is None or self.unsolicited(smtp):
            return None
        return reply

    async def read(self, smtp: SmtpWire, name: str) -> Reply | None:
        """The next reply, in order, taken as the reply to `name`; None when the session
        ended (dropped, or a reply that cannot be parsed: a violation)."""
        try:
            reply = await smtp.reply(timeout=self.command_timeout)
        except MalformedReply as exc:
            self.violated(smtp, f"unreadable reply to {name}: {exc}")
            return None
        except _ERRORS as exc:
            self.dropped(name, exc)
            return None
        self.last = f"after {name}"
        return (reply.code, reply.message)

    async def data(self, smtp: SmtpWire, message: bytes, start: Reply | None = None) -> None:
        """DATA (unless `start`, its reply, was read in a pipelined group) and the message;
        `completed` is True on entry and stays so unless a violation came before the body
        was written."""
        if start is None and self.unsolicited(smtp):
            self.completed = False
            return
        begun = None if start is None else WireReply(*start)
        try:
            sent = await send_data(smtp, message, timeout=self.command_timeout, start=begun)
        except _ERRORS as exc:
            # Never counts as sent: the caller defers (RFC 5321 §6.1 keeps responsibility).
            self.dropped("DATA", exc)
            return
        if sent.reply is not None:
            self.data_reply = (sent.reply.code, sent.reply.message)
        if sent.violation is None:
            return
        self.violated(smtp, sent.violation)
        self.completed = sent.body_sent


def _forget_session(ctx: ssl.SSLContext, sni: str) -> None:
    if isinstance(ctx, ResumingContext):
        ctx.forget(sni)


@dataclass(frozen=True, slots=True)
class _Commands:
    """A transaction's commands: MAIL, then one RCPT per recipient that can be written
    (`unsendable` holds the local refusals of the others)."""

    mail: bytes
    rcpts: tuple[tuple[str, bytes], ...]
    unsendable: dict[str, Reply]


def _commands(smtp: SmtpWire, envelope: Envelope, sender_path: bytes, utf8: bool) -> _Commands:
    mail = b" ".join((b"MAIL FROM:" + sender_path, *mail_params(envelope, smtp.supports, utf8)))
    rcpts: list[tuple[str, bytes]] = []
    unsendable: dict[str, Reply] = {}
    for rcpt in envelope.recipients:
        rcpt_path = path(rcpt, utf8)
        if rcpt_path is None:
            unsendable[rcpt] = (553, "5.6.7 recipient address cannot be sent (local)")
            continue
        extra = rcpt_params(envelope, rcpt, smtp.supports)
        rcpts.append((rcpt, b" ".join((b"RCPT TO:" + rcpt_path, *extra))))
    return _Commands(mail, tuple(rcpts), unsendable)


async def _transaction(
    conv: _Conversation, smtp: SmtpWire, envelope: Envelope, *, reset: bool
) -> None:
    """RSET first when `reset`, then MAIL, one RCPT per recipient (each reply kept), DATA
    if any was accepted; pipelined when the server offers it."""
    if envelope.requiretls and not smtp.supports("requiretls"):
        # The pool keeps REQUIRETLS connections apart (`connect` checked this one): never
        # reached, but a REQUIRETLS message must never go out without the option.
        conv.no_requiretls("not offered on this connection")
        return
    utf8 = envelope.needs_utf8 and smtp.supports("smtputf8")
    sender_path = path(envelope.sender, utf8)
    if sender_path is None:
        # RFC 6531 §3.2 / RFC 5321 §4.1.2: this envelope cannot be sent to this server.
        conv.mail_reply = (550, "5.6.7 sender address cannot be sent to this server (local)")
        conv.completed = True
        return
    commands = _commands(smtp, envelope, sender_path, utf8)
    conv.rcpt_replies.update(commands.unsendable)
    if smtp.supports("pipelining"):
        await _pipelined(conv, smtp, envelope, commands, reset=reset)
    else:
        await _one_by_one(conv, smtp, envelope, commands, reset=reset)


async def _one_by_one(
    conv: _Conversation, smtp: SmtpWire, envelope: Envelope, commands: _Commands, *, reset: bool
) -> None:
    """Each command waits for its reply (a server without PIPELINING)."""
    if reset:
        reply = await conv.command(smtp, b"RSET")
        if reply is None or not _reset_ok(conv, reply):
            return
    reply = await conv.command(smtp, commands.mail)
    if reply is None or not _mail_ok(conv, reply):
        return
    for rcpt, command in commands.rcpts:
        reply = await conv.command(smtp, command)
        if reply is None or not _rcpt_ok(conv, rcpt, reply):
            return
    conv.completed = True
    if _accepted_any(conv):
        await conv.data(smtp, envelope.data)


async def _pipelined(
    conv: _Conversation, smtp: SmtpWire, envelope: Envelope, commands: _Commands, *, reset: bool
) -> None:
    """RFC 2920 §3.1: RSET, MAIL, the RCPTs and DATA (last: its reply changes the state)
    in one write, then their replies in order, every one of them checked."""
    group = [b"RSET"] if reset else []
    group += [commands.mail, *(command for _, command in commands.rcpts), b"DATA"]
    if conv.unsolicited(smtp):
        return
    try:
        smtp.send(*group)
    except _ERRORS as exc:
        conv.dropped(group[0].split(b" ", 1)[0].decode(), exc)
        return
    if reset:
        reply = await conv.read(smtp, "RSET")
        if reply is None or not _reset_ok(conv, reply):
            return  # the connection is closed: the rest of the group's replies are moot
    reply = await conv.read(smtp, "MAIL")
    if reply is None:
        return
    mail_ok = _mail_ok(conv, reply)
    if not mail_ok and not conv.completed:
        return  # a 4xx to MAIL closes the connection (`transact`)
    for rcpt, _ in commands.rcpts:
        reply = await conv.read(smtp, "RCPT")
        if reply is None:
            conv.completed = False  # not even a 5xx to MAIL stands beside a broken sequence
            return
        if mail_ok and not _rcpt_ok(conv, rcpt, reply):
            return
    start = await conv.read(smtp, "DATA")
    if start is None:
        conv.completed = False  # a violation keeps no decision (`ConversationResult`)
        return
    conv.completed = True
    if mail_ok and _accepted_any(conv):
        # DATA's reply and what came after it are checked there, as for DATA sent alone.
        await conv.data(smtp, envelope.data, start)
        return
    if (problem := data_reply_problem(smtp, WireReply(*start))) is not None:
        conv.violated(smtp, problem)
        conv.completed = False
    elif start[0] == 354:
        # RFC 2920 §3.1: DATA accepted although nothing can be sent: end it at once with
        # an empty message, whose reply decides nothing.
        await _end_empty_data(conv, smtp)


async def _end_empty_data(conv: _Conversation, smtp: SmtpWire) -> None:
    try:
        smtp.write(b".\r\n")
    except _ERRORS as exc:
        conv.dropped("DATA", exc)
        return
    if await conv.read(smtp, "DATA") is not None:
        conv.unsolicited(smtp)
    if conv.violation is not None:
        conv.completed = False  # a violation keeps no decision (`ConversationResult`)


def _reset_ok(conv: _Conversation, reply: Reply) -> bool:
    if reply[0] // 100 == 2:
        return True
    conv.fail_reply("RSET", *reply)
    return False


def _mail_ok(conv: _Conversation, reply: Reply) -> bool:
    """Whether MAIL was accepted. A 5xx is a decision for every recipient (RFC 5321
    §4.5.4.1: never cached); anything else is about this host: try the next one."""
    conv.mail_reply = reply
    if reply[0] // 100 == 2:
        return True
    conv.completed = reply[0] // 100 == 5
    if not conv.completed:
        conv.fail_reply("MAIL", *reply)
    return False


def _rcpt_ok(conv: _Conversation, rcpt: str, reply: Reply) -> bool:
    """Keeps the recipient's reply; False when the server is closing (421): this host
    failed, not the recipient."""
    conv.rcpt_replies[rcpt] = reply
    if reply[0] == 421:
        conv.fail_reply("RCPT", *reply)
        return False
    return True


def _accepted_any(conv: _Conversation) -> bool:
    return any(code // 100 == 2 for code, _ in conv.rcpt_replies.values())


async def quit_politely(smtp: SmtpWire, within: float) -> None:
    """QUIT (bounded), then close; the transaction is already decided either way."""
    with contextlib.suppress(*_ERRORS):
        await smtp.quit(timeout=within)
    smtp.close()


async def _secure(
    conv: _Conversation,
    requirement: TlsRequirement,
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> SmtpWire | None:
    """A connection ready for MAIL under `requirement`, or None (with the reason in conv)."""
    verified_ctx, unverified_ctx = contexts
    smtp = await conv.open()
    if smtp is None:
        return None
    if requirement in (TlsRequirement.DANE, TlsRequirement.ENCRYPTED):
        # RFC 7672 §2.2: TLS is mandatory (no plaintext, whatever is offered); the chain
        # is checked against the TLSA records ourselves, so the handshake is unverified,
        # TLS 1.2 or newer (dane.dane_context). Never resumed: always a full handshake,
        # so the server always sends the chain `dane_check` matches.
        fail = await conv.starttls(smtp, dane_context())
        if fail is None and requirement is TlsRequirement.DANE:
            fail = conv.dane_check(smtp)
        if fail is not None:
            conv.tls_failure, conv.error = fail, fail.detail
            await quit_politely(smtp, conv.command_timeout)
            return None
    elif requirement is not TlsRequirement.OPPORTUNISTIC:
        fail = await conv.starttls(smtp, verified_ctx)
        if fail is None:
            conv.verified = True
        elif requirement is TlsRequirement.VERIFIED:
            # RFC 8461 §5: no delivery, no plaintext fallback, nothing more said.
            conv.tls_failure, conv.error = fail, fail.detail
            await quit_politely(smtp, conv.command_timeout)
            return None
        else:
            conv.tls_failure = fail  # testing: deliver anyway, report what failed
            smtp = await _opportunistic(conv, smtp, fail, unverified_ctx)
    else:
        smtp = await _opportunistic(conv, smtp, None, unverified_ctx)
    if smtp is None or (conv.tls_version and not await conv.hello_over_tls(smtp)):
        return None
    if conv.requiretls and not smtp.supports("requiretls"):
        # RFC 8689 §4.2.1: the next hop must offer REQUIRETLS after STARTTLS.
        conv.no_requiretls("not offered after STARTTLS")
        await quit_politely(smtp, conv.command_timeout)
        return None
    return smtp


async def _opportunistic(
    conv: _Conversation, smtp: SmtpWire, failed: _TlsFail | None, ctx: ssl.SSLContext
) -> SmtpWire | None:
    """A session secured if possible: unverified STARTTLS, else plaintext (reconnecting
    once when a failed handshake killed the connection). `failed` is an earlier verified
    try on this same connection."""
    if failed is None:
        failed = await conv.starttls(smtp, ctx)
        if failed is None:
            return smtp
    elif not failed.usable:
        smtp.close()
        fresh = await conv.open()
        if fresh is None:
            return None
        smtp = fresh
        failed = await conv.starttls(smtp, ctx)
        if failed is None:
            return smtp
    if failed.usable:
        return smtp
    smtp.close()
    return await conv.open()  # plaintext: opportunistic TLS may not block delivery


@dataclass(frozen=True, slots=True)
class Dialer:
    """How to open connections: port, EHLO name, TLS contexts and timeouts (seconds)."""

    port: int
    helo: str
    verified_ctx: ssl.SSLContext
    unverified_ctx: ssl.SSLContext
    connect_timeout: float
    command_timeout: float
    # Told of every TLS handshake that completed: True when it resumed a session (metrics).
    on_tls_handshake: Callable[[bool], None] | None = None


@dataclass(eq=False, slots=True)
class Connection:
    """An open SMTP connection, greeted, EHLO'd and secured as `requirement` asks.

    Used by one transaction at a time (the pool hands it out exclusively).
    """

    smtp: SmtpWire
    ip: str
    mx: str
    requirement: TlsRequirement
    tls_version: str | None
    verified: bool
    tls_failure: _TlsFail | None
    transactions: int = 0
    idle_since: float = 0.0
    # Policy domains whose mail this connection carried: RFC 8460 counts its TLS session
    # once for each, not once per message (relay/delivery/attempt.py `mx_tls_result`).
    domains: set[str] = field(default_factory=set)
    dane: str | None = None  # under DANE: the TLSA record the chain matched
    requiretls: bool = False  # opened for REQUIRETLS mail: the server offered REQUIRETLS
    tls_resumed: bool = False  # its TLS handshake resumed an earlier session

    @property
    def alive(self) -> bool:
        return self.smtp.is_connected

    def close(self) -> None:
        self.smtp.close()


async def connect(
    ip: str,
    mx_host: str,
    requirement: TlsRequirement,
    dialer: Dialer,
    tlsa: tuple[Tlsa, ...] = (),
    *,
    requiretls: bool = False,
) -> Connection | ConversationResult:
    """A connection ready for MAIL, or the (incomplete) ConversationResult saying why not.

    Up to three TCP connections under REPORT/OPPORTUNISTIC when a TLS handshake fails.
    Under DANE, `tlsa` holds the usable TLSA records the chain must match. `requiretls`:
    for REQUIRETLS mail (RFC 8689 §4.2.1): only under VERIFIED or DANE, and only when the
    server offers REQUIRETLS after STARTTLS.
    Never raises for network, TLS or SMTP errors.
    """
    sni = mx_host.rstrip(".").lower()
    timeouts = (dialer.connect_timeout, dialer.command_timeout)
    conv = _Conversation(ip, sni, dialer.port, dialer.helo, timeouts)
    conv.tlsa = tlsa
    conv.requiretls = requiretls
    conv.on_handshake = dialer.on_tls_handshake
    if requiretls and requirement not in (TlsRequirement.VERIFIED, TlsRequirement.DANE):
        # The decision never asks this; a REQUIRETLS message never goes unauthenticated.
        conv.no_requiretls(f"needs verified or DANE TLS, not {requirement.value}")
        return conv.result()
    # Each step is bounded by its own timeout; this bounds the whole: up to three
    # connections, each greeting + EHLO, STARTTLS, EHLO.
    budget = 3 * (dialer.connect_timeout + dialer.command_timeout * 4)
    smtp: SmtpWire | None = None
    try:
        async with asyncio.timeout(budget):
            smtp = await _secure(conv, requirement, (dialer.verified_ctx, dialer.unverified_ctx))
    except TimeoutError:
        conv.error, conv.timed_out, smtp = "session timed out", True, None
    except BaseException:
        conv.close_all()
        raise
    for other in conv.clients:
        if other is not smtp:
            other.close()
    if smtp is None:
        return conv.result()
    return Connection(
        smtp, ip, sni, requirement, conv.tls_version, conv.verified, conv.tls_failure,
        dane=conv.dane, requiretls=requiretls, tls_resumed=conv.tls_resumed,
    )  # fmt: skip


# The slowest transfer a deadline leaves time for, on top of the time for replies: a large
# message to a slow MX must not be cut off mid-body (and resent whole, again and again) by
# a deadline sized for small ones. 32 KiB/s: 50 MiB in 27 minutes.
SLOWEST_TRANSFER_BPS = 32 * 1024


def transfer_allowance(size: int) -> float:
    """Seconds a message of `size` bytes is given on the wire (at SLOWEST_TRANSFER_BPS)."""
    return size / SLOWEST_TRANSFER_BPS


async def transact(
    conn: Connection,
    envelope: Envelope,
    *,
    command_timeout: float,
    reused: bool,
    repeat: bool = False,
) -> ConversationResult:
    """One transaction over `conn`; RSET first when the connection carried mail before.
    `repeat` is passed on to the result (`ConversationResult.repeat`).

    A reused connection found dead (RSET or MAIL unanswered, or RSET refused) gives a
    result with `stale` set: nothing of this message reached the server, so the caller
    may retry it on a fresh connection without counting a failure. So does one where the
    MX broke the reply sequence before MAIL was answered (say, a 421 sent while idle):
    `violation` says so, the connection is closed, and no recipient's fate was at stake.
    """
    conv = _Conversation.over(conn, command_timeout)
    if reused:
        conv.last = "while idle"
    budget = command_timeout * (6 + len(envelope.recipients))
    budget += transfer_allowance(len(envelope.data))
    try:
        async with asyncio.timeout(budget):
            await _transaction(conv, conn.smtp, envelope, reset=reused)
    except TimeoutError:
        conv.error, conv.timed_out = "session timed out", True
        conn.close()
    conn.transactions += 1
    conv.stale = reused and conv.mail_reply is None
    if conv.error is not None and conn.alive:
        conn.close()  # a host failure: never reuse this connection
    return conv.result(repeat=repeat)


async def send_over(
    ip: str, mx_host: str, requirement: TlsRequirement, dialer: Dialer, envelope: Envelope
) -> ConversationResult:
    """Deliver one message over one new connection and close it (no pooling)."""
    conn = await connect(ip, mx_host, requirement, dialer)
    if isinstance(conn, ConversationResult):
        return conn
    try:
        result = await transact(
            conn, envelope, command_timeout=dialer.command_timeout, reused=False
        )
    finally:
        await quit_politely(conn.smtp, dialer.command_timeout)
    return result
