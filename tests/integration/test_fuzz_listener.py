"""Property-based test of the listener over a real socket: random command streams.

Issue 5 item 6. For any stream of commands (valid, half-valid and garbage, DATA bodies with
bare CR/LF, DSN parameters, AUTH in cleartext, over-long lines): no exception escapes (no
`session_error`, no 451 internal error), every reply is a well-formed SMTP reply, and
nothing is half-stored (the store holds exactly the messages answered "250 ... queued").
A handful of examples per run keeps it fast; each gets a fresh listener.
"""

from __future__ import annotations

import asyncio
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.inbound.headers import has_bare_cr_or_lf
from tests.integration.test_listener import Client, running

_REPLY_LINE = re.compile(r"[2-5][0-9]{2}(?:[ -][\x20-\x7e\u0080-\U0010ffff]*)?")

_addresses = st.one_of(
    st.sampled_from(
        [
            "u@d.test",
            "<u@d.test>",
            "<>",
            "<@a.test:u@d.test>",
            '<"x y"@d.test>',
            "<u@[127.0.0.1]>",
            "<u@[IPv6:::1]>",
            "<u%d.test@relay.test>",
            "<u@d.test@e.test>",
            "<u@d.test.>",
            "<a\rb@d.test>",
            "<\xe9@d.test>",
            "<" + "x" * 300 + "@d.test>",
        ]
    ),
    st.text(alphabet=st.characters(blacklist_characters="\n", max_codepoint=0x2FF), max_size=40),
)
_params = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "NOTIFY=NEVER",
                "NOTIFY=SUCCESS,DELAY",
                "NOTIFY=NEVER,FAILURE",
                "ORCPT=rfc822;a+2Bb@d.test",
                "ORCPT=bad",
                "RET=HDRS",
                "RET=xyz",
                "ENVID=a+2Bb",
                "ENVID=a+0D+0A",
                "SIZE=100",
                "SIZE=99999999",
                "SIZE=x",
                "BODY=8BITMIME",
                "BODY=BINARYMIME",
                "SMTPUTF8",
                "REQUIRETLS",
                "AUTH=<>",
                "=",
                "X=",
            ]
        ),
        st.text(alphabet="ABCDEFNOTIFY=+,;0123456789", max_size=12),
    ),
    max_size=3,
)


@st.composite
def _command(draw: st.DrawFn) -> tuple[bytes, list[bytes] | None]:
    """One command line (CRLF-terminated unless it tests a bare LF) and, for DATA, a body."""
    kind = draw(
        st.sampled_from(
            ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "AUTH", "raw", "lf"]
        )
    )
    params = " ".join(draw(_params))
    if kind in ("EHLO", "HELO"):
        line = f"{kind} {draw(st.sampled_from(['app.test', '', '[127.0.0.1]', 'x y']))}"
    elif kind == "MAIL":
        line = f"MAIL FROM:{draw(_addresses)} {params}".rstrip()
    elif kind == "RCPT":
        line = f"RCPT TO:{draw(_addresses)} {params}".rstrip()
    elif kind == "AUTH":
        line = f"AUTH {draw(st.sampled_from(['PLAIN AGFsaWNlAHB3', 'LOGIN', 'CRAM-MD5', '']))}"
    elif kind == "raw":
        line = draw(st.text(alphabet=st.characters(blacklist_characters="\n"), max_size=60))
    elif kind == "lf":
        return b"NOOP\n", None
    else:
        line = kind
    raw = line.encode("utf-8", "surrogateescape") + b"\r\n"
    if kind != "DATA":
        return raw, None
    body = draw(
        st.lists(
            st.binary(max_size=120).filter(lambda b: b"\r\n" not in b and b != b"."),
            max_size=8,
        )
    )
    return raw, body


def _well_formed(reply: list[str]) -> bool:
    codes = {line[:3] for line in reply}
    continued = all(line[3:4] == "-" for line in reply[:-1])
    return (
        all(_REPLY_LINE.fullmatch(line) for line in reply)
        and len(codes) == 1
        and continued
        and reply[-1][3:4] in (" ", "")
    )


async def _session(commands: list[tuple[bytes, list[bytes] | None]]) -> None:
    limited = running(max_message_size="600", max_recipients="3", command_timeout="30")
    async with limited as lab, Client.connect(lab) as c:
        replies: list[list[str]] = [await c.reply()]
        closed = False
        for line, body in commands:
            c.writer.write(line)
            reply = await c.reply()
            replies.append(reply)
            if reply[0].startswith("354") and body is not None:
                c.writer.write(b"\r\n".join(body) + (b"\r\n" if body else b"") + b".\r\n")
                replies.append(await c.reply())
            if replies[-1][0].startswith(("421", "221")):
                closed = True
                break
        if not closed:  # still serving (or just reached the error limit)
            last = await c.cmd(b"NOOP\r\n")
            assert last.startswith(("250", "421 4.7.0 Too many errors")), last
    for reply in replies:
        assert _well_formed(reply), reply
        assert not reply[0].startswith("451"), reply  # no internal error
    queued = [r[-1] for r in replies if r[-1].startswith("250 2.0.0 Ok: queued as ")]
    assert len(lab.store.puts) == len(queued)
    for msg in lab.store.puts:
        assert msg.recipients
        assert msg.data.endswith(b"\r\n")
        assert not has_bare_cr_or_lf(msg.data)  # nothing smuggled into the store
    assert lab.events("session_error") == []


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(_command(), min_size=1, max_size=25))
def test_random_command_streams(commands: list[tuple[bytes, list[bytes] | None]]) -> None:
    asyncio.run(_session(commands))


@settings(max_examples=10, deadline=None)
@given(
    st.lists(st.sampled_from([b"u@d.test", b"v@e.test"]), min_size=1, max_size=3),
    st.lists(st.binary(max_size=80).filter(lambda b: b"\r\n" not in b), max_size=6),
)
def test_a_valid_transaction_stores_exactly_what_was_sent(
    rcpts: list[bytes], lines: list[bytes]
) -> None:
    async def run() -> None:
        async with running() as lab, Client.connect(lab) as c:
            await c.hello()
            body = b"Subject: fuzz\r\n\r\n" + b"".join(
                (b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines
            )
            reply = await c.send("app@src.test", [r.decode() for r in rcpts], body)
            clean = all(b"\r" not in line and b"\n" not in line for line in lines)
            if clean:
                assert reply.startswith("250 2.0.0"), reply
                [msg] = lab.store.puts
                # Dot-stuffing undone, every byte kept, after the headers we add on top.
                expected = b"".join(line + b"\r\n" for line in lines)
                assert msg.data.endswith(b"\r\n\r\n" + expected)
                assert msg.recipients == tuple(r.decode() for r in rcpts)
            else:
                assert reply == "550 5.5.2 Message contains bare CR or LF"
                assert lab.store.puts == []
        assert lab.events("session_error") == []

    asyncio.run(run())
