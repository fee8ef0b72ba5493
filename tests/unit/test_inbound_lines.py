"""relay/inbound/lines.SessionReader against the reading it replaced (asyncio, no sockets).

The listener used to read a session through its asyncio.StreamReader (limit: aiosmtpd's
line_length_limit, 1001): command lines with readuntil(b"\\n") (a bare LF refused, a line
past the limit drained and answered as too long), AUTH answers with readline(), and DATA a
line at a time with readuntil(b"\\r\\n") (a line past the limit in pieces, read() after a
LimitOverrunError) fed to MessageBuffer.feed. `_reference` below is that reading,
transcribed. SessionReader, with MessageBuffer.feed_block, must give the same command lines
and errors, the same DATA outcome, content and header end, the same budget, and leave the
same bytes for what follows (a pipelining client), however the bytes arrive: cut anywhere,
one byte at a time, or all at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.inbound.data import DataOutcome, MessageBuffer
from relay.inbound.lines import BareLfCommand, LongCommand, SessionReader
from relay.inbound.slots import DataBudget

LIMIT = 1001  # aiosmtpd's SMTP.line_length_limit, the listener's StreamReader limit

# A command line, "long", "bare", "eof", an AUTH answer or its ValueError, or a DATA section:
# (outcome, content if OK, header end, budget held by it).
Result = bytes | str | tuple[str, bytes | None, int, int]


@dataclass
class _Side:
    """One implementation's session: what it read, in order."""

    size_limit: int | None
    budget: DataBudget
    results: list[Result] = field(default_factory=list)

    def summary(self, buffer: MessageBuffer) -> tuple[str, bytes | None, int, int]:
        outcome = buffer.outcome
        header_end = buffer.header_end
        content = buffer.finish() if outcome is DataOutcome.OK else None
        held = self.budget.held
        buffer.release()
        return outcome.value, content, header_end, held


async def _script(
    side: _Side,
    command: Callable[[], Awaitable[Result]],
    data: Callable[[MessageBuffer], Awaitable[bool]],
    readline: Callable[[], Awaitable[Result]],
) -> None:
    """A small SMTP-like conversation: commands; DATA reads a DATA section; AUTH reads one
    answer line. Stops at EOF."""
    while True:
        result = await command()
        side.results.append(result)
        if result == "eof":
            return
        if result == b"DATA\r\n":
            buffer = MessageBuffer(side.size_limit, side.budget)
            if not await data(buffer):
                buffer.release()
                side.results.append("eof")
                return
            side.results.append(side.summary(buffer))
        elif result == b"AUTH\r\n":
            side.results.append(await readline())


# --- the reference: the StreamReader reading of before --------------------------------------


def _reference(reader: asyncio.StreamReader, side: _Side) -> Coroutine[Any, Any, None]:
    async def command() -> Result:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            await reader.read(exc.consumed)
            while True:
                try:
                    await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError as more:
                    await reader.read(more.consumed)
                except asyncio.IncompleteReadError:
                    return "eof"
                else:
                    return "long"
        except asyncio.IncompleteReadError:
            return "eof"
        return line if line.endswith(b"\r\n") else "bare"

    async def data(buffer: MessageBuffer) -> bool:
        try:
            while True:
                try:
                    chunk = await reader.readuntil(b"\r\n")
                except asyncio.LimitOverrunError as exc:
                    chunk = await reader.read(exc.consumed)
                if buffer.feed(chunk):
                    return True
        except asyncio.IncompleteReadError:
            return False

    async def readline() -> Result:
        try:
            return await reader.readline()
        except ValueError as exc:
            return f"ValueError: {exc}"

    return _script(side, command, data, readline)


# --- SessionReader ------------------------------------------------------------------------------


def _session_reader(lines: SessionReader, side: _Side) -> Coroutine[Any, Any, None]:
    async def command() -> Result:
        try:
            return await lines.command_line()
        except LongCommand:
            return "long"
        except BareLfCommand:
            return "bare"
        except asyncio.IncompleteReadError:
            return "eof"

    async def data(buffer: MessageBuffer) -> bool:
        lines.begin_data()
        try:
            while True:
                part, end = await lines.data_block()
                buffer.feed_block(part, LIMIT)
                if end:
                    return True
        except asyncio.IncompleteReadError:
            return False

    async def readline() -> Result:
        try:
            return await lines.readline()
        except ValueError as exc:
            return f"ValueError: {exc}"

    return _script(side, command, data, readline)


async def _both(
    segments: list[bytes], size_limit: int | None = None, budget: int = 1 << 30
) -> list[Result]:
    """Feed `segments` one by one to both (each settles before the next); the results,
    which must agree."""
    loop = asyncio.get_running_loop()
    reference = asyncio.StreamReader(limit=LIMIT)
    stream = asyncio.StreamReader(limit=LIMIT)
    lines = SessionReader(stream, None, limit=LIMIT, loop=loop)
    old, new = _Side(size_limit, DataBudget(budget)), _Side(size_limit, DataBudget(budget))
    tasks: list[asyncio.Task[None]] = [
        asyncio.create_task(_reference(reference, old)),
        asyncio.create_task(_session_reader(lines, new)),
    ]
    for segment in segments:
        reference.feed_data(segment)
        lines.feed(segment)
        for _ in range(5):
            await asyncio.sleep(0)
    reference.feed_eof()
    stream.feed_eof()
    lines.wake()
    async with asyncio.timeout(5):
        await asyncio.gather(*tasks)
    assert new.results == old.results
    assert new.budget.held == old.budget.held == 0
    return new.results


def _cuts(stream: bytes, positions: list[int]) -> list[bytes]:
    points = sorted({p for p in positions if 0 < p < len(stream)})
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]


# --- what the listener sees ---------------------------------------------------------------------

_COMMANDS = st.sampled_from(
    [
        b"NOOP\r\n",
        b"MAIL FROM:<a@b.test>\r\n",
        b"NOOP\n",  # bare LF
        b"\r\n",
        b"\n",
        b"QUIT\r\n",
        b"x" * 998 + b"\r\n",
        b"x" * 999 + b"\r\n",
        b"x" * 1000 + b"\r\n",
        b"x" * 1001 + b"\r\n",
        b"x" * 1002 + b"\r\n",
        b"x" * 2500 + b"\r\n",
        b"x" * 1000 + b"\n",
        b"AUTH\r\n" + b"dXNlcg==\r\n",
        b"AUTH\r\n" + b"y" * 1500 + b"\r\n",
        b"AUTH\r\n" + b"y" * 1002 + b"\n",
    ]
)
_BODY_LINES = st.sampled_from(
    [
        b"Subject: x",
        b" folded",
        b"From: a@b.test",
        b"",
        b".",
        b"..",
        b".x",
        b"...",
        b"a\rb",
        b"a\nb",
        b"\r",
        b"\n",
        b"\n.",
        b".\n",
        b"x" * 999,
        b"x" * 1000,
        b"x" * 1001,
        b"x" * 1002,
        b"x" * 1500,
        b"." + b"y" * 1200,
        b"z" * 3000,
        b"z" * 1200 + b"\r",
    ]
)


@st.composite
def _data(draw: st.DrawFn) -> bytes:
    body = b"".join(line + b"\r\n" for line in draw(st.lists(_BODY_LINES, max_size=8)))
    end = draw(st.sampled_from([b".\r\n", b".\r\n", b".\r\n", b"", b".\n", b"\n.\n"]))
    return b"DATA\r\n" + body + end


_STREAMS = st.lists(st.one_of(_COMMANDS, _data()), min_size=1, max_size=6).map(b"".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _STREAMS,
    st.lists(st.integers(1, 12000), max_size=8),
    st.one_of(st.none(), st.integers(0, 4000)),
    st.integers(900, 6000),
)
def test_same_reading_as_the_stream_reader(
    stream: bytes, positions: list[int], size_limit: int | None, budget: int
) -> None:
    asyncio.run(_both(_cuts(stream, positions), size_limit, budget))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_STREAMS)
def test_same_reading_byte_by_byte_and_all_at_once(stream: bytes) -> None:
    asyncio.run(_both([stream[i : i + 1] for i in range(len(stream))]))
    asyncio.run(_both([stream]))


_MESSAGE = b"Subject: a\r\n\r\n..dot\r\nbody\r\n"
_SESSION = b"DATA\r\n" + _MESSAGE + b".\r\nNOOP\r\n"


async def test_end_of_data_cut_at_every_position() -> None:
    for at in range(1, len(_SESSION)):
        results = await _both([_SESSION[:at], _SESSION[at:]])
        assert results == [
            b"DATA\r\n",
            ("ok", b"Subject: a\r\n\r\n.dot\r\nbody\r\n", len(b"Subject: a\r\n"), 26),
            b"NOOP\r\n",
            "eof",
        ], at


async def test_long_lines_and_bare_newlines_cut_at_every_position() -> None:
    long_line = b"." + b"x" * 1500 + b"\r\n"  # dot-stuffed, past the limit
    for body, outcome in (
        (long_line, "ok"),
        (b"a\r" + b"x" * 1200 + b"\r\n", "bare newline"),
        (b"x" * 1200 + b"\nb\r\n", "bare newline"),
    ):
        stream = b"DATA\r\n" + body + b".\r\nNOOP\r\n"
        for at in (*range(1, 12), *range(1000, 1012), *range(len(stream) - 14, len(stream))):
            results = await _both([stream[:at], stream[at:]])
            assert results[1][0] == outcome, (body[:10], at)
            assert results[2:] == [b"NOOP\r\n", "eof"]
    results = await _both([b"DATA\r\n" + long_line + b".\r\n"])
    assert results[1] == ("ok", long_line[1:], 0, len(long_line) - 1)


async def test_pipelined_commands_after_the_end_of_data() -> None:
    # RFC 2920: a client may send its next commands in the same segment as the end.
    message = b"From: a@b.test\r\n\r\nhi\r\n"
    stream = b"DATA\r\n" + message + b".\r\nMAIL FROM:<c@d.test>\r\nDATA\r\n.\r\nQUIT\r\n"
    assert await _both([stream]) == [
        b"DATA\r\n",
        ("ok", message, len(b"From: a@b.test\r\n"), len(message)),
        b"MAIL FROM:<c@d.test>\r\n",
        b"DATA\r\n",
        ("ok", b"", 0, 0),
        b"QUIT\r\n",
        "eof",
    ]


async def test_size_limit_and_budget_exceeded_within_one_part() -> None:
    stream = b"DATA\r\n" + b"x" * 98 + b"\r\n" * 1 + (b"y" * 48 + b"\r\n") * 20 + b".\r\nNOOP\r\n"
    assert (await _both([stream], size_limit=500))[1][0] == "too much"
    assert (await _both([stream], budget=300))[1][0] == "no room"
    assert (await _both([stream], size_limit=500, budget=300))[1][0] == "no room"
    assert (await _both([stream], size_limit=200, budget=300))[1][0] == "too much"
    # A line past the reader's limit came as its text, then its CRLF: the budget fails on
    # the text before the size limit is passed by the CRLF.
    long_line = b"DATA\r\n" + b"x" * 1500 + b"\r\n.\r\n"
    assert (await _both([long_line], size_limit=1500, budget=1000))[1][0] == "no room"
    assert (await _both([long_line], size_limit=1499, budget=1000))[1][0] == "too much"


class _Transport:
    """Records the flow control SessionReader asks for."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")


async def test_flow_control_is_the_stream_readers() -> None:
    # Paused past twice the limit held, resumed once no more than the limit is, or when a
    # read has to wait (StreamReader.feed_data, _maybe_resume_transport, _wait_for_data).
    transport = _Transport()
    lines = SessionReader(
        asyncio.StreamReader(limit=LIMIT),
        transport,  # type: ignore[arg-type]
        limit=LIMIT,
        loop=asyncio.get_running_loop(),
    )
    lines.feed(b"NOOP\r\n" * 300 + b"DATA\r\n")  # 1806 bytes: not yet
    assert transport.calls == []
    lines.feed(b"x" * 300)  # 2106
    assert transport.calls == ["pause"]
    for _ in range(184):
        assert await lines.command_line() == b"NOOP\r\n"
    assert transport.calls == ["pause"]  # 1002 bytes held
    await lines.command_line()
    assert transport.calls == ["pause", "resume"]  # 996
    lines.feed(b"y" * 2000)
    assert transport.calls == ["pause", "resume", "pause"]
    for _ in range(115):
        await lines.command_line()
    assert await lines.command_line() == b"DATA\r\n"
    lines.begin_data()
    part, end = await lines.data_block()  # a piece of the long line: all but its last byte
    assert (len(part), end) == (2299, False)
    assert transport.calls == ["pause", "resume", "pause", "resume"]


async def test_a_read_that_waits_resumes_reading() -> None:
    transport = _Transport()
    lines = SessionReader(
        asyncio.StreamReader(limit=LIMIT),
        transport,  # type: ignore[arg-type]
        limit=LIMIT,
        loop=asyncio.get_running_loop(),
    )
    lines.feed(b"z" * 2100)  # held, paused: no line end, past the limit
    assert transport.calls == ["pause"]
    lines.discard()  # (STARTTLS: the cleartext is dropped, the reader stays paused)
    task = asyncio.create_task(lines.command_line())
    await asyncio.sleep(0)
    assert transport.calls == ["pause", "resume"]
    lines.feed(b"NOOP\r\n")
    assert await task == b"NOOP\r\n"


async def test_eof_and_errors_come_from_the_stream_reader() -> None:
    stream = asyncio.StreamReader(limit=LIMIT)
    lines = SessionReader(stream, None, limit=LIMIT, loop=asyncio.get_running_loop())
    command = asyncio.create_task(lines.command_line())
    lines.feed(b"NO")
    await asyncio.sleep(0)
    stream.feed_eof()
    lines.wake()
    with pytest.raises(asyncio.IncompleteReadError) as eof:
        await command
    assert eof.value.partial == b"NO"
    stream = asyncio.StreamReader(limit=LIMIT)
    lines = SessionReader(stream, None, limit=LIMIT, loop=asyncio.get_running_loop())
    lines.begin_data()
    data = asyncio.create_task(lines.data_block())
    await asyncio.sleep(0)
    stream.set_exception(ConnectionResetError("reset"))
    lines.wake()
    with pytest.raises(ConnectionResetError):
        await data
