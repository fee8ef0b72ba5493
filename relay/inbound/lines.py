"""How the listener reads lines off a client connection, beneath aiosmtpd's own reading.

Owns the line discipline of a session: only CRLF ends a command line (RFC 5321 §2.3.8; a
bare LF is refused, SMUG-04), a command line longer than the reader's buffer is read to its
end and answered as too long (§4.5.3.1.4) rather than taken apart, and every DATA line tells
the session to restart its data timeout. Knows nothing of commands, replies or DATA content
(relay/inbound/session.py answers, relay/inbound/data.py keeps the content).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class BareLfCommand(Exception):
    """A command line ended with LF alone (RFC 5321 §2.3.8: only CRLF ends a line)."""


class LongCommand(Exception):
    """A command line longer than the reader's buffer (RFC 5321 §4.5.3.1.4); drained."""


class CrlfReader:
    """Wraps the session's StreamReader: refuses bare-LF command lines, answers over-long
    ones, and restarts the data timeout on every DATA line (aiosmtpd reads commands up to
    LF, DATA up to CRLF)."""

    def __init__(self, reader: Any, on_data_line: Callable[[], None]) -> None:
        object.__setattr__(self, "_reader", reader)
        object.__setattr__(self, "_on_data_line", on_data_line)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        if separator != b"\n":
            line: bytes = await self._reader.readuntil(separator)
            self._on_data_line()
            return line
        try:
            line = await self._reader.readuntil(separator)
        except asyncio.LimitOverrunError as exc:
            # Read to the end of the line ourselves: aiosmtpd would leave its last bytes
            # (the "\n" of a CRLF split off) to be taken for a bare-LF command line.
            await self._drain_line(exc.consumed)
            raise LongCommand from None
        if not line.endswith(b"\r\n"):
            raise BareLfCommand
        return line

    async def _drain_line(self, consumed: int) -> None:
        reader = self._reader
        await reader.read(consumed)
        while True:
            try:
                await reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await reader.read(exc.consumed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._reader, name, value)
