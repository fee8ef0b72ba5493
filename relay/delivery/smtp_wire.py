"""The delivery side's SMTP wire: one connection to one MX, commands out, replies in order.

Owns the bytes: connecting, the greeting, EHLO's keywords, STARTTLS's handshake, writing
commands (alone or as an RFC 2920 group) and the message data, and reading replies. It
knows nothing of what a reply means for a message (`client` decides that).

Every byte the server sends is kept (issue 10, issue 14). Replies are parsed as they
arrive into a queue and read in order, one per command written, so a pipelined group's
replies are never lost, and whatever came beyond the replies asked for is visible to
`unsolicited` before the next command is written. aiosmtplib, used here before, reads
one reply per command and drops bytes that arrive while no reply is awaited, which rules
out PIPELINING and left a blind spot.

A reply is held to RFC 5321 §4.2: three digits, then a space, a hyphen (more lines
follow) or the line's end; every line of a reply carries the same code. Lines are at most
`MAX_LINE` bytes, a reply at most `MAX_REPLY`, and no more than `MAX_UNREAD` bytes may
wait unread. Anything else is `MalformedReply`, and the connection is of no further use.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from typing import Any, NamedTuple, cast

MAX_LINE = 8192  # bytes of one reply line (RFC 5321 §4.5.3.1.5 says 512; servers exceed it)
MAX_REPLY = 4 * MAX_LINE  # one whole reply, continuation lines included
MAX_UNREAD = 1024 * 1024  # replies parsed and not yet read, and bytes not yet parsed
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # never inside a command line (CR/LF injection)
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")  # RFC 5321 §4.1.1.1 ehlo-keyword
_SHOWN = 200  # characters of an unsolicited reply quoted back


class Reply(NamedTuple):
    """One SMTP reply: its code and its text (continuation lines joined with newlines)."""

    code: int
    message: str


class MalformedReply(Exception):
    """The server sent something that is not a reply, or too much of it."""


class ConnectionLost(ConnectionError):
    """The server closed the connection, or it broke, before the reply was read."""


class ReplyQueue(asyncio.Protocol):
    """The asyncio side of the wire: every byte received is parsed into replies, in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.replies: deque[Reply] = deque()
        self.unread = bytearray()  # bytes of a reply not complete yet
        self.queued = 0  # bytes of the replies in `replies`
        self.error: MalformedReply | None = None
        self.lost: ConnectionLost | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        self.unread += data
        try:
            self._parse()
        except MalformedReply as exc:
            self.error = exc
        self._wake()

    def eof_received(self) -> bool:
        self.lost = self.lost or ConnectionLost("the server closed the connection")
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = ConnectionLost(f"connection lost: {exc}" if exc else "connection lost")
            if exc is not None:
                self.lost.__cause__ = exc
        self._wake()
        self.resume_writing()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def drain(self) -> None:
        if self._paused and self.lost is None:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        if self.lost is not None:
            raise ConnectionLost(*self.lost.args)

    async def next_reply(self) -> Reply:
        while not self.replies:
            if self.error is not None:
                raise MalformedReply(*self.error.args)
            if self.lost is not None:
                raise ConnectionLost(*self.lost.args)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.pop()

    def pop(self) -> Reply:
        reply = self.replies.popleft()
        self.queued -= len(reply.message) + 4
        return reply

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _parse(self) -> None:
        """Move every complete reply from `unread` to `replies`."""
        while True:
            parsed = parse_reply(self.unread)
            if parsed is None:
                break
            reply, used = parsed
            del self.unread[:used]
            self.replies.append(reply)
            self.queued += len(reply.message) + 4
        if len(self.unread) > MAX_REPLY:
            raise MalformedReply(f"reply longer than {MAX_REPLY} bytes")
        if self.queued + len(self.unread) > MAX_UNREAD:
            raise MalformedReply(f"more than {MAX_UNREAD} bytes of replies left unread")


def parse_reply(buffer: bytearray) -> tuple[Reply, int] | None:
    """The first complete reply in `buffer` and the bytes it takes, or None when it has
    not all arrived. Raises MalformedReply for anything RFC 5321 §4.2 does not allow."""
    code: bytes | None = None
    texts: list[bytes] = []
    offset = 0
    while True:
        end = buffer.find(b"\n", offset)
        if end == -1:
            if len(buffer) - offset > MAX_LINE:
                raise MalformedReply(f"reply line longer than {MAX_LINE} bytes")
            return None
        line = bytes(buffer[offset:end]).rstrip(b"\r")
        offset = end + 1
        if len(line) > MAX_LINE:
            raise MalformedReply(f"reply line longer than {MAX_LINE} bytes")
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
            shown = line[:_SHOWN].decode("utf-8", "replace")
            raise MalformedReply(f"malformed reply line: {shown}")
        if code is not None and line[:3] != code:
            codes = f"{code.decode()}, {line[:3].decode()}"
            raise MalformedReply(f"reply lines with different codes: {codes}")
        code = line[:3]
        texts.append(line[4:].strip(b" \t"))
        if line[3:4] != b"-":
            message = b"\n".join(texts).decode("utf-8", "surrogateescape")
            return Reply(int(code), message), offset


def ehlo_keywords(message: str) -> dict[str, str]:
    """EHLO's keywords (lower case) and their parameters, from the reply text after its
    first line (the server's name). RFC 5321 §4.1.1.1; a line that is not a keyword is
    skipped."""
    keywords: dict[str, str] = {}
    for line in message.split("\n")[1:]:
        word, _, params = line.strip().partition(" ")
        if "=" in word and word[:5].upper() == "AUTH=":
            word, params = "AUTH", word[5:]  # the pre-standard form some servers still send
        if _KEYWORD.fullmatch(word):
            keywords.setdefault(word.lower(), params.strip())
    return keywords


class SmtpWire:
    """One client connection: greeted on `open`; commands and replies; STARTTLS; data."""

    def __init__(self, protocol: ReplyQueue, greeting: Reply) -> None:
        self._protocol = protocol
        self.greeting = greeting
        self.keywords: dict[str, str] = {}  # from the last EHLO; empty after STARTTLS

    @classmethod
    async def open(cls, host: str, port: int, *, timeout: float) -> SmtpWire:  # noqa: ASYNC109
        """A TCP connection and the server's greeting (whatever its code: the caller
        decides). Raises OSError or TimeoutError; MalformedReply for a bad greeting."""
        loop = asyncio.get_running_loop()
        protocol = ReplyQueue()
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: protocol, host, port)
            try:
                greeting = await protocol.next_reply()
            except BaseException:
                _close(protocol)
                raise
        return cls(protocol, greeting)

    # -- state ---------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        transport = self._protocol.transport
        return transport is not None and not transport.is_closing() and not self._protocol.lost

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        found = self.extra_info("ssl_object")
        return found if isinstance(found, ssl.SSLObject) else None

    def extra_info(self, name: str) -> Any:
        """The transport's `get_extra_info(name)` ("socket", "peername", ...), or None."""
        transport = self._protocol.transport
        return transport.get_extra_info(name) if transport is not None else None

    def supports(self, keyword: str) -> bool:
        """Whether the last EHLO advertised `keyword` (any case)."""
        return keyword.lower() in self.keywords

    def unsolicited(self) -> str | None:
        """What the server sent that no command asked for (raw text), or None: replies
        parsed and not read, a part of one, or bytes that are no reply at all. A closed
        connection is not unsolicited: the next command reports it."""
        protocol = self._protocol
        if protocol.replies:
            reply = protocol.replies[0]
            return f"{reply.code} {reply.message}"[:_SHOWN]
        if protocol.error is not None:
            return str(protocol.error)
        if protocol.unread:
            return bytes(protocol.unread[:_SHOWN]).decode("utf-8", "replace")
        return None

    # -- commands and replies ------------------------------------------------------------

    def send(self, *commands: bytes) -> None:
        """Write commands (each without its CRLF) in one write: one command, or a group of
        them under PIPELINING (RFC 2920 §3.1). Raises ValueError for a control character
        in a command, ConnectionLost when the connection is gone."""
        for command in commands:
            if _CONTROL.search(command):
                raise ValueError("a command may not contain control characters")
        self.write(b"".join(command + b"\r\n" for command in commands))

    def write(self, data: bytes) -> None:
        """Raw bytes (message data): no check, no CRLF added."""
        transport = self._protocol.transport
        if self._protocol.lost is not None:
            raise ConnectionLost(*self._protocol.lost.args)
        if transport is None or transport.is_closing():
            raise ConnectionLost("connection closed")
        transport.write(data)

    async def drain(self) -> None:
        """Until the transport's buffer is below its high-water mark again."""
        await self._protocol.drain()

    async def reply(self, *, timeout: float) -> Reply:  # noqa: ASYNC109
        """The next reply, in order. Raises TimeoutError, ConnectionLost or MalformedReply."""
        protocol = self._protocol
        if protocol.replies:  # already here (a pipelined group's): no timer needed
            return protocol.pop()
        async with asyncio.timeout(timeout):
            return await protocol.next_reply()

    async def command(self, command: bytes, *, timeout: float) -> Reply:  # noqa: ASYNC109
        """One command and its reply."""
        self.send(command)
        return await self.reply(timeout=timeout)

    async def ehlo(self, name: str, *, timeout: float) -> Reply:  # noqa: ASYNC109
        """EHLO; on a 250 its keywords replace those known."""
        reply = await self.command(b"EHLO " + name.encode("ascii"), timeout=timeout)
        if reply.code == 250:
            self.keywords = ehlo_keywords(reply.message)
        return reply

    async def starttls(
        self,
        context: ssl.SSLContext,
        server_hostname: str,
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> Reply:
        """STARTTLS and, on its 220, the handshake (SNI = `server_hostname`). Returns the
        reply; the handshake ran only if it is 220. Raises ssl errors, OSError or
        TimeoutError when the handshake fails (the connection is then unusable).

        RFC 3207 §4.2: anything the server sent after its 220, before the handshake, may
        be an injection and is thrown away; the keywords learnt before TLS are forgotten
        (the caller sends EHLO again)."""
        reply = await self.command(b"STARTTLS", timeout=timeout)
        if reply.code != 220:
            return reply
        protocol = self._protocol
        protocol.replies.clear()
        protocol.unread.clear()
        protocol.queued = 0
        transport = protocol.transport
        if transport is None or protocol.lost is not None:
            raise ConnectionLost("connection closed before the TLS handshake")
        self.keywords = {}
        loop = asyncio.get_running_loop()
        tls = await loop.start_tls(
            transport,
            protocol,
            context,
            server_side=False,
            server_hostname=server_hostname,
            ssl_handshake_timeout=timeout,
        )
        if tls is None:
            raise ConnectionLost("connection closed during the TLS handshake")
        protocol.transport = tls
        return reply

    async def quit(self, *, timeout: float) -> None:  # noqa: ASYNC109
        """QUIT and its reply (whatever it is), then close. Raises nothing worth keeping:
        the caller suppresses what a dying connection raises."""
        try:
            if self.is_connected:
                await self.command(b"QUIT", timeout=timeout)
        finally:
            self.close()

    def close(self) -> None:
        _close(self._protocol)


def _close(protocol: ReplyQueue) -> None:
    transport = protocol.transport
    if transport is not None and not transport.is_closing():
        transport.close()
