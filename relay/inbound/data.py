"""One SMTP DATA section, read into one buffer: the content of a message as it arrives.

Owns what the listener does with DATA lines as they come in: the end of data (only
CRLF.CRLF, RFC 5321 §4.1.1.4; SMUG-03), dot-unstuffing (§4.5.2), the size limit (§4.5.3.1.7,
enforced while reading), over-long lines (§4.5.3.1.6), bare CR / bare LF (§2.3.8, SMUG-01/02)
noticed line by line, and where the header section ends. It keeps a single copy of the
content (an io.BytesIO: its getvalue() hands its buffer over without copying) and splices
the listener's header fields into that copy in place, so a 50 MiB message costs about 50 MiB.
Same results as aiosmtpd 1.4.6's smtp_DATA with decode_data=False, line for line. Knows
nothing of sockets or sessions (relay/inbound/session.py feeds it) nor of which fields are added.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from enum import Enum

from relay.inbound.headers import is_header_line

_CRLF = b"\r\n"
_END = b".\r\n"


class DataOutcome(Enum):
    """How a DATA section went; the first failure wins, as in aiosmtpd."""

    OK = "ok"
    TOO_LONG = "too long"  # a line over the line length limit (500)
    TOO_MUCH = "too much"  # over the message size limit (552)
    BARE_NEWLINE = "bare newline"  # a CR or LF not part of a CRLF (550 5.5.2)


class MessageBuffer:
    """Collects the chunks a StreamReader returns during DATA.

    Feed every chunk that `readuntil(b"\\r\\n")` returned, and call `overrun()` before
    feeding what `read(consumed)` returned after a LimitOverrunError. Once the outcome is
    not OK, nothing more is kept (the client's data is still counted and drained).
    """

    def __init__(self, limit: int | None, line_limit: int) -> None:
        self._limit = limit or sys.maxsize  # 0 or None: no limit, as in aiosmtpd
        self._line_limit = line_limit
        self._out: io.BytesIO | None = io.BytesIO()
        self._outcome = DataOutcome.OK
        self._bare = False
        self._received = 0  # bytes fed, as sent (stuffed), for the size limit
        self._partial = False  # the last chunk did not end a line
        self._in_header = True
        self._header_end = 0

    @property
    def outcome(self) -> DataOutcome:
        if self._outcome is DataOutcome.OK and self._bare:
            return DataOutcome.BARE_NEWLINE
        return self._outcome

    @property
    def size(self) -> int:
        """Length of the content kept so far (unstuffed)."""
        return 0 if self._out is None else self._out.tell()

    @property
    def header_end(self) -> int:
        """Where the header section ends: relay.inbound.headers.header_end() of the content."""
        return self.size if self._in_header else self._header_end

    def overrun(self) -> None:
        """The next chunk is part of a line longer than the reader's limit."""
        self._fail(DataOutcome.TOO_LONG)

    def feed(self, chunk: bytes) -> bool:
        """Take one chunk; True if it is the end of data (and not content)."""
        partial = self._partial
        if chunk == _END and not partial:
            return True
        self._received += len(chunk)
        ends_line = chunk.endswith(_CRLF)
        self._partial = not ends_line
        if self._outcome is not DataOutcome.OK:
            return False
        out = self._out
        if self._received > self._limit:
            self._fail(DataOutcome.TOO_MUCH)
        elif partial or not ends_line or len(chunk) > self._line_limit:
            # A chunk short of a line only follows overrun(); the length check is
            # aiosmtpd's defence in depth (readuntil may return limit + 2 bytes).
            self._fail(DataOutcome.TOO_LONG)
        elif out is None:
            pass  # a bare newline was found: only the limits are still watched
        elif chunk.count(b"\r") != 1 or chunk.count(b"\n") != 1:
            self._bare = True  # the reply is decided: keep nothing more
            self._out = None
        else:
            line = chunk[1:] if chunk.startswith(b".") else chunk
            if self._in_header:
                self._see_header_line(out.tell(), line)
            out.write(line)
        return False

    def _see_header_line(self, pos: int, line: bytes) -> None:
        if not is_header_line(line, first=pos == 0):
            self._in_header = False
            self._header_end = pos

    def _fail(self, outcome: DataOutcome) -> None:
        if self._outcome is DataOutcome.OK:
            self._outcome = outcome
        self._out = None  # free what was kept at once

    def peek(self, start: int, stop: int) -> bytes:
        """A copy of content[start:stop] (for the header section: small)."""
        if self._out is None:
            return b""
        with self._out.getbuffer() as view:
            return bytes(view[start:stop])

    def finish(self, insertions: Sequence[tuple[int, bytes]] = ()) -> bytes:
        """The content with each (offset, piece) inserted at that offset of the original
        (offsets ascending), as bytes that share the buffer: no copy of the content is
        made. The buffer is empty afterwards."""
        out = self._out
        if out is None or self.outcome is not DataOutcome.OK:
            raise ValueError("no content: DATA did not end well")
        offsets = [offset for offset, _ in insertions]
        size = out.tell()
        if offsets != sorted(offsets) or any(not 0 <= o <= size for o in offsets):
            raise ValueError("insertion offsets must ascend within the content")
        extra = sum(len(piece) for _, piece in insertions)
        if extra:
            out.write(bytes(extra))  # grows in place (realloc), then pieces move up
            with out.getbuffer() as view:
                stop, shift = size, extra
                for offset, piece in reversed(insertions):
                    view[offset + shift : stop + shift] = view[offset:stop]  # memmove
                    shift -= len(piece)
                    view[offset + shift : offset + shift + len(piece)] = piece
                    stop = offset
        self._out = None
        content = out.getvalue()  # hands over the buffer (no exports are left)
        out.close()
        return content
