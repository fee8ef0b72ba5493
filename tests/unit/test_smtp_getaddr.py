"""The listener's fast envelope-path parser gives exactly what aiosmtpd's parser gives.

RelaySMTP._getaddr answers the common `<local@domain>` shape itself (aiosmtpd's parser
was ~15% of ingest CPU) and hands everything else to aiosmtpd: for every argument the
two must agree, address and remaining parameters alike.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given
from hypothesis import strategies as st

from relay.inbound.session import RelaySMTP


def _server(local_part_limit: int = 0) -> RelaySMTP:
    # _getaddr reads only `local_part_limit`: no session, loop or handler is needed.
    server = object.__new__(RelaySMTP)
    server.local_part_limit = local_part_limit
    return server


_pieces = st.sampled_from(
    ["<", ">", "@", ".", " ", "\t", "(", ")", '"', "\\", "a", "b.c", "x-y", "+", "=", "é", ":"]
)
_args = st.lists(st.one_of(_pieces, st.text(max_size=4)), max_size=12).map("".join)
_simple = st.builds(
    lambda local, domain, rest: f"<{local}@{domain}>{rest}",
    st.sampled_from(["a", "a.b", "o'brien", "x+tag", "a..b", ".a", "é"]),
    st.sampled_from(["b.test", "x-y.test", "a", "-a.test", "a.", "[127.0.0.1]"]),
    st.one_of(st.just(""), _args, _args.map(lambda s: " " + s)),
)


def _outcome(parse: Callable[[str], object], arg: str) -> object:
    try:
        return parse(arg)
    except Exception as exc:  # noqa: BLE001 (email's parser raises IndexError on "<")
        return type(exc)


@given(st.one_of(_args.map(lambda s: "<" + s), _simple))
def test_same_as_aiosmtpd(arg: str) -> None:
    server = _server()
    fast = _outcome(server._getaddr, arg)
    assert fast == _outcome(lambda a: SMTP._getaddr(server, a), arg)


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("<app@src.test>", ("app@src.test", "")),
        ("<app@src.test> SIZE=100 BODY=8BITMIME", ("app@src.test", "SIZE=100 BODY=8BITMIME")),
        ("<a@b.test> (comment) SIZE=1", ("a@b.test", "SIZE=1")),
        ("<a b@c.test>", ('"a b"@c.test', "")),
    ],
)
def test_examples(arg: str, expected: tuple[str, str]) -> None:
    assert _server()._getaddr(arg) == expected


def test_local_part_limit_still_applies() -> None:
    assert _server(local_part_limit=3)._getaddr("<abcd@b.test>") == (None, None)
    assert _server(local_part_limit=4)._getaddr("<abcd@b.test>") == ("abcd@b.test", "")
