"""The delivery wire's reply parser (relay/delivery/smtp_wire.py): RFC 5321 §4.2 replies,
however the bytes are cut, and nothing else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.delivery.smtp_wire import (
    MAX_LINE,
    MAX_REPLY,
    MalformedReply,
    Reply,
    ReplyQueue,
    SmtpWire,
    ehlo_keywords,
    parse_reply,
)


def _fed(*pieces: bytes) -> ReplyQueue:
    queue = ReplyQueue()
    for piece in pieces:
        queue.data_received(piece)
    return queue


_texts = st.text(alphabet="abcXYZ 0123.-:<>@", max_size=30).map(str.strip)
_replies = st.lists(
    st.tuples(st.integers(200, 599), st.lists(_texts, min_size=1, max_size=4)),
    min_size=1,
    max_size=6,
)


def _wire_form(code: int, lines: list[str]) -> bytes:
    out = b""
    for i, text in enumerate(lines):
        sep = b" " if i == len(lines) - 1 else b"-"
        out += str(code).encode() + sep + text.encode() + b"\r\n"
    return out


@given(_replies, st.lists(st.integers(0, 400), max_size=8))
def test_replies_come_out_whole_and_in_order_however_the_bytes_are_cut(
    replies: list[tuple[int, list[str]]], cuts: list[int]
) -> None:
    stream = b"".join(_wire_form(code, lines) for code, lines in replies)
    points = sorted({min(c, len(stream)) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    queue = _fed(*pieces)
    assert queue.error is None
    assert list(queue.replies) == [Reply(code, "\n".join(lines)) for code, lines in replies]
    assert queue.unread == b""


def test_a_partial_reply_waits_for_the_rest() -> None:
    queue = _fed(b"250-first line\r\n250 sec")
    assert not queue.replies
    assert queue.unread == b"250-first line\r\n250 sec"
    queue.data_received(b"ond\r\n")
    assert list(queue.replies) == [Reply(250, "first line\nsecond")]


def test_bare_lf_and_code_only_lines_are_replies() -> None:
    queue = _fed(b"250\n354 go\r\n")
    assert list(queue.replies) == [Reply(250, ""), Reply(354, "go")]


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (b"hello there\r\n", "malformed reply line: hello there"),
        (b"25 short\r\n", "malformed reply line"),
        (b"250x2.0.0 no separator\r\n", "malformed reply line"),
        (b"250-one\r\n550 two\r\n", "different codes: 250, 550"),
        (b"250 " + b"x" * MAX_LINE + b"\r\n", "longer than"),
        (b"250-" + b"x" * MAX_LINE, "longer than"),
    ],
)
def test_what_is_not_a_reply_is_refused(data: bytes, said: str) -> None:
    queue = _fed(data)
    assert isinstance(queue.error, MalformedReply)
    assert said in str(queue.error)
    queue.data_received(b"250 ignored after the error\r\n")
    assert not queue.replies


def test_a_reply_of_endless_continuation_lines_is_refused() -> None:
    queue = _fed(*(b"250-" + b"y" * 100 + b"\r\n" for _ in range(MAX_REPLY // 100 + 2)))
    assert queue.error is not None
    assert f"longer than {MAX_REPLY}" in str(queue.error)


def test_unread_replies_are_bounded() -> None:
    queue = _fed(*(b"250 " + b"z" * 1000 + b"\r\n" for _ in range(1100)))
    assert queue.error is not None
    assert "left unread" in str(queue.error)


def test_one_reply_reports_the_bytes_it_takes() -> None:
    buffer = bytearray(b"250-a\r\n250 b\r\n221 bye\r\n")
    parsed = parse_reply(buffer)
    assert parsed == (Reply(250, "a\nb"), 14)


def test_ehlo_keywords() -> None:
    message = "mx.example\nPIPELINING\nSIZE 1000\nAUTH=LOGIN\nstarttls\n8BITMIME\n-bad\n"
    assert ehlo_keywords(message) == {
        "pipelining": "",
        "size": "1000",
        "auth": "LOGIN",
        "starttls": "",
        "8bitmime": "",
    }


@pytest.mark.parametrize(
    "command", [b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>", b"NOOP\x00", b"X\n"]
)
def test_a_command_with_a_control_character_is_never_written(command: bytes) -> None:
    # SMUG-07's concern (CR/LF in an address smuggling a command) at the last step.
    wire = SmtpWire(ReplyQueue(), Reply(220, "greeting"))
    with pytest.raises(ValueError, match="control characters"):
        wire.send(b"RSET", command)
