"""How the listener reads a session over real sockets: whatever way the bytes arrive.

The listener reads what a connection delivers in blocks (relay/inbound/lines.py) and takes
DATA a block at a time (relay/inbound/data.py MessageBuffer.feed_block): the end of data cut
across TCP segments at every position, dot-stuffed and over-long lines cut anywhere,
commands a pipelining client (RFC 2920) sends in the segment that ends the data, the DATA
memory budget spent in the middle of a block, and the multiline EHLO reply (one write) even
when the session is closed in the middle of it. The session's objects go when the session
does, without waiting for the cyclic garbage collector.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import weakref

import pytest

from relay.inbound.session import RelaySMTP
from tests.integration.test_listener import MESSAGE, Client, running

# A dot-stuffed line, a line past the 1001-byte reader limit, and the end of data followed
# by a command: every position is cut at once (two writes, the second a moment later).
_STUFFED = b"Subject: cut\r\n\r\n..dot\r\n" + b"x" * 1200 + b"\r\n.\r\nNOOP\r\n"
_CONTENT = b"Subject: cut\r\n\r\n.dot\r\n" + b"x" * 1200 + b"\r\n"


def _positions() -> list[int]:
    size = len(_STUFFED)
    return sorted({*range(1, 40), *range(1000, 1060), *range(size - 20, size)})


async def test_end_of_data_and_long_lines_cut_at_every_position() -> None:
    async with running(max_message_size="5000") as lab:
        positions = _positions()
        async with Client.connect(lab) as c:
            await c.hello()
            for at in positions:
                assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n")).startswith("250")
                assert (await c.cmd(b"RCPT TO:<u@d.test>\r\n")).startswith("250")
                assert (await c.cmd(b"DATA\r\n")).startswith("354")
                c.writer.write(_STUFFED[:at])
                await c.writer.drain()
                await asyncio.sleep(0.002)
                c.writer.write(_STUFFED[at:])
                assert (await c.reply())[-1].startswith("250 2.0.0 Ok: queued as "), at
                assert (await c.reply()) == ["250 OK"], at  # the NOOP behind the end
    assert len(lab.store.puts) == len(positions)
    for msg in lab.store.puts:
        assert msg.data.endswith(b"\r\n.dot\r\n" + b"x" * 1200 + b"\r\n")
        assert b"Subject: cut\r\n" in msg.data


async def test_bare_newlines_at_a_cut_are_refused() -> None:
    # The CR of a CRLF at the end of one segment and its LF in the next is no bare newline;
    # a lone CR or LF on either side of a cut is.
    async with running() as lab, Client.connect(lab) as c:
        await c.hello()
        for body, cut, reply in (
            (b"a\r\nb\r\n", 2, "250 2.0.0"),
            (b"a\rb\r\n", 2, "550 5.5.2"),
            (b"a\r\nb\nc\r\n", 4, "550 5.5.2"),
            (b"a\n\r\nb\r\n", 2, "550 5.5.2"),
            (b"y" * 1500 + b"\r" + b"z\r\n", 1501, "550 5.5.2"),
        ):
            assert await c.cmd(b"MAIL FROM:<app@src.test>\r\nRCPT TO:<u@d.test>\r\n")
            assert (await c.reply())[-1].startswith("250")
            assert (await c.cmd(b"DATA\r\n")).startswith("354")
            c.writer.write(body[:cut])
            await c.writer.drain()
            await asyncio.sleep(0.002)
            assert (await c.cmd(body[cut:] + b".\r\n")).startswith(reply), body[:12]
    assert [m.data.endswith(b"\r\na\r\nb\r\n") for m in lab.store.puts] == [True]


async def test_commands_pipelined_behind_the_end_of_data() -> None:
    # RFC 2920: the next transaction may come in the segment that ends the data.
    transaction = b"MAIL FROM:<app@src.test>\r\nRCPT TO:<u@d.test>\r\nDATA\r\n" + MESSAGE + b".\r\n"
    async with running() as lab, Client.connect(lab) as c:
        await c.hello()
        c.writer.write(transaction * 3 + b"QUIT\r\n")
        replies = [(await c.reply())[-1][:3] for _ in range(13)]
        assert replies == ["250", "250", "354", "250"] * 3 + ["221"]
        assert await c.closed()
    assert [msg.data.endswith(b"\r\n\r\nHello.\r\n") for msg in lab.store.puts] == [True] * 3


async def test_data_budget_spent_within_a_block() -> None:
    # Another session holds most of the listener's DATA memory budget: a message arriving
    # in one block does not fit; it is refused (451 4.3.1) once its end came, its budget
    # is given back, and it fits once the other session is done.
    message = b"Subject: b\r\n\r\n" + b"y" * 78 + b"\r\n" * 1 + (b"z" * 48 + b"\r\n") * 8
    async with (
        running(max_message_size="1000", max_data_in_flight="1000") as lab,
        Client.connect(lab) as holder,
        Client.connect(lab) as late,
    ):
        await holder.hello()
        await late.hello()
        assert (await holder.cmd(b"MAIL FROM:<app@src.test>\r\n")).startswith("250")
        assert (await holder.cmd(b"RCPT TO:<u@d.test>\r\n")).startswith("250")
        assert (await holder.cmd(b"DATA\r\n")).startswith("354")
        holder.writer.write(b"Subject: h\r\n\r\n" + (b"h" * 98 + b"\r\n") * 8)
        await holder.writer.drain()
        sessions = lab.listener._sessions
        for _ in range(200):
            if sessions.data.held >= 800:
                break
            await asyncio.sleep(0.01)
        assert sessions.data.held == 14 + 800
        reply = await late.send("app@src.test", ["u@d.test"], message)
        assert reply == "451 4.3.1 Insufficient system storage, try again later"
        assert sessions.data.held == 14 + 800
        assert (await holder.cmd(b".\r\n")).startswith("250 2.0.0")
        assert sessions.data.held == 0
        assert (await late.send("app@src.test", ["u@d.test"], message)).startswith("250 2.0.0")
    assert sessions.data.held == 0
    assert len(lab.store.puts) == 2
    [refused] = lab.events("rejected")
    assert (refused["stage"], refused["code"]) == ("data", "451 4.3.1")


async def test_ehlo_reply_lines() -> None:
    async with running() as lab, Client.connect(lab) as c:
        assert await c.hello() == [
            "250-relay.test",
            "250-SIZE 52428800",
            "250-8BITMIME",
            "250-SMTPUTF8",
            "250-DSN",
            "250 HELP",
        ]
        assert await c.cmd(b"EHLO again.test\r\n") == "250 HELP"


async def test_replies_held_for_the_ehlo_reply_go_out_before_the_session_closes() -> None:
    # EHLO without a name is answered (501) while the EHLO reply is being held back to go
    # out in one write; when that error is one too many, 501 and 421 still reach the client.
    async with running(max_errors="2") as lab, Client.connect(lab) as c:
        await c.hello()
        assert await c.cmd(b"BOGUS\r\n") == "500 5.5.2 Command not recognized"
        c.writer.write(b"EHLO\r\n")
        assert await c.reply() == ["501 Syntax: EHLO hostname"]
        assert await c.reply() == ["421 4.7.0 Too many errors, closing connection"]
        assert await c.closed()
    assert lab.events("rejected")[-1]["stage"] == "session"


@pytest.mark.parametrize("ending", [b"QUIT\r\n", b""])
async def test_a_finished_session_is_freed_without_the_garbage_collector(ending: bytes) -> None:
    async with running() as lab:
        gc.collect()
        gc.disable()
        try:
            sessions: list[weakref.ref[RelaySMTP]] = []
            async with Client.connect(lab) as c:
                await c.hello()
                assert (await c.send("app@src.test", ["u@d.test"], MESSAGE)).startswith("250")
                [session] = lab.listener._sessions.live
                sessions.append(weakref.ref(session))
                del session
                if ending:
                    assert await c.cmd(ending) == "221 Bye"
            for _ in range(200):
                if sessions[0]() is None:
                    break
                await asyncio.sleep(0.01)
            assert sessions[0]() is None
        finally:
            gc.enable()


async def test_aiosmtpd_logs_as_aiosmtpd_did(caplog: pytest.LogCaptureFixture) -> None:
    # The relay leaves aiosmtpd's logger ("mail.log") unconfigured, but a process that
    # turns it on gets aiosmtpd's records, in aiosmtpd's order (the AUTH secret masked).
    async with running() as lab:
        with caplog.at_level(logging.DEBUG, logger="mail.log"):
            async with Client.connect(lab) as c:
                await c.hello()
                assert (await c.send("app@src.test", ["u@d.test"], MESSAGE)).startswith("250")
                await c.cmd(b"AUTH PLAIN c2VjcmV0\r\n")
                await c.cmd(b"BOGUS x\r\n")
                assert await c.cmd(b"QUIT\r\n") == "221 Bye"
                assert await c.closed()
            await asyncio.sleep(0.05)
    peer = re.compile(r"\('127\.0\.0\.1', \d+\)")
    records = [
        f"{r.levelname} {peer.sub('PEER', r.getMessage())}"
        for r in caplog.records
        if r.name == "mail.log" and not r.getMessage().startswith("Available AUTH")
    ]
    assert records == [
        "INFO Peer: PEER",
        "INFO PEER handling connection",
        "DEBUG PEER << b'220 relay.test ESMTP sts-relay'",
        "DEBUG _handle_client readline: b'EHLO app.example.test\\r\\n'",
        "INFO PEER >> b'EHLO app.example.test'",
        "DEBUG PEER << b'250-relay.test'",
        "DEBUG PEER << b'250-SIZE 52428800'",
        "DEBUG PEER << b'250-8BITMIME'",
        "DEBUG PEER << b'250-SMTPUTF8'",
        "DEBUG PEER << b'250-DSN'",
        "DEBUG PEER << b'250 HELP'",
        "DEBUG _handle_client readline: b'MAIL FROM:<app@src.test>\\r\\n'",
        "INFO PEER >> b'MAIL FROM:<app@src.test>'",
        "INFO PEER sender: app@src.test",
        "DEBUG PEER << b'250 OK'",
        "DEBUG _handle_client readline: b'RCPT TO:<u@d.test>\\r\\n'",
        "INFO PEER >> b'RCPT TO:<u@d.test>'",
        "INFO PEER recip: u@d.test",
        "DEBUG PEER << b'250 2.1.5 Ok'",
        "DEBUG _handle_client readline: b'DATA\\r\\n'",
        "INFO PEER >> b'DATA'",
        "DEBUG PEER << b'354 End data with <CR><LF>.<CR><LF>'",
        "DEBUG PEER << b'250 2.0.0 Ok: queued as Q1'",
        "DEBUG _handle_client readline: b'AUTH PLAIN ********\\r\\n'",
        "INFO PEER >> b'AUTH PLAIN ********'",
        "DEBUG PEER << b'538 5.7.11 Encryption required for requested authentication mechanism'",
        "DEBUG _handle_client readline: b'BOGUS x\\r\\n'",
        "INFO PEER >> b'BOGUS x'",
        "WARNING PEER unrecognised: BOGUS",
        "DEBUG PEER << b'500 5.5.2 Command not recognized'",
        "DEBUG _handle_client readline: b'QUIT\\r\\n'",
        "INFO PEER >> b'QUIT'",
        "DEBUG PEER << b'221 Bye'",
        "INFO PEER connection lost",
        "INFO PEER Connection lost during _handle_client()",
    ]
