"""How long a listener's session lives: admission, timeouts, lifetime and its end.

Owns what happens to one client connection around its commands: admission
(relay/inbound/slots.py counts the slots; a refused client gets the 421 and is closed),
command and data timeouts (each answered with 421; one timer, moved rather than made again
for each command, and restarted at most once a second during DATA), the session's
lifetime (short for an untrusted client that has not authenticated, bounded for every
client; both answered with 421), the store's reply not cut off by a timeout, and the end:
whatever way a session ends, its task keeps no exception (whose traceback would keep its
DATA buffer alive), and once both its connection and its command loop are over it lets go
of what refers back to it, so that it is freed at once too (`_unlink`). Also the TLS
version of the connection. `connection_made` for a new connection is aiosmtpd 1.4.6's,
transcribed (tests/unit/test_library_internals.py pins its source). Runs
relay/inbound/command_loop.py's loop as the connection's task; knows nothing of the
commands it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import cast

from aiosmtpd import smtp as aiosmtpd_smtp

from relay.inbound.replies import (
    REPLY_NOT_AUTHENTICATED_IN_TIME,
    REPLY_SESSION_TOO_LONG,
    REPLY_TIMEOUT,
    SessionReplies,
)
from relay.inbound.slots import SessionTable

_log = aiosmtpd_smtp.log  # aiosmtpd's logger ("mail.log"): the session logs as aiosmtpd did


def write_transport(transport: object) -> asyncio.WriteTransport | None:
    """`transport` as one that writes, whatever loop made it: uvloop's transports have
    asyncio's methods without being subclasses of its classes (isinstance says False)."""
    if transport is not None and callable(getattr(transport, "write", None)):
        return cast("asyncio.WriteTransport", transport)
    return None


class SessionLifetime(SessionReplies):
    """The session's admission, timers, lifetime and end; a subclass sets the attributes
    below per session (RelaySMTP.__init__)."""

    _sessions: SessionTable
    _trust: Callable[[str], bool]  # whether a client address is trusted
    _trusted: bool
    _admitted: bool
    _started: float
    _end_at: float  # loop time at which the session ends, whatever it does
    _served: bool  # the command loop has ended
    _lost: bool  # the connection is lost
    _storing: bool  # the handler has the message, the client awaits its reply
    _in_data: bool
    _data_timer_at: float
    _deadline: float  # loop time at which the current timeout ends

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

    # --- timeouts ---

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

    def tls_version(self) -> str | None:
        """The negotiated TLS version ("TLSv1.3") of this session, or None in cleartext."""
        transport = self.transport
        ssl_obj = transport.get_extra_info("ssl_object") if transport is not None else None
        version = ssl_obj.version() if ssl_obj is not None else None
        return str(version) if version else None
