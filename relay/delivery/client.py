"""One SMTP conversation with one IP address of one MX host.

Owns aiosmtplib and the STARTTLS decision for a single session: the adapter where every
aiosmtplib, ssl and socket exception becomes a field of `ConversationResult`. It knows the TLS
requirement (`TlsRequirement`) but not where it came from (MTA-STS, overrides), and it
never decides what an outcome means for a recipient (that is `attempt.decide`).

Security (CONVENTIONS "Security parameters"): aiosmtplib connects with `start_tls=False`
and we send STARTTLS ourselves with SNI = the MX name without its trailing dot
(RFC 8461 §7.1, STS-97). Under VERIFIED nothing is ever sent in the clear after a missing
or failed STARTTLS (RFC 8461 §5, STS-90/91). aiosmtplib discards bytes buffered before
the TLS handshake and its ESMTP state after it (RFC 3207 §4.2, STS-100); we send EHLO
again ourselves. A connection for REQUIRETLS mail (RFC 8689 §4.2.1) must be held to
VERIFIED or DANE, and the server must offer REQUIRETLS in that second EHLO, else it is
closed before MAIL (`requiretls_missing`). The message goes out through
`transfer.send_data` (chunked, CRLF normalised then dot-stuffed: RFC 5321 §2.3.8, §4.5.2;
SMTP-14/15, SMUG-06).

TLS sessions are resumed (policy/webpki.py `ResumingContext`): a context built with
`resume=True` offers the session it kept for the exact MX name, and keeps the session of a
full handshake once the first reply after it has been read (TLS 1.3 tickets come after
the handshake); a failed or abandoned handshake, or a session that fails its first EHLO,
drops it. Every check after the handshake runs whether or not it was resumed. DANE and
ENCRYPTED sessions never resume (`dane.dane_context` is a plain context): DANE matches the
chain the server sends, and a resumed handshake sends none.

The recorder trusts only the protocol (issue 10): one reply per command, nothing more.
Before each command of a transaction (RSET, MAIL, RCPT, DATA) and after each reply, nothing
else may have come from the MX (`transfer.stray_reply`); DATA must be answered 354 and the
final "." by a 2xx read in sequence (`transfer.send_data`). A violation closes the
connection (never reused or pooled) and becomes `ConversationResult.violation`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiosmtplib
from aiosmtplib import SMTPException, SMTPHeloError, SMTPResponseException

from policy.model import TlsRptResult
from policy.webpki import ResumingContext, classify_certificate_error
from relay.delivery.dane import DaneMatch, Tlsa, dane_context, peer_chain, verify_chain
from relay.delivery.envelope import Envelope, mail_params, path, rcpt_params
from relay.delivery.outcome import Hop
from relay.delivery.tls import TlsRequirement
from relay.delivery.transfer import listen, send_data, stray_reply

Reply = tuple[int, str]
"""An SMTP reply: code and text (multi-line replies joined with newlines)."""

# ssl.SSLError, ConnectionError and TimeoutError are OSError subclasses; ValueError covers
# names or addresses the library refuses to put on the wire.
_ERRORS = (SMTPException, OSError, ValueError)


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
        self.clients: list[aiosmtplib.SMTP] = []
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
        conv.dsn = conn.smtp.supports_extension("dsn")
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

    def violated(self, smtp: aiosmtplib.SMTP, what: str) -> None:
        """The MX broke the reply sequence: recorded, and the connection closed for good
        (no QUIT: its reply could not be told from what is still in flight)."""
        self.violation = self.error = safe_line(f"protocol violation: {what}")
        smtp.close()

    def unsolicited(self, smtp: aiosmtplib.SMTP) -> bool:
        """Whether the MX sent something since the last reply (a violation, recorded)."""
        stray = stray_reply(smtp)
        if stray is None:
            return False
        self.violated(smtp, f"unsolicited reply {self.last}: {stray}")
        return True

    async def open(self) -> aiosmtplib.SMTP | None:
        """A new connection, greeted and EHLO'd; None (with `error` set) on failure."""
        self.tls_version, self.verified = None, False
        self.tls_context, self.tls_resumed = None, False
        try:
            smtp = aiosmtplib.SMTP(
                hostname=self.ip,
                port=self.port,
                local_hostname=self.helo,
                start_tls=False,  # never let aiosmtplib decide about TLS
                timeout=self.command_timeout,
            )
            self.clients.append(smtp)
            await smtp.connect(timeout=self.connect_timeout)
        except SMTPResponseException as exc:  # a greeting other than 220
            self.connected = True
            self.fail_reply("greeting", exc.code, exc.message)
            return None
        except _ERRORS as exc:
            self.timed_out = isinstance(exc, TimeoutError)
            self.unreachable = not self.connected  # a reconnect after a reply is no proof
            self.error = f"connect to {self.ip} port {self.port} failed: {describe(exc)}"
            return None
        self.connected = True
        return smtp if await self.hello(smtp) else None

    async def hello(self, smtp: aiosmtplib.SMTP) -> bool:
        """EHLO, falling back to HELO when EHLO is refused and the server stays."""
        try:
            await smtp.ehlo()
            return True
        except SMTPHeloError as exc:
            if not smtp.is_connected:
                self.fail_reply("EHLO", exc.code, exc.message)
                return False
        except _ERRORS as exc:
            self.dropped("EHLO", exc)
            return False
        try:
            await smtp.helo()
            return True
        except SMTPResponseException as exc:
            self.fail_reply("HELO", exc.code, exc.message)
        except _ERRORS as exc:
            self.dropped("HELO", exc)
        return False

    async def starttls(self, smtp: aiosmtplib.SMTP, ctx: ssl.SSLContext) -> _TlsFail | None:
        """STARTTLS with SNI = the MX name (the caller sends EHLO again). None when TLS is
        up; a failed or abandoned handshake drops the session kept for the name."""
        if not smtp.supports_extension("starttls"):
            return _TlsFail(TlsRptResult.STARTTLS_NOT_SUPPORTED, "STARTTLS not offered", True)
        try:
            fail = await self._handshake(smtp, ctx)
        except BaseException:  # cut off (the attempt's deadline): abandoned
            _forget_session(ctx, self.sni)
            raise
        if fail is not None:
            _forget_session(ctx, self.sni)
            return fail
        ssl_object = smtp.get_transport_info("ssl_object")
        tls = ssl_object if isinstance(ssl_object, ssl.SSLObject) else None
        self.tls_version = (tls.version() if tls else None) or "TLS"
        self.tls_context, self.tls_resumed = ctx, tls is not None and tls.session_reused
        if self.on_handshake is not None:
            self.on_handshake(self.tls_resumed)
        return None

    async def _handshake(self, smtp: aiosmtplib.SMTP, ctx: ssl.SSLContext) -> _TlsFail | None:
        try:
            await smtp.starttls(server_hostname=self.sni, tls_context=ctx)
        except ssl.SSLCertVerificationError as exc:
            return _TlsFail(classify_certificate_error(exc), describe(exc), False)
        except SMTPResponseException as exc:
            detail = safe_line(f"STARTTLS refused: {exc.code} {exc.message}")
            return _TlsFail(TlsRptResult.STARTTLS_NOT_SUPPORTED, detail, smtp.is_connected)
        except _ERRORS as exc:
            # Protocol below TLS 1.2 (RFC 8996), aborted handshake, bad SNI name, ...
            detail = f"TLS handshake failed: {describe(exc)}"
            return _TlsFail(TlsRptResult.VALIDATION_FAILURE, detail, False)
        return None

    async def hello_over_tls(self, smtp: aiosmtplib.SMTP) -> bool:
        """EHLO again after the handshake (RFC 3207 §4.2). Its reply is the first read over
        TLS: TLS 1.3 tickets have come by then, so the session is kept now; a session
        that fails here is dropped."""
        ctx = self.tls_context
        if not await self.hello(smtp):
            if ctx is not None:
                _forget_session(ctx, self.sni)
            return False
        ssl_object = smtp.get_transport_info("ssl_object")
        if isinstance(ctx, ResumingContext) and isinstance(ssl_object, ssl.SSLObject):
            ctx.remember(ssl_object)
        return True

    def dane_check(self, smtp: aiosmtplib.SMTP) -> _TlsFail | None:
        """RFC 7672 §3: the chain the server sent must match a usable TLSA record of the MX
        host (relay/delivery/dane.py); checked before any mail command. None on a match."""
        ssl_object = smtp.get_transport_info("ssl_object")
        if not isinstance(ssl_object, ssl.SSLObject):
            return _TlsFail(TlsRptResult.VALIDATION_FAILURE, "no TLS session to check", False)
        verdict = verify_chain(peer_chain(ssl_object), self.tlsa, self.sni, datetime.now(UTC))
        if isinstance(verdict, DaneMatch):
            self.verified, self.dane = True, verdict.record.text
            return None
        return _TlsFail(verdict.result, safe_line(f"DANE: {verdict.detail}"), False)

    async def command(self, smtp: aiosmtplib.SMTP, verb: bytes, *args: bytes) -> Reply | None:
        """The reply to one command, None when the session ended (dropped, or a violation:
        something came before the command was written, or with or after its reply)."""
        if self.unsolicited(smtp):
            return None
        name = verb.decode()
        try:
            response = await smtp.execute_command(verb, *args)
        except SMTPResponseException as exc:  # aiosmtplib could not parse the reply
            self.violated(smtp, f"unreadable reply to {name}: {exc.message}")
            return None
        except _ERRORS as exc:
            self.dropped(name, exc)
            return None
        self.last = f"after {name}"
        if self.unsolicited(smtp):
            return None
        listen(smtp)
        return (response.code, response.message)

    async def data(self, smtp: aiosmtplib.SMTP, message: bytes) -> None:
        """DATA and the message; `completed` is True on entry and stays so unless a
        violation came before the body was written."""
        if self.unsolicited(smtp):
            self.completed = False
            return
        try:
            sent = await send_data(smtp, message, timeout=self.command_timeout)
        except _ERRORS as exc:
            # Never counts as sent: the caller defers (RFC 5321 §6.1 keeps responsibility).
            self.dropped("DATA", exc)
            return
        if sent.reply is not None:
            self.data_reply = (sent.reply.code, sent.reply.message)
        if sent.violation is None:
            listen(smtp)
            return
        self.violated(smtp, sent.violation)
        self.completed = sent.body_sent


def _forget_session(ctx: ssl.SSLContext, sni: str) -> None:
    if isinstance(ctx, ResumingContext):
        ctx.forget(sni)


async def _transaction(conv: _Conversation, smtp: aiosmtplib.SMTP, envelope: Envelope) -> None:
    """MAIL, one RCPT per recipient (each reply kept), DATA if any was accepted."""
    if envelope.requiretls and not smtp.supports_extension("requiretls"):
        # The pool keeps REQUIRETLS connections apart (`connect` checked this one): never
        # reached, but a REQUIRETLS message must never go out without the option.
        conv.no_requiretls("not offered on this connection")
        return
    utf8 = envelope.needs_utf8 and smtp.supports_extension("smtputf8")
    sender_path = path(envelope.sender, utf8)
    if sender_path is None:
        # RFC 6531 §3.2 / RFC 5321 §4.1.2: this envelope cannot be sent to this server.
        conv.mail_reply = (550, "5.6.7 sender address cannot be sent to this server (local)")
        conv.completed = True
        return
    params = mail_params(envelope, smtp.supports_extension, utf8)
    reply = await conv.command(smtp, b"MAIL", b"FROM:" + sender_path, *params)
    if reply is None:
        return
    conv.mail_reply = reply
    if reply[0] // 100 != 2:
        # 5xx: a decision for every recipient (RFC 5321 §4.5.4.1: never cached).
        # Anything else is about this host: try the next one.
        conv.completed = reply[0] // 100 == 5
        if not conv.completed:
            conv.fail_reply("MAIL", *reply)
        return
    for rcpt in envelope.recipients:
        rcpt_path = path(rcpt, utf8)
        if rcpt_path is None:
            conv.rcpt_replies[rcpt] = (553, "5.6.7 recipient address cannot be sent (local)")
            continue
        extra = rcpt_params(envelope, rcpt, smtp.supports_extension)
        reply = await conv.command(smtp, b"RCPT", b"TO:" + rcpt_path, *extra)
        if reply is None:
            return
        conv.rcpt_replies[rcpt] = reply
        if reply[0] == 421:  # the server is closing: this host failed, not the recipient
            conv.fail_reply("RCPT", *reply)
            return
    conv.completed = True
    if any(code // 100 == 2 for code, _ in conv.rcpt_replies.values()):
        await conv.data(smtp, envelope.data)


async def quit_politely(smtp: aiosmtplib.SMTP, within: float) -> None:
    """QUIT (bounded), then close; the transaction is already decided either way."""
    if smtp.is_connected:
        with contextlib.suppress(*_ERRORS, TimeoutError):
            async with asyncio.timeout(within):
                await smtp.quit()
    smtp.close()


async def _secure(
    conv: _Conversation,
    requirement: TlsRequirement,
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> aiosmtplib.SMTP | None:
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
    if conv.requiretls and not smtp.supports_extension("requiretls"):
        # RFC 8689 §4.2.1: the next hop must offer REQUIRETLS after STARTTLS.
        conv.no_requiretls("not offered after STARTTLS")
        await quit_politely(smtp, conv.command_timeout)
        return None
    return smtp


async def _opportunistic(
    conv: _Conversation, smtp: aiosmtplib.SMTP, failed: _TlsFail | None, ctx: ssl.SSLContext
) -> aiosmtplib.SMTP | None:
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

    smtp: aiosmtplib.SMTP
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
    # Each step is bounded by aiosmtplib's timeouts; this bounds the whole: up to three
    # connections, each greeting + EHLO, STARTTLS, EHLO.
    budget = 3 * (dialer.connect_timeout + dialer.command_timeout * 4)
    smtp: aiosmtplib.SMTP | None = None
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
    listen(smtp)  # a reply sent before MAIL is a violation (`transact`)
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
            reset = (250, "") if not reused else await conv.command(conn.smtp, b"RSET")
            if reset is not None and reset[0] // 100 == 2:
                await _transaction(conv, conn.smtp, envelope)
            elif reset is not None:
                conv.fail_reply("RSET", *reset)
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
