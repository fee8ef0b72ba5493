"""The SMTP server protocol of the listener: aiosmtpd's SMTP with our rules for one session.

RelaySMTP ties together the layers of one client connection, each a class of its own
module that subclasses the one before it (and imports nothing above it):

- auth.AuthenticatingSMTP: SMTP AUTH (PLAIN, LOGIN) against the users file;
- command_loop.CommandLoop: the command loop and the writing of replies, transcribed
  leaner from aiosmtpd 1.4.6 (reading through relay/inbound/lines.SessionReader);
- replies.SessionReplies: the reply texts (RFC 3463 codes, never internal details or
  echoed client text), errors per session, `rejected` events, exceptions answered;
- lifetime.SessionLifetime: admission, command and data timeouts, the session's lifetime,
  and letting go of the session when it ends;
- envelope.EnvelopeCommands: RelayEnvelope, MAIL and RCPT (path syntax, SMTPUTF8, DSN
  parameters, REQUIRETLS, AUTH required), plain commands answered directly;

all modules of relay/inbound/, with settings.SessionSettings for all. RelaySMTP sets up each
session's state for these layers (through relay/inbound/aiosmtpd_setup.init_smtp, without
aiosmtpd's introspection), and owns the DATA phase: it reads DATA into one
relay/inbound/data.MessageBuffer (no list of lines, no joined copy), within the listener's
DATA memory budget, and answers 552, 451 4.3.1 and 550 5.5.2 (bare CR or LF, SMUG-01/02)
itself once the client has sent the end of data (`_data`, transcribed from aiosmtpd's
smtp_DATA, whose source tests/unit/test_library_internals.py pins). Whatever way a session
ends, its DATA buffer is freed at once. Knows nothing of relay permission, headers or the
store: those are the handler's (relay/inbound/listener.py), which gets the buffer as
`envelope.message`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, cast

from aiosmtpd import smtp as aiosmtpd_smtp
from aiosmtpd.smtp import MISSING, Session

from relay.events import EventLog
from relay.inbound.aiosmtpd_setup import FAST_INIT, init_smtp
from relay.inbound.data import DataOutcome, MessageBuffer
from relay.inbound.envelope import EnvelopeCommands, RelayEnvelope
from relay.inbound.lines import SessionReader
from relay.inbound.replies import REPLY_BARE_CRLF, REPLY_NO_ROOM, REPLY_TOO_BIG
from relay.inbound.settings import SessionSettings
from relay.inbound.slots import SessionTable

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
# aiosmtpd features the session's command loop (command_loop.CommandLoop._serve) lacks.
_NOT_SERVED_ARGS = frozenset({"proxy_protocol_timeout", "command_call_limit"})


class SessionHandler(Protocol):
    """What a session needs of its handler (relay/inbound/listener.py has it)."""

    events: EventLog

    def is_trusted(self, ip: str) -> bool: ...


class RelaySMTP(EnvelopeCommands):
    """aiosmtpd's SMTP with our limits, syntax checks, AUTH, replies and error handling."""

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
        # The state of each layer, as its class declares it.
        self._sessions = sessions
        self._settings = settings
        self._events = handler.events
        self._trust = handler.is_trusted
        self._auth = settings.auth
        self._client = ""
        self._trusted = False
        self._admitted = False
        self._started = 0.0
        self._end_at = float("inf")
        self._errors = 0
        self._in_data = False
        self._corked = None
        self._served = False
        self._lost = False
        self._storing = False
        self._data_timer_at = float("-inf")
        self._deadline = 0.0
        self._lines = None  # (and `_stream`) set once connected (_cb_client_connected)

    # --- DATA ---

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
