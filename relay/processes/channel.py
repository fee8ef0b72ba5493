"""The private line between the supervisor and one process: a socket pair made before the
fork, so nobody else can speak on it.

The supervisor asks (one word and a newline: `metrics`, `readyz`, `stop`) and the process
answers with a frame: the payload's length in decimal, a newline, the payload. One question
at a time. The process reads end-of-file when the supervisor is gone, however it died, and
then stops as if told to.
"""

from __future__ import annotations

import asyncio
import socket

METRICS = "metrics"
READYZ = "readyz"
STOP = "stop"
COMMANDS = (METRICS, READYZ, STOP)

_MAX_FRAME = 64 * 1024 * 1024


class ChannelBroken(Exception):
    """The other end is gone, answered out of turn, or too late."""


def frame(payload: bytes) -> bytes:
    return b"%d\n" % len(payload) + payload


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readline()
    if not header.endswith(b"\n") or not header[:-1].isdigit():
        raise ChannelBroken(f"bad frame header {header[:20]!r}")
    size = int(header)
    if size > _MAX_FRAME:
        raise ChannelBroken(f"frame of {size} bytes")
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise ChannelBroken("closed in a frame") from exc


class Channel:
    """The supervisor's end of one process's line (connected to the loop at first use)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.fileno = sock.fileno()
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._turn = asyncio.Lock()
        self.broken = False

    async def ask(self, command: str, within: float) -> bytes:
        """Send `command`, return the answer; ChannelBroken (and the channel stays broken:
        a late answer would be taken for the next question's) when none comes in time."""
        async with self._turn:
            if self.broken:
                raise ChannelBroken("broken earlier")
            try:
                async with asyncio.timeout(within):
                    if self._streams is None:
                        self._streams = await asyncio.open_connection(sock=self._sock)
                    reader, writer = self._streams
                    writer.write(command.encode("ascii") + b"\n")
                    await writer.drain()
                    return await read_frame(reader)
            except (OSError, TimeoutError, ChannelBroken) as exc:
                self.broken = True
                raise ChannelBroken(str(exc) or type(exc).__name__) from exc

    def close(self) -> None:
        self.broken = True
        if self._streams is not None:
            self._streams[1].close()
        else:
            self._sock.close()
