"""`tls_required_no` answers most messages without parsing their header (a search for a
line that could start the field); the answer is always the full field parser's."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.delivery.tls import tls_required_no

_LIMIT = 256 * 1024


def parsed(message: bytes) -> bool:
    """The field parser alone (relay/delivery/tls.py without its search)."""
    end = message.find(b"\r\n\r\n", 0, _LIMIT)
    if message.startswith(b"\r\n"):
        return False
    head = message[: end if end >= 0 else _LIMIT]
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    values = [
        value.strip().lower()
        for name, colon, value in (field.partition(b":") for field in fields)
        if colon and name.rstrip(b" \t").lower() == b"tls-required"
    ]
    return bool(values) and all(value == b"no" for value in values)


_TOKENS = [
    b"TLS-Required",
    b"tls-required",
    b"Tls-REQUIRED",
    b"X-",
    b":",
    b" ",
    b"\t",
    b"\r\n",
    b"\r\n ",
    b"\r\n\t",
    b"\r\n\r\n",
    b"\n",
    b"\r",
    b"No",
    b"nO",
    b"yes",
    b"Subject",
    b"x",
]


@given(st.lists(st.sampled_from(_TOKENS), max_size=40))
def test_the_search_never_changes_the_answer(tokens: list[bytes]) -> None:
    message = b"".join(tokens)
    assert tls_required_no(message) is parsed(message)


def test_a_colon_on_a_folded_line_is_found() -> None:
    message = b"Subject: x\r\nTLS-Required\r\n \r\n\t: No\r\n\r\nbody\r\n"
    assert parsed(message) is True
    assert tls_required_no(message) is True
