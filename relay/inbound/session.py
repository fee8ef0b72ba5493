"""The SMTP server protocol of the listener: aiosmtpd's SMTP with our rules for one session.

Owns what happens inside one client connection before the handler sees a command: admission
(relay/inbound/slots.py counts the slots), errors per session, command and data timeouts
(each answered with 421), the session's lifetime (short for an untrusted client that has
not authenticated, bounded for every client), command lines that must end in CRLF and stay
within the command limit (RFC 5321 §2.3.8, §4.5.3.1.4), envelope path syntax, SMTPUTF8 for
non-ASCII paths (RFC 6531 §3.4), the RFC 3461 DSN parameters and RFC 8689's REQUIRETLS
(taken out before aiosmtpd parses the rest; REQUIRETLS only inside TLS), the rule that MAIL
needs AUTH when `auth.required`, and replies that carry
RFC 3463 codes and never internal details or echoed client text, and the DATA phase: it
reads DATA into one relay/inbound/data.MessageBuffer (no list of lines, no joined copy),
within the listener's DATA memory budget, and answers 552, 451 4.3.1 and 550 5.5.2 (bare CR
or LF, SMUG-01/02) itself once the client has sent the end of data. Whatever way a session
ends, its DATA buffer is freed at once and its task keeps no exception (whose traceback
would keep the buffer alive), and once both its connection and its command loop are over it
lets go of what refers back to it, so that it is freed at once too (`_unlink`). SMTP AUTH
itself is relay/inbound/auth.py's. Knows nothing of relay permission, headers or the store:
those are the handler's (relay/inbound/listener.py), which gets the buffer as
`envelope.message`.

Its cost per session is most of the listener's CPU when every message comes on a new
connection, so some of aiosmtpd 1.4.6 runs here in a leaner form, each transcribed
(tests/unit/test_library_internals.py pins the source it follows): the command loop
(`_serve`, reading through relay/inbound/lines.SessionReader, which gets what the
connection delivers in `data_received`), `connection_made`, MAIL and RCPT with one plain
path and no parameter (`_plain_mail`, `_plain_rcpt`: every check of the general way passes
for them), `push` (no drain() when it would return at once) and the EHLO reply (one write).
The replies, events, logs and limits are the same as aiosmtpd's way
(tests/integration/test_listener_commands.py, test_listener_reading.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, AnyStr, Protocol, cast

from aiosmtpd import smtp as aiosmtpd_smtp
from aiosmtpd.smtp import MISSING, Envelope, Session

from mailqueue.model import DsnRequest
from relay.events import EventLog
from relay.inbound.aiosmtpd_setup import FAST_INIT, init_smtp
from relay.inbound.auth import AuthenticatingSMTP, AuthService
from relay.inbound.data import DataOutcome, MessageBuffer
from relay.inbound.esmtp import (
    MailDsn,
    ParamError,
    RcptDsn,
    has_parameter,
    non_ascii_path,
    path_ok,
    take_mail_dsn,
    take_rcpt_dsn,
    take_requiretls,
)
from relay.inbound.lines import BareLfCommand, LongCommand, SessionReader
from relay.inbound.slots import SessionTable

REPLY_RELAY_DENIED = "554 5.7.1 Relay access denied"
REPLY_TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
REPLY_TIMEOUT = "421 4.4.2 Timeout, closing connection"
REPLY_NOT_AUTHENTICATED_IN_TIME = "421 4.7.0 Not authenticated in time, closing connection"
REPLY_SESSION_TOO_LONG = "421 4.4.2 Session time limit reached, closing connection"
REPLY_INTERNAL = "451 4.3.0 Internal error, try again later"
REPLY_NO_ROOM = "451 4.3.1 Insufficient system storage, try again later"
REPLY_BAD_ADDRESS = "501 5.1.3 Bad address syntax"
REPLY_BARE_LF_COMMAND = "500 5.5.2 Syntax error: command lines must end with CRLF"
REPLY_COMMAND_TOO_LONG = "500 5.5.2 Line too long"
REPLY_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
REPLY_AUTH_REQUIRED = "530 5.7.0 Authentication required"
REPLY_BARE_CRLF = "550 5.5.2 Message contains bare CR or LF"
# RFC 6531 §3.4, §3.7.4.1: a non-ASCII path needs the SMTPUTF8 parameter on MAIL.
REPLY_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter on MAIL"
# RFC 8689 §2: REQUIRETLS is offered, and may be used, only in a TLS session; 5.7.10
# "Encryption needed" (RFC 5248), as mox answers it.
REPLY_REQUIRETLS_NEEDS_TLS = "530 5.7.10 REQUIRETLS is allowed only over TLS (STARTTLS first)"

# aiosmtpd's stock replies that lack an RFC 3463 status, and ours in their place.
_STOCK_REPLIES: dict[str, tuple[str, str | None]] = {
    "555 MAIL FROM parameters not recognized or not implemented": (
        "555 5.5.4 MAIL FROM parameters not recognized or not implemented",
        "mail",
    ),
    "555 RCPT TO parameters not recognized or not implemented": (
        "555 5.5.4 RCPT TO parameters not recognized or not implemented",
        "rcpt",
    ),
    "552 Error: message size exceeds fixed maximum message size": (REPLY_TOO_BIG, "mail"),
    "552 Error: Too much mail data": (REPLY_TOO_BIG, "data"),
    "553 5.1.3 Error: malformed address": (REPLY_BAD_ADDRESS, None),
    "500 Command line too long": (REPLY_COMMAND_TOO_LONG, None),
}
REPLY_UNKNOWN_COMMAND = "500 5.5.2 Command not recognized"
_log = aiosmtpd_smtp.log  # aiosmtpd's logger ("mail.log"): the session logs as aiosmtpd did
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
# The common envelope path: <dot-atom@ASCII-domain>, then the end or one space and a
# parameter. For it aiosmtpd's parser (email's header parser, plus a class it builds on
# every call: ~15% of ingest CPU) returns exactly (the address, the text after the space);
# everything else still goes through aiosmtpd. (That parser strips every character
# str.isspace() knows after the ">", U+0085 among them: so does \s here.)
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?:$| (?=[^\s(]))"
)
# MAIL and RCPT as most clients send them: one plain path, no parameter. Every check of
# the general way passes for these (path_ok, ASCII, no DSN parameter, _SIMPLE_PATH), so
# RelaySMTP answers them directly (_plain_mail, _plain_rcpt), in the same order.
_LDH = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_PLAIN = rf"<({_ATEXT}(?:\.{_ATEXT})*@{_LDH}(?:\.{_LDH})*)>"
_PLAIN_MAIL = re.compile(rf"[Ff][Rr][Oo][Mm]:{_PLAIN}")
_PLAIN_RCPT = re.compile(rf"[Tt][Oo]:{_PLAIN}")
# RFC 5321 §4.5.1: "RCPT TO:<Postmaster>" (any case), with no domain.
_POSTMASTER = re.compile(r" *<postmaster>(?: .*)?", re.IGNORECASE)

# The aiosmtpd arguments relay/inbound/aiosmtpd_setup.init_smtp handles; any other takes
# aiosmtpd's path.
_FAST_INIT_ARGS = {
    "loop",
    "hostname",
    "ident",
    "data_size_limit",
    "enable_SMTPUTF8",
    "decode_data",
    "tls_context",
    "timeout",
}
# aiosmtpd features the session's command loop (RelaySMTP._serve) does not have.
_NOT_SERVED_ARGS = frozenset({"proxy_protocol_timeout", "command_call_limit"})

# No DSN parameter given (the types are frozen: one instance serves every envelope).
_NO_MAIL_DSN = MailDsn()
_NO_RCPT_DSN = RcptDsn()

# Not counted as client errors: our own farewells, and RFC 5321 §4.5.3.1.10's recipient
# limit (a normal way to split a long recipient list).
_NOT_ERRORS = ("421", "452")


_COMMANDS: dict[type, dict[str, Callable[..., Awaitable[None]]]] = {}


def _commands(cls: type) -> dict[str, Callable[..., Awaitable[None]]]:
    """aiosmtpd's table of commands (`_smtp_methods`, {"MAIL": smtp_MAIL, ...}), unbound,
    made once per class rather than bound per connection."""
    table = _COMMANDS.get(cls)
    if table is None:
        table = {m.replace("smtp_", ""): getattr(cls, m) for m in dir(cls) if m.startswith("smtp_")}
        _COMMANDS[cls] = table
    return table


_ECHOING = '500 Error: command "'  # aiosmtpd's reply to an unknown command: it echoes it


def _clean_reply(status: str) -> str:
    """aiosmtpd echoes client text in some replies: never reflect it, never send controls."""
    if status.startswith(_ECHOING):
        return REPLY_UNKNOWN_COMMAND
    if status.isascii() and status.isprintable():  # no control characters: every reply of ours
        return status
    return _CONTROLS.sub("?", status)


def peer_ip(session: Any) -> str:
    peer = getattr(session, "peer", None)
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


def report_error(events: EventLog, client: str, error: str) -> None:
    # Must not raise: aiosmtpd would answer an exception raised here with its text.
    with contextlib.suppress(Exception):
        events.session_error(client=client, error=error)


def write_transport(transport: object) -> asyncio.WriteTransport | None:
    """`transport` as one that writes, whatever loop made it: uvloop's transports have
    asyncio's methods without being subclasses of its classes (isinstance says False)."""
    if transport is not None and callable(getattr(transport, "write", None)):
        return cast("asyncio.WriteTransport", transport)
    return None


class SessionHandler(Protocol):
    """What a session needs of its handler (relay/inbound/listener.py has it)."""

    events: EventLog

    def is_trusted(self, ip: str) -> bool: ...


@dataclass(frozen=True)
class SessionSettings:
    data_timeout: float
    max_errors: int
    auth_required: bool  # every client must AUTH before MAIL, trusted networks included
    auth: AuthService
    untrusted_timeout: float = 30.0  # an untrusted client not authenticated by then is closed
    max_session_time: float = 3600.0  # every session is closed after this many seconds
    implicit_tls: bool = False  # the whole connection is TLS (port 465)


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope plus the RFC 3461 parameters of this transaction."""

    def __init__(self) -> None:
        # Envelope.__init__ (aiosmtpd 1.4.6), inlined: three envelopes per message.
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.smtp_utf8 = False
        self.content: bytes | str | None = None
        self.original_content: bytes | None = None
        self.rcpt_tos: list[str] = []
        self.rcpt_options: list[str] = []
        self.mail_dsn = _NO_MAIL_DSN
        self.rcpt_dsn: dict[str, RcptDsn] = {}
        self.requiretls = False  # MAIL FROM carried REQUIRETLS (RFC 8689), in TLS
        # The content once DATA ended well (original_content stays None: no bytes copy).
        self.message: MessageBuffer | None = None

    def dsn_request(self) -> DsnRequest:
        notify = {r: d.notify for r, d in self.rcpt_dsn.items() if d.notify is not None}
        orcpt = {r: d.orcpt for r, d in self.rcpt_dsn.items() if d.orcpt is not None}
        return DsnRequest(
            ret=self.mail_dsn.ret, envid=self.mail_dsn.envid, notify=notify, orcpt=orcpt
        )


class RelaySMTP(AuthenticatingSMTP):
    """aiosmtpd's SMTP with our limits, syntax checks, AUTH, replies and error handling."""

    # asyncio's FlowControlMixin's (_drain_waits; tests/unit/test_library_internals.py)
    _paused: bool
    _connection_lost: bool

    def __init__(
        self,
        handler: SessionHandler,
        *,
        sessions: SessionTable,
        settings: SessionSettings,
        **kwargs: Any,
    ) -> None:
        if kwargs.keys() & _NOT_SERVED_ARGS:
            raise TypeError(f"RelaySMTP serves no {' or '.join(sorted(_NOT_SERVED_ARGS))}")
        # AUTH needs TLS: after STARTTLS (aiosmtpd checks), or from the first byte on an
        # implicit-TLS port, where aiosmtpd cannot see the TLS and is told not to check.
        if FAST_INIT and kwargs.keys() <= _FAST_INIT_ARGS:
            init_smtp(
                self,
                handler,
                loop=kwargs.get("loop") or asyncio.get_running_loop(),
                hostname=kwargs.get("hostname"),
                ident=kwargs.get("ident") or aiosmtpd_smtp.__ident__,
                data_size_limit=kwargs.get("data_size_limit", aiosmtpd_smtp.DATA_SIZE_DEFAULT),
                enable_smtputf8=kwargs.get("enable_SMTPUTF8", False),
                decode_data=kwargs.get("decode_data", False),
                tls_context=kwargs.get("tls_context"),
                timeout=kwargs.get("timeout", 300),
                auth_require_tls=not settings.implicit_tls,
            )
        else:
            super().__init__(handler, auth_require_tls=not settings.implicit_tls, **kwargs)
        self._sessions = sessions
        self._settings = settings
        self._events = handler.events
        self._trust = handler.is_trusted
        self._auth = settings.auth
        self._client = ""
        self._trusted = False
        self._admitted = False
        self._started = 0.0
        self._end_at = float("inf")  # loop time at which the session ends, whatever it does
        self._errors = 0
        self._in_data = False
        self._corked: list[bytes] | None = None  # replies held back (smtp_EHLO)
        self._served = False  # the command loop has ended
        self._lost = False  # the connection is lost
        self._storing = False  # the handler has the message, the client awaits its reply
        self._data_timer_at = float("-inf")
        self._deadline = 0.0  # loop time at which the current timeout ends
        self._stream: asyncio.StreamReader  # set once connected (_cb_client_connected)
        self._lines: SessionReader | None = None  # what is received (_cb_client_connected)

    # --- connection life ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # the TCP connection, not the TLS layer after STARTTLS
            peer = transport.get_extra_info("peername")
            self._client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            self._trusted = self._trust(self._client)
            refusal = self._sessions.admit(self, self._client, trusted=self._trusted)
            if refusal is not None:
                self._events.rejected(
                    client=self._client, stage="connect", code=refusal[:9], reason=refusal[10:]
                )
                writer = write_transport(transport)
                if writer is not None:
                    writer.write(refusal.encode() + b"\r\n")
                transport.close()
                return
            self._admitted = True
            self._started = self.loop.time()
            lifetime = self._settings.max_session_time
            if not self._trusted:  # until it authenticates
                lifetime = min(lifetime, self._settings.untrusted_timeout)
            self._end_at = self._started + lifetime
            # aiosmtpd 1.4.6's connection_made for a new connection (its peer looked up once).
            self._set_rset_state()  # type: ignore[no-untyped-call]
            self.session = self._create_session()
            self.session.peer = peer
            self._reset_timeout()
            asyncio.StreamReaderProtocol.connection_made(self, transport)
            self.transport = transport
            _log.info("Peer: %r", peer)
            self._handler_coroutine = self.loop.create_task(self._handle_client())
            return
        # The TLS layer after STARTTLS: aiosmtpd drops the cleartext its reader holds (RFC
        # 3207 §4.2, commands pipelined behind STARTTLS); ours too.
        if self._lines is not None:
            self._lines.discard()
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted:
            self._unlink()  # refused: no command loop runs
            return
        self._sessions.leave(self, self._client)
        super().connection_lost(error)
        if self._lines is not None:
            self._lines.wake()  # its StreamReader has the EOF or the error
        self._lost = True
        if self._served:
            self._unlink()

    async def _handle_client(self) -> None:
        try:
            await self._serve()
        except (asyncio.CancelledError, ConnectionError):
            # The client is gone (closed, reset, timed out, stopped). The task ends quietly:
            # a task that keeps its exception keeps its traceback, so this session's frames
            # and all they held, in a reference cycle (session, task, exception) that only
            # a full garbage collection breaks (issue 11: 50 MiB DATA buffers stayed).
            return
        finally:
            self._served = True
            if self._lost:
                self._unlink()

    def _unlink(self) -> None:
        """The connection and its command loop are both over: drop what refers back to
        this object (its StreamWriter, aiosmtpd's tables of bound methods, the connected
        callback), so that the session is freed when the server lets go of it rather than
        by a pass of the cyclic garbage collector (which found some 25 objects of each
        session to free, at a tenth of a message's CPU)."""
        self._writer = None  # type: ignore[assignment]  # nothing writes any more
        self._client_connected_cb = None
        self._smtp_methods, self._handle_hooks, self._auth_methods = {}, {}, {}

    def _authenticated(self) -> None:
        # An authenticated client keeps its session up to the maximum lifetime.
        self._end_at = self._started + self._settings.max_session_time
        self._reset_timeout()

    def eof_received(self) -> bool | None:
        if not self._admitted:
            return False
        result: bool | None = super().eof_received()
        if self._lines is not None:
            self._lines.wake()
        return result

    def _cb_client_connected(self, reader: Any, writer: Any) -> None:
        self._stream = reader
        self._lines = SessionReader(
            reader, writer.transport, limit=self.line_length_limit, loop=self.loop
        )
        super()._cb_client_connected(cast(asyncio.StreamReader, self._lines), writer)

    def data_received(self, data: bytes) -> None:
        # Into the SessionReader, not through the StreamReader (StreamReaderProtocol's
        # data_received): the session reads it there.
        lines = self._lines
        if lines is not None:
            lines.feed(data)

    async def _serve(self) -> None:
        """aiosmtpd 1.4.6's SMTP._handle_client for the listener's sessions, which use
        neither the PROXY protocol nor command call limits (__init__ refuses both): the
        same replies, checks, logs and error handling, in the same order, with command
        lines from SessionReader (a bare LF or an over-long line raises, and is answered
        through handle_exception as before)."""
        _log.info("%r handling connection", self._peer())
        await self.push(f"220 {self.hostname} {self.__ident__}")
        bogus_budget = aiosmtpd_smtp.BOGUS_LIMIT
        lines = cast(SessionReader, self._lines)  # connected
        methods = _commands(type(self))
        limits = self.command_size_limits
        while self.transport is not None:
            try:
                line = await lines.command_line()
                session = cast(Session, self.session)
                if _log.isEnabledFor(logging.INFO):  # (so is it for DEBUG)
                    self._log_line(line)
                line = line.rstrip(b"\r\n")
                if not line:
                    await self.push("500 Error: bad syntax")
                    continue
                command_bytes, _, arg_bytes = line.partition(b" ")
                try:
                    command = command_bytes.upper().decode("ascii")
                except UnicodeDecodeError:
                    await self.push("500 Error: bad syntax")
                    continue
                arg: str | None = None
                if arg_bytes:
                    arg_bytes = arg_bytes.strip()
                    if self.enable_SMTPUTF8:
                        arg = str(arg_bytes, encoding="utf-8", errors="surrogateescape")
                    else:
                        try:
                            arg = str(arg_bytes, encoding="ascii", errors="strict")
                        except UnicodeDecodeError:
                            await self.push("500 Error: strict ASCII mode")
                            continue
                # (aiosmtpd's lookup, which adds the command to its shared table)
                max_sz = limits[command] if session.extended_smtp else self.command_size_limit
                if len(line) > max_sz:
                    await self.push("500 Command line too long")
                    continue
                if not self._tls_handshake_okay and command != "QUIT":
                    await self.push("554 Command refused due to lack of security")
                    continue
                if (
                    self.require_starttls
                    and not self._tls_protocol
                    and command not in aiosmtpd_smtp.ALLOWED_BEFORE_STARTTLS
                ):
                    await self.push("530 Must issue a STARTTLS command first")
                    continue
                method = methods.get(command)
                if method is None:
                    _log.warning("%r unrecognised: %s", session.peer, command)
                    bogus_budget -= 1
                    if bogus_budget < 1:
                        _log.warning("%r too many bogus commands", session.peer)
                        await self.push("502 5.5.1 Too many unrecognized commands, goodbye.")
                        self.transport.close()
                        continue
                    await self.push(f'500 Error: command "{command}" not recognized')
                    continue
                self._reset_timeout()
                await method(self, arg)
            except (asyncio.CancelledError, ConnectionResetError):
                _log.info("%r Connection lost during _handle_client()", self._peer())
                self._writer.close()
                raise
            except Exception as error:  # noqa: BLE001 - answered, as aiosmtpd does
                await self._answer_exception(error)

    def _log_line(self, line: bytes) -> None:
        """aiosmtpd's two logs of a command line (the AUTH secret masked)."""
        if _log.isEnabledFor(logging.DEBUG):
            aiosmtpd_smtp.sanitized_log(_log.debug, "_handle_client readline: %r", line)
        aiosmtpd_smtp.sanitized_log(_log.info, "%r >> %r", self._peer(), line.rstrip(b"\r\n"))

    def _peer(self) -> Any:
        """What aiosmtpd logs as the client (`session.peer`)."""
        return None if self.session is None else self.session.peer

    async def _answer_exception(self, error: Exception) -> None:
        """aiosmtpd's answer to an exception raised by a command."""
        status = None
        try:
            status = await self.handle_exception(error)
        except Exception as inner_error:  # noqa: BLE001 - aiosmtpd's own fallback
            try:
                _log.exception("%r Exception in handle_exception()", self._peer())
                status = f"500 Error: ({inner_error.__class__.__name__}) {inner_error}"
            except Exception:  # noqa: BLE001
                status = "500 Error: Cannot describe error"
        finally:
            if isinstance(error, aiosmtpd_smtp.TLSSetupException):
                cast(asyncio.BaseTransport, self.transport).close()
                self.connection_lost(error)
            else:
                await self.push(cast(str, status))

    def _restart_data_timer(self) -> None:
        # A timer per DATA line costs ~10% of ingest CPU; restarting at most every second
        # keeps the data timeout within a second of its setting (RFC 5321 §4.5.3.2).
        now = time.monotonic()
        if now - self._data_timer_at >= 1.0:
            self._data_timer_at = now
            self._reset_timeout(self._settings.data_timeout)

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels and schedules a timer on every command. Instead one armed timer
        # is kept while it is due no later than the new deadline: when it fires early it
        # arms itself again for what is left (_timer_due), so the timeout is exact. The
        # session's end caps every deadline: the same timer enforces it.
        now = self.loop.time()
        self._deadline = min(now + (duration or self._timeout_duration), self._end_at)
        handle = self._timeout_handle
        if handle is not None:
            if not handle.cancelled() and now < handle.when() <= self._deadline:
                return
            handle.cancel()
        self._timeout_handle = self.loop.call_at(self._deadline, self._timer_due)

    def _timer_due(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timer_due)
        elif self._storing:
            # The whole message is here and being stored: closing now could lose the 250
            # of a stored message (a duplicate when the client sends it again).
            self._timeout_handle = self.loop.call_later(1.0, self._timer_due)
        else:
            self._timeout_cb()

    def _timeout_cb(self) -> None:
        # RFC 5321 §4.5.3.2: the server may close after a timeout; tell the client why.
        if self._deadline >= self._end_at:  # the session's lifetime is over
            stage = "session"
            authenticated = self.session is not None and self.session.authenticated
            if self._trusted or authenticated:
                reply, reason = REPLY_SESSION_TOO_LONG, "session time limit"
            else:
                reply, reason = REPLY_NOT_AUTHENTICATED_IN_TIME, "untrusted session timeout"
        else:
            stage = "data" if self._in_data else "command"
            reply, reason = REPLY_TIMEOUT, f"{stage} timeout"
        with contextlib.suppress(Exception):
            self._events.rejected(client=self._client, stage=stage, code=reply[:9], reason=reason)
        writer = write_transport(self.transport)
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.write(reply.encode() + b"\r\n")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def _create_envelope(self) -> RelayEnvelope:
        return RelayEnvelope()

    @property
    def relay_envelope(self) -> RelayEnvelope:
        return cast(RelayEnvelope, self.envelope)

    def tls_version(self) -> str | None:
        """The negotiated TLS version ("TLSv1.3") of this session, or None in cleartext."""
        transport = self.transport
        ssl_obj = transport.get_extra_info("ssl_object") if transport is not None else None
        version = ssl_obj.version() if ssl_obj is not None else None
        return str(version) if version else None

    # --- replies ---

    async def push(self, status: AnyStr) -> None:
        if not isinstance(status, str):
            if self._put(status):
                await self._writer.drain()
            return
        stock = _STOCK_REPLIES.get(status)
        if stock is not None:
            status, stage = stock
            if stage is not None:
                self.reject(stage, status, "message too big" if "5.3.4" in status else status)
        elif not (
            status.isascii() and status.isprintable() and not status.startswith(_ECHOING)
        ):  # (every reply of ours is printable ASCII)
            status = _clean_reply(status)
        if self._put(status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")):
            await self._writer.drain()
        if status[:1] in ("4", "5") and status[:3] not in _NOT_ERRORS:
            self._errors += 1
            if self._errors >= self._settings.max_errors and self.transport is not None:
                self.reject("session", REPLY_TOO_MANY_ERRORS, "too many errors")
                must_drain = self._put(REPLY_TOO_MANY_ERRORS.encode())
                if self._corked is not None:
                    must_drain = self._uncork()  # all replies out before closing
                if must_drain:
                    await self._writer.drain()
                self.transport.close()

    def _put(self, response: bytes) -> bool:
        """aiosmtpd's push of an encoded reply, up to its drain(): True if that must be
        awaited. It need not when it would return at once, neither waiting nor raising
        (`_drain_waits`): a drain() less per reply, and the lines of a multiline reply can
        be held back and written together (smtp_EHLO) until then."""
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("%r << %r", self._peer(), response)
        if self._corked is None:
            self._writer.write(response + b"\r\n")
            return self._drain_waits()
        self._corked.append(response + b"\r\n")
        return self._drain_waits() and self._uncork()

    def _drain_waits(self) -> bool:
        """Whether drain() would wait or raise: the transport is paused or closing, the
        connection is lost, or the reader holds an error (StreamWriter.drain,
        FlowControlMixin._drain_helper)."""
        return bool(
            self._paused
            or self._connection_lost
            or self._writer.transport.is_closing()
            or self._stream.exception() is not None
        )

    @aiosmtpd_smtp.syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        # aiosmtpd pushes its reply line by line (a write and a drain each, nine or so):
        # the same lines go out in one write, the same bytes in the same order.
        self._corked = []
        try:
            await super().smtp_EHLO(hostname)
        finally:
            corked, self._corked = self._corked, None
            if corked:
                self._writer.write(b"".join(corked))
                if self._drain_waits():
                    await self._writer.drain()

    def _uncork(self) -> bool:
        """Write the replies held back so far, if any; True if drain() must be awaited."""
        if self._corked:
            self._writer.write(b"".join(self._corked))
            self._corked.clear()
        return self._drain_waits()

    def transaction_done(self) -> None:
        """A message was accepted: the client is working, its error count starts again."""
        self._errors = 0

    def reject(self, stage: str, reply: str, reason: str, rcpt: str | None = None) -> None:
        """Log a refusal as a `rejected` event (`reply` starts "554 5.7.1 ...")."""
        sender = self.envelope.mail_from if self.envelope is not None else None
        self._events.rejected(
            client=self._client or peer_ip(self.session),
            stage=stage,
            code=" ".join(reply.split(" ", 2)[:2]),  # "530 5.7.10" as well as "554 5.7.1"
            reason=reason,
            sender=None if sender is None else ("" if sender == "<>" else sender),
            rcpt=rcpt,
        )

    async def _refuse(self, stage: str, reply: str, reason: str) -> None:
        self.reject(stage, reply, reason)
        await self.push(reply)

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default answers 500 with the exception's text: never show internals.
        if isinstance(error, BareLfCommand):
            return REPLY_BARE_LF_COMMAND
        if isinstance(error, LongCommand):
            return REPLY_COMMAND_TOO_LONG
        report_error(self._events, self._client, repr(error))
        self.envelope = self._create_envelope()  # a half-done transaction is void
        return REPLY_INTERNAL

    # --- commands ---

    def _extended(self) -> bool:
        return (
            self.session is not None
            and bool(self.session.host_name)
            and bool(self.session.extended_smtp)
        )

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        simple = _SIMPLE_PATH.match(arg)
        if simple is not None:
            address = simple.group(1)
            limit = self.local_part_limit
            if not limit or len(address.rpartition("@")[0]) <= limit:
                return address, arg[simple.end() :]
        result: tuple[str | None, str | None] = super()._getaddr(arg)
        return result

    async def smtp_MAIL(self, arg: str | None) -> None:
        rest = arg[5:] if arg is not None and arg[:5].upper() == "FROM:" else None
        session = self.session
        required = self._settings.auth_required
        if required and session is not None and session.host_name and not session.authenticated:
            await self._refuse("mail", REPLY_AUTH_REQUIRED, "authentication required")
            return
        plain = _PLAIN_MAIL.fullmatch(arg) if arg is not None else None
        if plain is not None and await self._plain_mail(plain.group(1)):
            return
        if rest is not None and not path_ok(rest, null_ok=True):
            await self._refuse("mail", REPLY_BAD_ADDRESS, "bad sender address syntax")
            return
        if (
            rest is not None
            and non_ascii_path(rest, null_ok=True)
            and not has_parameter(rest, "SMTPUTF8", null_ok=True)
        ):
            await self._refuse("mail", REPLY_NEEDS_SMTPUTF8, "non-ASCII sender without SMTPUTF8")
            return
        envelope = self.relay_envelope
        dsn = _NO_MAIL_DSN
        requiretls = False
        if rest is not None and self._extended() and envelope.mail_from is None:
            try:
                rest, dsn = take_mail_dsn(rest)
                rest, requiretls = take_requiretls(rest)
            except ParamError as exc:
                await self._refuse("mail", exc.reply, exc.reply[10:])
                return
            if requiretls and self.tls_version() is None:
                # RFC 8689 §2: only in a session that itself uses TLS (RTLS-02).
                await self._refuse("mail", REPLY_REQUIRETLS_NEEDS_TLS, "REQUIRETLS without TLS")
                return
            arg = "FROM:" + rest
        had_sender = envelope.mail_from is not None
        await super().smtp_MAIL(arg)
        if not had_sender and envelope.mail_from is not None:
            envelope.mail_dsn = dsn
            envelope.requiretls = requiretls

    async def smtp_RCPT(self, arg: str | None) -> None:
        plain = _PLAIN_RCPT.fullmatch(arg) if arg is not None else None
        if plain is not None and await self._plain_rcpt(plain.group(1)):
            return
        rest = arg[3:] if arg is not None and arg[:3].upper() == "TO:" else None
        if rest is not None and _POSTMASTER.fullmatch(rest):
            # RFC 5321 §4.5.1: the one path without a domain; the handler answers it.
            await super().smtp_RCPT(arg)
            return
        if rest is not None and not path_ok(rest, null_ok=False):
            await self._refuse("rcpt", REPLY_BAD_ADDRESS, "bad recipient address syntax")
            return
        if (
            rest is not None
            and self.envelope is not None
            and self.envelope.mail_from is not None
            and not self.envelope.smtp_utf8
            and non_ascii_path(rest, null_ok=False)
        ):
            await self._refuse("rcpt", REPLY_NEEDS_SMTPUTF8, "non-ASCII recipient without SMTPUTF8")
            return
        dsn = _NO_RCPT_DSN
        if rest is not None and self._extended() and self.relay_envelope.mail_from is not None:
            try:
                rest, dsn = take_rcpt_dsn(rest)
            except ParamError as exc:
                await self._refuse("rcpt", exc.reply, exc.reply[10:])
                return
            arg = "TO:" + rest
        envelope = self.relay_envelope
        before = len(envelope.rcpt_tos)
        await super().smtp_RCPT(arg)
        if self.envelope is envelope and len(envelope.rcpt_tos) > before:
            envelope.rcpt_dsn[envelope.rcpt_tos[-1]] = dsn

    def _plain_ok(self, address: str) -> bool:
        """Whether aiosmtpd's own checks before its hook pass for a plain path (HELO
        seen, no AUTH requirement of its own, the local part within its limit)."""
        session = self.session
        limit = self.local_part_limit
        return (
            session is not None
            and bool(session.host_name)
            and not self._auth_required
            and (not limit or len(address.rpartition("@")[0]) <= limit)
        )

    async def _plain_mail(self, address: str) -> bool:
        """MAIL FROM:<address> without parameters, as smtp_MAIL's general way answers it
        (aiosmtpd's smtp_MAIL after our checks, then no DSN and no REQUIRETLS); False
        (nothing done) when that way would find more to check."""
        envelope = self.relay_envelope
        if envelope.mail_from is not None or not self._plain_ok(address):
            return False
        envelope.smtp_utf8 = False
        hook = self._handle_hooks.get("MAIL")
        status = MISSING if hook is None else await hook(self, self.session, envelope, address, [])
        if status is MISSING:
            envelope.mail_from = address
            status = "250 OK"
        _log.info("%r sender: %s", self._peer(), address)
        await self.push(status)
        if envelope.mail_from is not None:
            envelope.mail_dsn = _NO_MAIL_DSN
            envelope.requiretls = False
        return True

    async def _plain_rcpt(self, address: str) -> bool:
        """RCPT TO:<address> without parameters, as smtp_RCPT's general way answers it
        (our checks pass, then aiosmtpd's smtp_RCPT, then no DSN); False (nothing done)
        when that way would find more to check."""
        envelope = self.relay_envelope
        if not envelope.mail_from or not self._plain_ok(address):
            return False
        before = len(envelope.rcpt_tos)
        hook = self._handle_hooks.get("RCPT")
        status = MISSING if hook is None else await hook(self, self.session, envelope, address, [])
        if status is MISSING:
            envelope.rcpt_tos.append(address)
            status = "250 OK"
        _log.info("%r recip: %s", self._peer(), address)
        await self.push(status)
        if self.envelope is envelope and len(envelope.rcpt_tos) > before:
            envelope.rcpt_dsn[envelope.rcpt_tos[-1]] = _NO_RCPT_DSN
        return True

    async def smtp_DATA(self, arg: str | None) -> None:
        self._in_data = True
        self._data_timer_at = float("-inf")  # the first DATA line starts the data timeout
        try:
            await self._data(arg)
        finally:
            self._in_data = False
        if self.transport is not None:
            self._reset_timeout()  # back to the command timeout

    async def _data(self, arg: str | None) -> None:
        """aiosmtpd 1.4.6's smtp_DATA (decode_data=False), reading into one buffer."""
        session = cast(Session, self.session)
        if (
            # aiosmtpd's checks, which answer (awaited only then: two coroutines less).
            (not session.host_name or (self._auth_required and not session.authenticated))
            and (await self.check_helo_needed() or await self.check_auth_needed("DATA"))
        ):
            return
        envelope = self.relay_envelope
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        if self._sessions.data.full:
            # Issue 11: the DATA of all sessions together is bounded; this one waits.
            await self._refuse("data", REPLY_NO_ROOM, "too much data in flight")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        message = await self._read_data()
        if message is None:
            return  # the connection went away: nothing is handed over
        try:
            await self._end_of_data(envelope, message)
        finally:
            envelope.message = None
            message.release()  # the store has its copy, or there is none to keep

    async def _end_of_data(self, envelope: RelayEnvelope, message: MessageBuffer) -> None:
        outcome = message.outcome
        # RFC 5321 §4.2.5: the reply waits for the end of data, as in aiosmtpd.
        if outcome is DataOutcome.TOO_MUCH:
            await self._refuse("data", REPLY_TOO_BIG, "message too big")
        elif outcome is DataOutcome.NO_ROOM:
            await self._refuse("data", REPLY_NO_ROOM, "too much data in flight")
        elif outcome is DataOutcome.BARE_NEWLINE:
            # RFC 5321 §2.3.8 and the 2023 smuggling attacks: refuse, never forward.
            await self._refuse("data", REPLY_BARE_CRLF, "bare CR or LF in message")
        if outcome is not DataOutcome.OK:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        envelope.message = message
        status = MISSING
        self._storing = True
        try:
            if "DATA" in self._handle_hooks:
                status = await self._call_handler_hook("DATA")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push("250 OK" if status is MISSING else status)
        finally:
            self._storing = False

    async def _read_data(self) -> MessageBuffer | None:
        """The DATA section up to its end; None if the connection went away first. However
        it ends, the buffer is released here unless it is returned."""
        message: MessageBuffer | None = MessageBuffer(self.data_size_limit, self._sessions.data)
        # Whatever arrived at once, in one part (lines, or the piece of a long line,
        # never a bare CR/LF's partner cut off: SessionReader); each part restarts the
        # data timeout as each line did.
        lines, restart_timer = cast(SessionReader, self._lines), self._restart_data_timer
        limit = self.line_length_limit
        lines.begin_data()
        try:
            while self.transport is not None and message is not None:
                part, end = await lines.data_block()
                restart_timer()
                message.feed_block(part, limit)
                if end:
                    done, message = message, None
                    return done
            return None
        except asyncio.CancelledError:
            self._writer.close()  # connection lost or timed out during DATA
            raise
        finally:
            if message is not None:
                message.release()  # not handed over: freed now, not when a GC runs
