"""One SMTP DATA section, read into one buffer: the content of a message as it arrives.

Owns what the listener does with DATA as it comes in: the end of data (only CRLF.CRLF,
RFC 5321 §4.1.1.4; SMUG-03), dot-unstuffing (§4.5.2), the size limit (§4.5.3.1.7, enforced
while reading), bare CR / bare LF (§2.3.8, SMUG-01/02) noticed chunk by chunk, where the
header section ends, and the share of the listener's memory budget the content holds.
Lines of any length are taken (issue 13: HTML mail from many frameworks has lines past
§4.5.3.1.6's 998 characters, and Postfix accepts them): a long line arrives as several
chunks and is kept as it came. It keeps a single copy of the content (an io.BytesIO: its
getvalue() hands its buffer over without copying) and splices the listener's header fields
into that copy in place, so a 50 MiB message costs about 50 MiB, and `release()` frees it
at once however the DATA ended. It takes DATA a line at a time (`feed`) or as much as
arrived at once (`feed_block`, relay/inbound/lines.SessionReader's parts: one check, one
unstuffing and one copy for the whole part when nothing is wrong, and the lines one by one
when something is). Knows nothing of sockets or sessions (relay/inbound/session.py feeds
it) nor of which fields are added.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from enum import Enum

from relay.inbound.headers import is_header_line
from relay.inbound.slots import DataBudget

_CRLF = b"\r\n"
_END = b".\r\n"


class DataOutcome(Enum):
    """How a DATA section went; the first failure wins, as in aiosmtpd."""

    OK = "ok"
    TOO_MUCH = "too much"  # over the message size limit (552)
    BARE_NEWLINE = "bare newline"  # a CR or LF not part of a CRLF (550 5.5.2)
    NO_ROOM = "no room"  # the listener's DATA memory budget is spent (451 4.3.1)


class MessageBuffer:
    """Collects the content of one DATA section as it is read.

    Feed it either the parts relay/inbound/lines.SessionReader.data_block hands over
    (`feed_block`), or one by one the chunks a StreamReader's `readuntil(b"\\r\\n")`
    returns, and those `read(n)` returns after a LimitOverrunError (`feed`: a piece of a
    line longer than the reader's buffer holds no CRLF, so a CR or LF in it is bare); the
    two give the same. Once the outcome is not OK nothing more is kept (the client's data
    is still counted and drained). Call `release()` when done with the buffer, whatever
    happened: it gives back the budget and the memory.
    """

    def __init__(self, limit: int | None, budget: DataBudget | None = None) -> None:
        self._limit = limit or sys.maxsize  # 0 or None: no limit, as in aiosmtpd
        self._budget = budget
        self._charged = 0  # bytes taken from the budget
        self._out: io.BytesIO | None = io.BytesIO()
        self._outcome = DataOutcome.OK
        self._bare = False
        self._received = 0  # bytes fed, as sent (stuffed), for the size limit
        self._partial = False  # the last chunk did not end a line
        self._line_start = 0  # where the line being read started in the content
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
        elif out is None:
            pass  # a bare newline was found: only the limits are still watched
        elif (
            chunk.count(b"\r") != 1 or chunk.count(b"\n") != 1
            if ends_line
            else b"\r" in chunk or b"\n" in chunk
        ):
            self._bare = True  # the reply is decided: keep nothing more
            self._drop()
        else:
            line = chunk[1:] if not partial and chunk.startswith(b".") else chunk
            if self._budget is not None and not self._budget.take(len(line)):
                self._fail(DataOutcome.NO_ROOM)
                return False
            self._charged += len(line)
            self._keep(out, line, partial=partial, ends_line=ends_line)
        return False

    def feed_block(self, block: bytes, line_limit: int | None = None) -> None:
        """Take a part of the content as relay/inbound/lines.SessionReader.data_block hands
        it over (never the end of data): whole CRLF lines, the last of which may be the
        piece of a long line; the first continues the line the part before left unfinished,
        if it did.

        The same as feeding, one by one, the chunks StreamReader.readuntil(b"\\r\\n") with
        `line_limit` (None: no limit) hands over for those bytes (a line whose CRLF lies past
        the limit comes as its text, then its CRLF), at a fraction of the cost when nothing
        is wrong: one check, one copy and one budget charge for the whole part."""
        if not block:
            return
        received = self._received + len(block)
        ends_line = block.endswith(_CRLF)
        out = self._out
        if self._outcome is not DataOutcome.OK or out is None:
            # Refused already (or a bare newline seen): only the size limit is watched.
            self._received, self._partial = received, not ends_line
            if received > self._limit and self._outcome is DataOutcome.OK:
                self._fail(DataOutcome.TOO_MUCH)
            return
        pairs = block.count(_CRLF)
        if (
            received <= self._limit
            and block.count(b"\r") == pairs
            and block.count(b"\n") == pairs
            and not (self._in_header and self._partial)
        ):
            # Within the limit, no bare CR or LF (CRLF pairs cannot overlap), and no header
            # line to finish from an earlier part: unstuff every line at once (§4.5.2).
            content = block.replace(b"\r\n.", _CRLF) if b"\r\n." in block else block
            if not self._partial and content[:1] == b".":
                content = content[1:]
            if self._budget is None or self._budget.take(len(content)):
                self._charged += len(content)
                self._received, self._partial = received, not ends_line
                if self._in_header:
                    self._see_header_lines(out.tell(), content)
                out.write(content)
                return
        # Something to refuse (or a header line spread over parts): chunk by chunk, so the
        # first failure is the one feeding them would find.
        start = 0
        while (end := block.find(_CRLF, start)) != -1:
            if line_limit is not None and end - start > line_limit:
                self.feed(block[start:end])
                self.feed(_CRLF)
            else:
                self.feed(block[start : end + 2])
            start = end + 2
        if start < len(block):
            self.feed(block[start:])

    def _see_header_lines(self, pos: int, part: bytes) -> None:
        """Look at the lines of `part` (about to be written at `pos`; starts a line) while
        they belong to the header section."""
        start = 0
        while (end := part.find(_CRLF, start)) != -1:
            if not is_header_line(part[start : end + 2], first=pos + start == 0):
                self._in_header = False
                self._header_end = pos + start
                return
            start = end + 2
        if start < len(part):
            self._line_start = pos + start  # an unfinished line: seen once it ends

    def _keep(self, out: io.BytesIO, line: bytes, *, partial: bool, ends_line: bool) -> None:
        if not self._in_header:
            out.write(line)
        elif not partial and ends_line:  # a whole line in one chunk: the common case
            self._see_header_line(out.tell(), line)
            out.write(line)
        else:  # a line in several chunks: seen once it ends, in place (no copy)
            if not partial:
                self._line_start = out.tell()
            out.write(line)
            if ends_line:
                with out.getbuffer() as view:
                    self._see_header_line(self._line_start, view[self._line_start :])

    def _see_header_line(self, pos: int, line: bytes | memoryview) -> None:
        if not is_header_line(line, first=pos == 0):
            self._in_header = False
            self._header_end = pos

    def _fail(self, outcome: DataOutcome) -> None:
        if self._outcome is DataOutcome.OK:
            self._outcome = outcome
        self._drop()

    def _drop(self) -> None:
        """Free what was kept, at once, and give its budget back."""
        if self._out is not None:
            self._out.close()
            self._out = None
        if self._budget is not None:
            self._budget.give(self._charged)
        self._charged = 0

    def release(self) -> None:
        """Done with this DATA (delivered to the store, refused, or cut off): free the
        content and give its budget back. Safe to call more than once."""
        self._drop()

    def peek(self, start: int, stop: int) -> bytes:
        """A copy of content[start:stop] (for the header section: small)."""
        if self._out is None:
            return b""
        with self._out.getbuffer() as view:
            return bytes(view[start:stop])

    def finish(self, insertions: Sequence[tuple[int, bytes]] = ()) -> bytes:
        """The content with each (offset, piece) inserted at that offset of the original
        (offsets ascending), as bytes that share the buffer: no copy of the content is
        made. The buffer is empty afterwards; its budget is held until `release()`."""
        out = self._out
        if out is None or self.outcome is not DataOutcome.OK:
            raise ValueError("no content: DATA did not end well")
        size = out.tell()
        last, extra = 0, 0
        for offset, piece in insertions:
            if not last <= offset <= size:
                raise ValueError("insertion offsets must ascend within the content")
            last, extra = offset, extra + len(piece)
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
