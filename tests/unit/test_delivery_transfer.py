"""The DATA encoder (relay/delivery/transfer.py): chunked CRLF normalisation and
dot-stuffing equal the whole-message form for any split points. IDs refer to
/work/shared/RFC-CHECKLIST.md (SMTP-14, SMTP-15, SMUG-06)."""

from __future__ import annotations

import re

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from relay.delivery.transfer import DataEncoder, encode_data


def whole_message(message: bytes) -> bytes:
    """The straightforward form: normalise line ends, end with CRLF, dot-stuff, end '.'."""
    lines = re.split(rb"\r\n|\n|\r", message)
    if message and lines[-1] == b"":
        lines.pop()  # the message ended with a line break (an empty one is one empty line)
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


def chunked(message: bytes, cuts: list[int]) -> bytes:
    encoder = DataEncoder()
    bounds = sorted({min(c, len(message)) for c in cuts})
    out, start = [], 0
    for end in [*bounds, len(message)]:
        out.append(encoder.feed(message[start:end]))
        start = end
    out.append(encoder.finish())
    return b"".join(out)


# Messages made of the bytes that matter here: CR, LF, dots and a letter.
messages = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b"..", b"\r\n.\r\n"]))


@given(messages.map(b"".join), st.lists(st.integers(min_value=0, max_value=64), max_size=12))
def test_chunked_equals_whole_message_for_any_split(message: bytes, cuts: list[int]) -> None:
    assert chunked(message, cuts) == whole_message(message)


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=8))
def test_chunked_equals_aiosmtplib_for_any_bytes(message: bytes, cuts: list[int]) -> None:
    # aiosmtplib's data() encoding, which this replaces, applied to the whole message.
    reference = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"
    assert chunked(message, cuts) == reference


@given(messages.map(b"".join), st.lists(st.integers(min_value=0, max_value=64), max_size=12))
def test_output_has_no_bare_line_ends_and_one_end_of_data(message: bytes, cuts: list[int]) -> None:
    # SMTP-15 and SMUG-06: only CRLF on the wire, and "\r\n.\r\n" only at the very end.
    out = chunked(message, cuts)
    assert out.count(b"\r") == out.count(b"\r\n") == out.count(b"\n")
    assert (b"\r\n" + out).find(b"\r\n.\r\n") == len(out) - 3


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (b"", b"\r\n.\r\n"),
        (b".hidden\r\n", b"..hidden\r\n.\r\n"),  # SMTP-14
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),  # SMUG-06: normalise, then stuff
        (b"a\rb\r", b"a\r\nb\r\n.\r\n"),  # SMTP-15: bare CR
        (b"no newline at end", b"no newline at end\r\n.\r\n"),
    ],
)
def test_examples(message: bytes, wire: bytes) -> None:
    assert encode_data(message) == wire


def test_crlf_split_across_pieces_stays_one_line_end() -> None:
    encoder = DataEncoder()
    out = encoder.feed(b"a\r") + encoder.feed(b"\n.b\r") + encoder.feed(b"\n") + encoder.finish()
    assert out == b"a\r\n..b\r\n.\r\n"
