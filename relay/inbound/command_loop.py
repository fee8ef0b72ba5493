"""How a listener's session reads commands and writes replies: aiosmtpd's, made leaner.

Its cost per session is most of the listener's CPU when every message comes on a new
connection, so some of aiosmtpd 1.4.6 runs here in a leaner form, each transcribed
(tests/unit/test_library_internals.py pins the source it follows): the command loop
(`_serve`, from `_handle_client`: the same replies, checks, logs and error handling, in the
same order), which reads command lines through relay/inbound/lines.SessionReader (it gets
what the connection delivers in `data_received`, not through the StreamReader), and the
writing of replies (`_put`: aiosmtpd's `push` once the text is decided, with no drain()
when it would return at once; the EHLO reply in one write). The replies, events, logs and
limits are the same as aiosmtpd's way (tests/integration/test_listener_commands.py,
test_listener_reading.py).

Knows nothing of what the session answers on its own (relay/inbound/replies.py's `push`
decides the text, then writes here), of timeouts and the session's end
(relay/inbound/lifetime.py, which runs `_serve` as the connection's task) or of the
commands themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiosmtpd import smtp as aiosmtpd_smtp
from aiosmtpd.smtp import Session

from relay.inbound.auth import AuthenticatingSMTP
from relay.inbound.lines import SessionReader

_log = aiosmtpd_smtp.log  # aiosmtpd's logger ("mail.log"): the session logs as aiosmtpd did

_COMMANDS: dict[type, dict[str, Callable[..., Awaitable[None]]]] = {}


def _commands(cls: type) -> dict[str, Callable[..., Awaitable[None]]]:
    """aiosmtpd's table of commands (`_smtp_methods`, {"MAIL": smtp_MAIL, ...}), unbound,
    made once per class rather than bound per connection."""
    table = _COMMANDS.get(cls)
    if table is None:
        table = {m.replace("smtp_", ""): getattr(cls, m) for m in dir(cls) if m.startswith("smtp_")}
        _COMMANDS[cls] = table
    return table


class CommandLoop(AuthenticatingSMTP):
    """aiosmtpd's SMTP (with relay/inbound/auth.py's AUTH) run by our command loop; a
    subclass sets `_lines` and `_corked` to None per session, before it is connected."""

    # asyncio's FlowControlMixin's (_drain_waits; tests/unit/test_library_internals.py)
    _paused: bool
    _connection_lost: bool
    _stream: asyncio.StreamReader  # set once connected (_cb_client_connected)
    _lines: SessionReader | None  # what is received (_cb_client_connected)
    _corked: list[bytes] | None  # replies held back (smtp_EHLO)

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
        neither the PROXY protocol nor command call limits (RelaySMTP refuses both): the
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

    # --- replies written ---

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
