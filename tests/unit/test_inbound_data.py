"""relay/inbound/data.MessageBuffer against aiosmtpd 1.4.6's DATA algorithm (pure logic).

The reference below is aiosmtpd's smtp_DATA loop (list of lines, join, unstuff) followed by
the listener's old bare CR/LF check, transcribed; the buffer must give the same content,
the same outcome, and the header section end relay.inbound.headers.header_end() finds.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.inbound.data import DataOutcome, MessageBuffer
from relay.inbound.headers import has_bare_cr_or_lf, header_end

LINE_LIMIT = 24  # small, so that long lines are common


def _reference(
    chunks: list[tuple[bool, bytes]], limit: int | None, line_limit: int
) -> bytes | DataOutcome | None:
    """aiosmtpd 1.4.6 smtp_DATA + the old handler check: content, failure, or None (no end)."""
    data: list[bytearray] = []
    num_bytes = 0
    fragments: list[bytes] = []
    state = DataOutcome.OK
    for overrun, line in chunks:
        if overrun:
            if state is DataOutcome.OK:
                state = DataOutcome.TOO_LONG
            data *= 0
        if not fragments and line == b".\r\n":
            break
        num_bytes += len(line)
        if state is DataOutcome.OK and limit and num_bytes > limit:
            state = DataOutcome.TOO_MUCH
            data *= 0
        fragments.append(line)
        if line.endswith(b"\r\n"):
            if state is DataOutcome.OK:
                joined = b"".join(fragments)
                if len(joined) > line_limit:
                    state = DataOutcome.TOO_LONG
                    data *= 0
                else:
                    data.append(bytearray(joined))
            fragments *= 0
    else:
        return None
    if state is not DataOutcome.OK:
        return state
    for text in data:
        if text.startswith(b"."):
            del text[0]
    content = b"".join(data)
    return DataOutcome.BARE_NEWLINE if has_bare_cr_or_lf(content) else content


def _feed(chunks: list[tuple[bool, bytes]], limit: int | None) -> MessageBuffer | None:
    buffer = MessageBuffer(limit, LINE_LIMIT)
    for overrun, chunk in chunks:
        if overrun:
            buffer.overrun()
        if buffer.feed(chunk):
            return buffer
    return None


_pieces = st.one_of(
    st.binary(max_size=12).filter(lambda b: b"\r\n" not in b),
    st.sampled_from(
        [b"", b".", b"..", b".x", b"\r", b"\n", b"a\rb", b"a\nb", b"Subject: x", b" cont",
         b"\tcont", b"Date: d", b"Received: r", b"x" * (LINE_LIMIT - 2), b"x" * LINE_LIMIT]
    ),
)  # fmt: skip


@st.composite
def _chunks(draw: st.DrawFn) -> list[tuple[bool, bytes]]:
    """What a StreamReader hands over: whole CRLF lines, and after an overrun a partial
    chunk that does not end with CRLF; always ends with the end of data."""
    out: list[tuple[bool, bytes]] = []
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.integers(0, 9)) == 0:
            part = draw(st.binary(min_size=1, max_size=30).filter(lambda b: b"\r\n" not in b))
            if part.endswith(b"\r"):
                part = part[:-1] + b"x"
            out.append((True, part))
        else:
            out.append((False, draw(_pieces) + b"\r\n"))
    out.append((False, b".\r\n"))
    return out


@settings(max_examples=500)
@given(_chunks(), st.one_of(st.none(), st.integers(0, 200)))
def test_same_outcome_and_content_as_aiosmtpd(
    chunks: list[tuple[bool, bytes]], limit: int | None
) -> None:
    expected = _reference(chunks, limit, LINE_LIMIT)
    buffer = _feed(chunks, limit)
    assert (buffer is None) == (expected is None)
    if buffer is None:
        return
    if isinstance(expected, DataOutcome):
        assert buffer.outcome is expected
        return
    assert buffer.outcome is DataOutcome.OK
    end = buffer.header_end
    assert buffer.size == len(expected or b"")
    assert buffer.peek(0, end) == (expected or b"")[:end]
    content = buffer.finish()
    assert isinstance(content, bytes)
    assert content == expected
    assert end == header_end(content)


def test_only_crlf_dot_crlf_ends_data() -> None:
    # SMUG-03: fake ends are content (and, here, bare newlines); chunks as readuntil gives.
    buffer = MessageBuffer(None, 1001)
    for fake in (b"a\n.\nb\r\n", b"x\n.\r\n", b".\n\r\n", b"\r.\r\n", b".\r\r\n"):
        assert not buffer.feed(fake)
    assert buffer.feed(b".\r\n")
    assert buffer.outcome is DataOutcome.BARE_NEWLINE


def test_dot_unstuffing_and_header_end() -> None:
    buffer = MessageBuffer(None, 1001)
    for line in (b"Subject: a\r\n", b" folded\r\n", b"\r\n", b"..x\r\n", b".\r\n"):
        buffer.feed(line)
    assert buffer.outcome is DataOutcome.OK
    assert buffer.header_end == len(b"Subject: a\r\n folded\r\n")
    assert buffer.finish() == b"Subject: a\r\n folded\r\n\r\n.x\r\n"


def test_size_limit_counts_the_stuffed_bytes_and_keeps_nothing() -> None:
    buffer = MessageBuffer(10, 1001)
    outcomes = []
    assert not buffer.feed(b"..abcdef\r\n")  # 10 bytes: at the limit
    outcomes.append(buffer.outcome)
    assert not buffer.feed(b"x\r\n")
    outcomes.append(buffer.outcome)
    assert outcomes == [DataOutcome.OK, DataOutcome.TOO_MUCH]
    assert buffer.size == 0
    assert buffer.feed(b".\r\n")


def test_size_limit_wins_over_an_earlier_bare_newline() -> None:
    # As before: aiosmtpd answered 552 before the handler could look for bare newlines.
    buffer = MessageBuffer(8, 1001)
    buffer.feed(b"a\nb\r\n")
    outcomes = [buffer.outcome]
    buffer.feed(b"cdefgh\r\n")
    outcomes.append(buffer.outcome)
    assert outcomes == [DataOutcome.BARE_NEWLINE, DataOutcome.TOO_MUCH]


@given(
    st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.lists(st.tuples(st.integers(0, 300), st.binary(max_size=40)), max_size=4),
)
def test_finish_splices_pieces_in_place(body: bytes, raw: list[tuple[int, bytes]]) -> None:
    lines = [b"x" + body[i : i + 20] + b"\r\n" for i in range(0, len(body), 20)]
    content = b"".join(lines)
    buffer = MessageBuffer(None, 1001)
    for line in lines:
        buffer.feed(line)
    insertions = sorted((min(offset, len(content)), piece) for offset, piece in raw)
    expected, last = b"", 0
    for offset, piece in insertions:
        expected += content[last:offset] + piece
        last = offset
    expected += content[last:]
    assert buffer.finish(insertions) == expected


def test_finish_refuses_what_did_not_end_well() -> None:
    buffer = MessageBuffer(None, 1001)
    buffer.feed(b"a\rb\r\n")
    try:
        buffer.finish()
    except ValueError:
        pass
    else:
        raise AssertionError("finish() gave content of a refused message")
