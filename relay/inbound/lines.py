"""How the listener reads a client connection: command lines, AUTH answers and DATA.

Owns the line discipline of a session: only CRLF ends a command line (RFC 5321 §2.3.8; a
bare LF is refused, SMUG-04), a command line longer than the reader's limit is read to its
end and answered as too long (§4.5.3.1.4) rather than taken apart, and the end of DATA is
CRLF.CRLF alone (§4.1.1.4, SMUG-03). Knows nothing of commands, replies or DATA content
(the session answers: relay/inbound/command_loop.py reads commands through it, session.py
DATA; relay/inbound/data.py keeps the content).

What the connection delivers is held here as it comes (the protocol's data_received, not
through its StreamReader); command lines are cut out of it with bytes.find, and DATA is
handed over as much at a time as arrived (whole lines, found and unstuffed a part at a time
by relay/inbound/data.py) rather than a line per read. Each reading keeps the semantics the
session had when it read through StreamReader.readuntil() with the same `limit` (the
listener's line_length_limit, 1001): the same lines, the same long-line handling, the same
moments at which DATA counts as received (the data timeout restarts), the same flow
control, and the same bytes left for the next command after the end of DATA (a pipelining
client, RFC 2920). tests/unit/test_inbound_lines.py compares the two.
"""

from __future__ import annotations

import asyncio
from typing import Any

_DATA_END = b"\r\n.\r\n"


class BareLfCommand(Exception):
    """A command line ended with LF alone (RFC 5321 §2.3.8: only CRLF ends a line)."""


class LongCommand(Exception):
    """A command line longer than the reader's limit (RFC 5321 §4.5.3.1.4); drained."""


class SessionReader:
    """What a session receives, and reads: command lines (`command_line`), AUTH answers
    (`readline`, as StreamReader.readline) and DATA (`data_block`).

    The protocol hands every received chunk to `feed` (its data_received) instead of to
    its StreamReader, and calls `wake` when that StreamReader learns of the end of the
    connection (EOF or an error: read from it here, as StreamReader.read would raise it).
    Flow control is the StreamReader's: reading is paused while more than twice `limit`
    bytes are held, and resumed once at most `limit` are, or when a read must wait.

    aiosmtpd calls this its `_reader`: on STARTTLS it sets `_transport` (the TLS layer's,
    paused and resumed from then on) and clears the StreamReader's buffer (the session
    drops what is held here then: `discard`); any other attribute is the StreamReader's.
    """

    __slots__ = (
        "_held",
        "_limit",
        "_line_start",
        "_loop",
        "_paused",
        "_pos",
        "_stream",
        "_transport",
        "_waiter",
    )

    def __init__(
        self,
        stream: asyncio.StreamReader,
        transport: asyncio.BaseTransport | None,
        *,
        limit: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._stream = stream  # its EOF and error only: it is fed nothing
        self._limit = limit
        self._loop = loop
        self._transport: Any = transport
        # Received and not handed out yet: _held[_pos:] (an index, not a copy per line, so
        # many pipelined lines cost no more than one read of them).
        self._held = b""
        self._pos = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._line_start = True  # DATA: what is held starts a line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def feed(self, data: bytes) -> None:
        """Bytes received (StreamReader.feed_data)."""
        if not data:
            return
        held, pos = self._held, self._pos
        self._held = held[pos:] + data if pos < len(held) else data
        self._pos = 0
        waiter = self._waiter
        if waiter is not None:  # wake()
            self._waiter = None
            if not waiter.cancelled():
                waiter.set_result(None)
        if not self._paused and self._transport is not None and len(self._held) > 2 * self._limit:
            try:
                self._transport.pause_reading()
            except NotImplementedError:
                self._transport = None  # as StreamReader: buffer everything
            else:
                self._paused = True

    def wake(self) -> None:
        """A read waiting for bytes looks again (more bytes, EOF, or an error)."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.cancelled():
                waiter.set_result(None)

    def discard(self) -> None:
        """Drop what is held (cleartext read before a STARTTLS handshake, RFC 3207 §4.2)."""
        self._held, self._pos = b"", 0

    def _take(self, stop: int, skip: int = 0) -> bytes:
        """Hand out what is held up to `stop`, drop `skip` more bytes after it."""
        part = self._held[self._pos : stop]
        self._consumed(stop + skip)
        return part

    def _consumed(self, pos: int) -> None:
        self._pos = pos
        if self._paused and len(self._held) - pos <= self._limit:
            self._paused = False
            self._transport.resume_reading()

    async def _more(self) -> bool:
        """Wait for more bytes (as StreamReader's reads: its error first, then EOF);
        False at EOF."""
        stream = self._stream
        error = stream.exception()
        if error is not None:
            raise error
        if stream.at_eof():
            return False
        if self._paused:  # waiting while paused would never end
            self._paused = False
            self._transport.resume_reading()
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        error = stream.exception()
        if error is not None:
            raise error
        return True

    def _eof(self) -> asyncio.IncompleteReadError:
        """What readuntil raises at EOF: everything held, as the partial line."""
        partial = self._take(len(self._held))
        self.discard()
        return asyncio.IncompleteReadError(partial, None)

    async def command_line(self) -> bytes:
        """The next command line, CRLF included, as readuntil(b"\\n") reads it. Raises
        LongCommand (once the line is drained) and BareLfCommand (the line consumed);
        asyncio.IncompleteReadError at EOF."""
        while True:
            held, pos = self._held, self._pos
            end = held.find(b"\n", pos)
            if end != -1 and end - pos <= self._limit:
                line = held[pos : end + 1]
                self._pos = end + 1
                if self._paused:
                    self._consumed(end + 1)
                if line[-2:-1] != b"\r":
                    raise BareLfCommand
                return line
            if end != -1 or len(held) - pos > self._limit:
                await self._drain_line()
                raise LongCommand
            if not await self._more():
                raise self._eof()

    async def _drain_line(self) -> None:
        """Drop what is held up to and including the next LF."""
        while True:
            end = self._held.find(b"\n", self._pos)
            if end != -1:
                self._consumed(end + 1)
                return
            self._consumed(len(self._held))
            if not await self._more():
                raise self._eof()

    async def readline(self) -> bytes:
        """StreamReader.readline() of what the session sends: a line up to LF (or what is
        left at EOF); past the limit, ValueError and the line (or all held) is dropped."""
        while True:
            held, pos = self._held, self._pos
            end = held.find(b"\n", pos)
            if end != -1:
                if end - pos > self._limit:
                    self._consumed(end + 1)
                    raise ValueError("Separator is found, but chunk is longer than limit")
                return self._take(end + 1)
            if len(held) - pos > self._limit:
                self._consumed(len(held))
                raise ValueError("Separator is not found, and chunk exceed the limit")
            if not await self._more():
                return self._eof().partial

    def begin_data(self) -> None:
        """DATA starts here: what follows starts a line."""
        self._line_start = True

    async def data_block(self) -> tuple[bytes, bool]:
        """The next part of the DATA content, and whether the end of data followed it (it
        is consumed; what follows it is left for the next command).

        Returns once at least one chunk readuntil(b"\\r\\n") would have returned is here:
        whole lines (of any length), or, for a line longer than the limit, the piece of it
        that readuntil would have handed over (all of it but the last byte, so a piece
        never ends with the CR of a CRLF). The content never holds the end of data; a part
        continues the line the part before left unfinished, if it did. Raises
        asyncio.IncompleteReadError at EOF."""
        while True:
            held, pos = self._held, self._pos
            if self._line_start and held.startswith(b".\r\n", pos):
                self._consumed(pos + 3)
                return b"", True
            end = held.find(_DATA_END, pos)
            if end != -1:
                self._line_start = True
                return self._take(end + 2, 3), True
            cut = held.rfind(b"\r\n", pos) + 2  # 1: no CRLF
            if len(held) - (cut if cut > 1 else pos) > self._limit + 1:
                # An unfinished line longer than the limit: hand over all of it but the
                # last byte, as readuntil would (LimitOverrunError, then read()).
                self._line_start = False
                return self._take(len(held) - 1), False
            if cut > 1:
                self._line_start = True
                return self._take(cut), False
            if not await self._more():
                raise self._eof()
