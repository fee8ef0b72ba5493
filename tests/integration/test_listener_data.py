"""DATA through the listener's own reader, beside stock aiosmtpd 1.4.6, over real sockets.

The same byte stream goes to a stock aiosmtpd server (what the listener used to run, here
without its line length limit: issue 13) and to the listener: the listener must answer the
same way (with its own reply texts, and 550 5.5.2 where the old handler refused bare CR/LF)
and store exactly the stock content with only our header fields added. Plus the limits one
by one, each leaving the session usable.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.inbound.headers import has_bare_cr_or_lf, header_end
from tests.integration.test_listener import MESSAGE, Client, Lab, running

_RECEIVED = re.compile(rb"Received: (?:[^\r]|\r\n[ \t])*\r\n")
_ADDED = re.compile(rb"(?:\r\n)?(?:Date: [^\r\n]+\r\n)?(?:Message-ID: <[^\r\n]+>\r\n)?(?:\r\n)?")


class _NoLineLimitSMTP(SMTP):
    """Stock aiosmtpd, but lines of any length (up to the size limit) are taken."""

    line_length_limit = 1 << 20


class _Keep:
    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.contents.append(bytes(envelope.original_content or b""))
        return "250 OK"


@asynccontextmanager
async def _stock(limit: int) -> AsyncIterator[tuple[tuple[str, int], _Keep]]:
    keep = _Keep()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _NoLineLimitSMTP(keep, decode_data=False, data_size_limit=limit, loop=loop),
        "127.0.0.1",
        0,
    )
    try:
        yield server.sockets[0].getsockname()[:2], keep
    finally:
        server.close()
        await server.wait_closed()


async def _transaction(client: Client, stream: bytes) -> str:
    await client.hello()
    return await client.send("app@src.test", ["u@d.test"], stream)


def _stored_as(stored: bytes, content: bytes) -> bool:
    """`stored` is one Received field, then `content` with at most Date, Message-ID and the
    CRLFs they need inserted where its header section ends."""
    received = _RECEIVED.match(stored)
    if received is None:
        return False
    rest = stored[received.end() :]
    end = header_end(content)
    if not (rest.startswith(content[:end]) and rest.endswith(content[end:])):
        return False
    return _ADDED.fullmatch(rest[end : len(rest) - (len(content) - end)]) is not None


_clean = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from(
        [
            b"",
            b"..",
            b".x",
            b"...",
            b". .",
            b"Subject: x",
            b" folded",
            b"\tfolded",
            b"Date: d",
            b"Message-ID: <m@x.test>",
            b"Received: r",
            b"y" * 999,
        ]
    ),
).filter(lambda line: line != b".")
_bad = st.sampled_from([b"\r", b"\n", b"a\rb", b"a\nb", b".\n.", b"y" * 1000, b"z" * 1500])


@st.composite
def _lines(draw: st.DrawFn) -> list[bytes]:
    """Mostly clean lines; in about a third of the examples one line that must fail."""
    lines = draw(st.lists(_clean, max_size=10))
    if draw(st.integers(0, 2)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(_bad))
    return lines


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_lines(), st.integers(60, 4000))
def test_same_replies_and_content_as_stock_aiosmtpd(lines: list[bytes], limit: int) -> None:
    stream = b"".join(line + b"\r\n" for line in lines)

    async def run() -> None:
        async with _stock(limit) as (address, keep), Client.connect(address=address) as c:
            stock = await _transaction(c, stream)
        async with running(max_message_size=str(limit)) as lab, Client.connect(lab) as c:
            ours = await _transaction(c, stream)
            assert (await c.cmd(b"NOOP\r\n")).startswith("250")  # the session goes on
        _compare(stock, keep.contents, ours, lab)

    asyncio.run(run())


def _compare(stock: str, contents: list[bytes], ours: str, lab: Lab) -> None:
    if stock.startswith("552"):
        assert ours.startswith("552 5.3.4 "), ours
    else:
        assert stock == "250 OK", stock
        [content] = contents
        if has_bare_cr_or_lf(content):
            assert ours == "550 5.5.2 Message contains bare CR or LF"
        else:
            assert ours.startswith("250 2.0.0 Ok: queued as "), ours
            [msg] = lab.store.puts
            assert _stored_as(msg.data, content), (msg.data, content)
            return
    assert lab.store.puts == []
    [event] = lab.events("rejected")
    assert (event["stage"], event["code"]) == ("data", ours[:9])


async def _limited_session(lab: Lab, stream: bytes, expected: str) -> None:
    async with Client.connect(lab) as c:
        assert await _transaction(c, stream) == expected
        # Drained to the end of data: the next transaction in the session works.
        assert (await c.send("app@src.test", ["u@d.test"], MESSAGE)).startswith("250 2.0.0")


async def test_size_limit_is_enforced_while_reading() -> None:
    async with running(max_message_size="1000") as lab:
        big = b"Subject: big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 50
        await _limited_session(
            lab, big, "552 5.3.4 Message size exceeds fixed maximum message size"
        )
    [msg] = lab.store.puts
    assert b"xxxx" not in msg.data


async def test_a_message_exactly_at_the_limit_is_accepted() -> None:
    body = b"Subject: s\r\n\r\n" + b"..x\r\n" * 10  # the limit counts bytes as sent
    async with running(max_message_size=str(len(body))) as lab, Client.connect(lab) as c:
        assert (await _transaction(c, body)).startswith("250 2.0.0")
    [msg] = lab.store.puts
    assert msg.data.endswith(b"\r\n\r\n" + b".x\r\n" * 10)


async def test_long_lines_are_kept_unchanged() -> None:
    # Issue 13: lines past RFC 5321's 998 characters are taken as they came, in the body
    # and in the header section (which still ends where it should).
    long_header = b"X-Long: " + b"h" * 3000 + b"\r\n"
    body = b"y" * 5000 + b"\r\n.." + b"z" * 70_000 + b"\r\nafter\r\n"
    async with running() as lab, Client.connect(lab) as c:
        reply = await _transaction(c, b"Subject: s\r\n" + long_header + b"\r\n" + body)
        assert reply.startswith("250 2.0.0 "), reply
    [msg] = lab.store.puts
    head, _, stored_body = msg.data.partition(b"\r\n\r\n")
    # The long field stays whole, and Date and Message-ID go after it, at the header's end.
    assert long_header + b"Date: " in head
    assert head.index(b"\r\nMessage-ID: ") > head.index(long_header)
    assert stored_body == body.replace(b"\r\n..", b"\r\n.")


async def test_bare_newline_inside_a_long_line_is_refused() -> None:
    async with running() as lab:
        stream = b"Subject: s\r\n\r\n" + b"y" * 5000 + b"\n" + b"y" * 3000 + b"\r\n"
        await _limited_session(lab, stream, "550 5.5.2 Message contains bare CR or LF")
    assert len(lab.store.puts) == 1


async def test_bare_newlines_anywhere_are_refused() -> None:
    async with running() as lab:
        for stream in (
            b"Subj\rect: x\r\n\r\nbody\r\n",  # in the header section
            b"Subject: x\r\n\r\n" + b"ok\r\n" * 500 + b"late\n.\nline\r\n",  # deep in the body
            b"Subject: x\r\n\r\nends with CR\r\r\n",
            b"Subject: x\r\n\r\n\nstarts with LF\r\n",
        ):
            await _limited_session(lab, stream, "550 5.5.2 Message contains bare CR or LF")
    assert len(lab.store.puts) == 4
    assert all(b"Subject: clean" not in m.data and b"hello" in m.data for m in lab.store.puts)
    assert [e["code"] for e in lab.events("rejected")] == ["550 5.5.2"] * 4


async def test_headers_are_spliced_into_a_dot_stuffed_message() -> None:
    stream = b"From: a@src.test\r\n..Weird: x\r\n\r\n..\r\n.body\r\n"
    async with running() as lab, Client.connect(lab) as c:
        assert (await _transaction(c, stream)).startswith("250 2.0.0")
    [msg] = lab.store.puts
    head, sep, body = msg.data.partition(b"\r\n\r\n")
    assert sep
    assert body == b".\r\nbody\r\n"
    assert head.startswith(b"Received: from app.example.test ([127.0.0.1])\r\n")
    assert b"\r\nFrom: a@src.test\r\n.Weird: x\r\nDate: " in head
    assert re.search(rb"\r\nMessage-ID: <[^>]+@relay\.test>$", head)
