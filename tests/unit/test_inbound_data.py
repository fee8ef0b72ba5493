"""relay/inbound/data.MessageBuffer against aiosmtpd 1.4.6's DATA algorithm (pure logic).

The reference below is aiosmtpd's smtp_DATA loop (list of lines, join, unstuff) without its
line length limit (issue 13: lines of any length are taken), followed by the listener's old
bare CR/LF check, transcribed; the buffer must give the same content, the same outcome, and
the header section end relay.inbound.headers.header_end() finds. Plus the DATA memory budget
(issue 11).
"""

from __future__ import annotations

import asyncio

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from relay.inbound.data import DataOutcome, MessageBuffer
from relay.inbound.headers import has_bare_cr_or_lf, header_end
from relay.inbound.slots import DataBudget


def _reference(chunks: list[bytes], limit: int | None) -> bytes | DataOutcome | None:
    """aiosmtpd 1.4.6 smtp_DATA (no line limit) + the old handler check: content, failure,
    or None (no end)."""
    data: list[bytearray] = []
    num_bytes = 0
    fragments: list[bytes] = []
    state = DataOutcome.OK
    for line in chunks:
        if not fragments and line == b".\r\n":
            break
        num_bytes += len(line)
        if state is DataOutcome.OK and limit and num_bytes > limit:
            state = DataOutcome.TOO_MUCH
            data *= 0
        fragments.append(line)
        if line.endswith(b"\r\n"):
            if state is DataOutcome.OK:
                data.append(bytearray(b"".join(fragments)))
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


def _feed(chunks: list[bytes], limit: int | None) -> MessageBuffer | None:
    buffer = MessageBuffer(limit)
    for chunk in chunks:
        if buffer.feed(chunk):
            return buffer
    return None


_pieces = st.one_of(
    st.binary(max_size=12).filter(lambda b: b"\r\n" not in b),
    st.sampled_from(
        [b"", b".", b"..", b".x", b"\r", b"\n", b"a\rb", b"a\nb", b"Subject: x", b" cont",
         b"\tcont", b"Date: d", b"Received: r", b"x" * 22, b"x" * 1500]
    ),
)  # fmt: skip


@st.composite
def _chunks(draw: st.DrawFn) -> list[bytes]:
    """What a StreamReader hands over: whole CRLF lines, and, for a line longer than its
    buffer, pieces (from read() after a LimitOverrunError) that hold no CRLF and do not end
    with the CR of one; always ends with the end of data."""
    out: list[bytes] = []
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.integers(0, 4)) == 0:
            part = draw(
                st.one_of(
                    st.binary(min_size=1, max_size=30),
                    st.sampled_from([b"Subject: long", b".", b"X-Long:", b" ", b"y" * 2000]),
                ).filter(lambda b: b"\r\n" not in b)
            )
            if part.endswith(b"\r"):
                part = part[:-1] + b"x"
            out.append(part)
        else:
            out.append(draw(_pieces) + b"\r\n")
    out.append(b".\r\n")
    return out


def _blocks(content: bytes, cuts: list[int]) -> list[bytes]:
    """`content` cut at `cuts`, never between the CR and the LF of a CRLF (as
    SessionReader.data_block hands DATA over)."""
    points = sorted({c for c in cuts if 0 < c < len(content) and content[c - 1 : c + 1] != b"\r\n"})
    return [content[a:b] for a, b in zip([0, *points], [*points, len(content)], strict=True)]


def _chunks_of(block: bytes, line_limit: int | None) -> list[bytes]:
    """What feed_block says it equals: its lines (a line past `line_limit` as its text,
    then its CRLF), then what is left."""
    out, start = [], 0
    while (end := block.find(b"\r\n", start)) != -1:
        if line_limit is not None and end - start > line_limit:
            out += [block[start:end], b"\r\n"]
        else:
            out.append(block[start : end + 2])
        start = end + 2
    return [*out, block[start:]] if start < len(block) else out


@settings(max_examples=500)
@given(
    _chunks(),
    st.lists(st.integers(1, 6000), max_size=12),
    st.one_of(st.none(), st.integers(0, 5000)),
    st.integers(0, 6000),
    st.sampled_from([None, 10, 1001]),
)
def test_feed_block_is_feeding_its_chunks(
    chunks: list[bytes], cuts: list[int], limit: int | None, budget: int, line_limit: int | None
) -> None:
    content = b"".join(chunks[:-1])  # all but the end of data, which follows a CRLF
    content += b"" if not content or content.endswith(b"\r\n") else b"\r\n"
    assume(not content.startswith(b".\r\n") and b"\r\n.\r\n" not in content)  # no end
    by_block = MessageBuffer(limit, DataBudget(budget))
    by_chunk = MessageBuffer(limit, DataBudget(budget))
    for block in _blocks(content, cuts):
        by_block.feed_block(block, line_limit)
        for chunk in _chunks_of(block, line_limit):
            assert not by_chunk.feed(chunk)
        assert by_block.outcome is by_chunk.outcome
        assert (by_block.size, by_block.header_end) == (by_chunk.size, by_chunk.header_end)
        assert by_block._budget.held == by_chunk._budget.held  # type: ignore[union-attr]
    assert by_block.feed(b".\r\n")
    if by_block.outcome is DataOutcome.OK:
        assert by_block.finish() == by_chunk.finish()


@settings(max_examples=500)
@given(_chunks(), st.one_of(st.none(), st.integers(0, 5000)))
def test_same_outcome_and_content_as_aiosmtpd(chunks: list[bytes], limit: int | None) -> None:
    expected = _reference(chunks, limit)
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


def test_a_line_of_any_length_is_kept_as_it_came() -> None:
    # Issue 13: 5,000 and 200,000 characters, in pieces as a StreamReader gives them.
    for length in (5_000, 200_000):
        line = b"<p>" + b"x" * (length - 3)
        buffer = MessageBuffer(1_000_000)
        assert not buffer.feed(b"Subject: long\r\n")
        assert not buffer.feed(b"\r\n")
        for at in range(0, len(line), 1001):
            assert not buffer.feed(line[at : at + 1001])
        assert not buffer.feed(b"\r\n")
        assert buffer.feed(b".\r\n")
        assert buffer.outcome is DataOutcome.OK
        assert buffer.finish() == b"Subject: long\r\n\r\n" + line + b"\r\n"


def test_a_bare_newline_inside_a_long_line_is_refused() -> None:
    buffer = MessageBuffer(None)
    buffer.feed(b"x" * 1000 + b"\n" + b"y" * 10)
    buffer.feed(b"z\r\n")
    assert buffer.feed(b".\r\n")
    assert buffer.outcome is DataOutcome.BARE_NEWLINE


def test_the_budget_is_shared_and_given_back() -> None:
    budget = DataBudget(100)
    first, second = MessageBuffer(None, budget), MessageBuffer(None, budget)
    first.feed(b"a" * 58 + b"\r\n")
    assert budget.held == 60
    second.feed(b"..b\r\n")  # kept unstuffed: 4 bytes
    assert budget.held == 64
    second.feed(b"c" * 40 + b"\r\n")  # 106 > 100: this DATA gets no room, keeps nothing
    assert second.outcome is DataOutcome.NO_ROOM
    assert budget.held == 60
    assert second.size == 0
    assert not second.feed(b"more\r\n")  # drained to the end, still counted for size
    assert second.feed(b".\r\n")
    assert first.feed(b".\r\n")
    content = first.finish([(0, b"Received: x\r\n")])
    assert content.endswith(b"a\r\n")
    assert budget.held == 60  # the content is still in memory until released
    first.release()
    first.release()  # idempotent
    second.release()
    assert budget.held == 0


def test_release_frees_an_unfinished_data() -> None:
    budget = DataBudget(1 << 20)
    buffer = MessageBuffer(None, budget)
    for _ in range(100):
        buffer.feed(b"x" * 998 + b"\r\n")
    assert budget.held == 100_000
    buffer.release()
    assert budget.held == 0
    assert buffer.size == 0


def test_a_refused_data_gives_its_budget_back_at_once() -> None:
    budget = DataBudget(1000)
    buffer = MessageBuffer(50, budget)
    buffer.feed(b"x" * 38 + b"\r\n")
    assert budget.held == 40
    buffer.feed(b"y" * 18 + b"\r\n")  # past the size limit
    assert buffer.outcome is DataOutcome.TOO_MUCH
    assert budget.held == 0


def test_only_crlf_dot_crlf_ends_data() -> None:
    # SMUG-03: fake ends are content (and, here, bare newlines); chunks as readuntil gives.
    buffer = MessageBuffer(None)
    for fake in (b"a\n.\nb\r\n", b"x\n.\r\n", b".\n\r\n", b"\r.\r\n", b".\r\r\n"):
        assert not buffer.feed(fake)
    assert buffer.feed(b".\r\n")
    assert buffer.outcome is DataOutcome.BARE_NEWLINE


def test_dot_unstuffing_and_header_end() -> None:
    buffer = MessageBuffer(None)
    for line in (b"Subject: a\r\n", b" folded\r\n", b"\r\n", b"..x\r\n", b".\r\n"):
        buffer.feed(line)
    assert buffer.outcome is DataOutcome.OK
    assert buffer.header_end == len(b"Subject: a\r\n folded\r\n")
    assert buffer.finish() == b"Subject: a\r\n folded\r\n\r\n.x\r\n"


def test_size_limit_counts_the_stuffed_bytes_and_keeps_nothing() -> None:
    buffer = MessageBuffer(10)
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
    buffer = MessageBuffer(8)
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
    buffer = MessageBuffer(None)
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
    buffer = MessageBuffer(None)
    buffer.feed(b"a\rb\r\n")
    try:
        buffer.finish()
    except ValueError:
        pass
    else:
        raise AssertionError("finish() gave content of a refused message")


async def test_pieces_of_a_long_line_never_split_a_crlf() -> None:
    # What relay/inbound/lines.SessionReader.data_block does as the StreamReader did (the
    # reference of tests/unit/test_inbound_lines.py): after a LimitOverrunError,
    # read(consumed) returns bytes holding no CRLF and not ending with the CR of one,
    # however the bytes arrived (asyncio leaves the last byte when the separator is not
    # found).
    for at in (1, 999, 1000, 1001, 1002, 1500, 2500, 2501):
        data = b"x" * 2500 + b"\r\n.\r\n"
        reader = asyncio.StreamReader(limit=1001)
        reader.feed_data(data[:at])
        buffer, pieces = MessageBuffer(None), list[bytes]()
        task = asyncio.create_task(_read_all(reader, buffer, pieces))
        await asyncio.sleep(0)
        reader.feed_data(data[at:])
        assert await task
        assert buffer.outcome is DataOutcome.OK
        partial = [p for p in pieces if not p.endswith(b"\r\n")]
        assert partial
        assert all(b"\r\n" not in p and not p.endswith(b"\r") for p in partial)
        assert buffer.finish() == data[:-3]


async def _read_all(
    reader: asyncio.StreamReader, buffer: MessageBuffer, pieces: list[bytes]
) -> bool:
    while True:
        try:
            chunk = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as exc:
            chunk = await reader.read(exc.consumed)
        pieces.append(chunk)
        if buffer.feed(chunk):
            return True
