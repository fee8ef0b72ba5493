"""Property-based tests of the parsers of client input: envelope paths, RFC 3461 DSN
parameters and xtext, the users file, and the Received field built from a client's HELO.

Issue 5 item 6 (the TXT record and policy parsers have theirs in test_policy_parse.py).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.inbound.esmtp import ParamError, path_ok, take_mail_dsn, take_rcpt_dsn, xtext_decode
from relay.inbound.headers import received_header
from relay.users import parse_users

T = TypeVar("T")
_any_text = st.text(max_size=120)
_param_text = st.lists(
    st.one_of(
        st.sampled_from(["NOTIFY", "ORCPT", "RET", "ENVID", "SIZE", "BODY", "=", ";", ",", "+"]),
        st.text(max_size=10),
    ),
    max_size=8,
).map(lambda parts: " ".join(parts))


def xtext_encode(text: str) -> str:
    """RFC 3461 §4: "+", "=" and anything outside "!".."~" as +XX."""
    return "".join(ch if "!" <= ch <= "~" and ch not in "+=" else f"+{ord(ch):02X}" for ch in text)


def _outcome(parse: Callable[[str], T], arg: str) -> T | ParamError:
    try:
        return parse(arg)
    except ParamError as exc:
        return exc


@given(_any_text, st.booleans())
def test_path_ok_never_raises(arg: str, null_ok: bool) -> None:
    assert path_ok(arg, null_ok=null_ok) in (True, False)


@given(st.text(alphabet=st.characters(blacklist_characters="\r\n\x00"), max_size=60))
def test_paths_with_control_characters_are_refused(local: str) -> None:
    for bad in ("\r", "\n", "\x00"):
        assert not path_ok(f"<{local}{bad}x@d.test>", null_ok=False)


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=100))
def test_xtext_round_trip(text: str) -> None:
    assert xtext_decode(xtext_encode(text)) == text


@given(_any_text)
def test_xtext_decode_never_raises(text: str) -> None:
    decoded = xtext_decode(text)
    assert decoded is None or isinstance(decoded, str)


@given(st.sampled_from(["<a@d.test>", "<>", "a@d.test", "<@r.test:a@d.test>"]), _param_text)
def test_mail_dsn_parameters_parse_or_refuse_cleanly(path: str, params: str) -> None:
    outcome = _outcome(take_mail_dsn, f"{path} {params}")
    if isinstance(outcome, ParamError):
        assert outcome.reply.startswith("501 5.5.4 ")
        return
    rest, dsn = outcome
    assert dsn.ret in (None, "FULL", "HDRS")
    assert dsn.envid is None or all(" " <= ch <= "~" for ch in dsn.envid)
    words = [w.partition("=")[0].upper() for w in rest.split()[1:]]
    assert "RET" not in words
    assert "ENVID" not in words


@given(st.sampled_from(["<a@d.test>", "a@d.test", '<"a b"@d.test>']), _param_text)
def test_rcpt_dsn_parameters_parse_or_refuse_cleanly(path: str, params: str) -> None:
    outcome = _outcome(take_rcpt_dsn, f"{path} {params}")
    if isinstance(outcome, ParamError):
        assert outcome.reply.startswith("501 5.5.4 ")
        return
    rest, dsn = outcome
    if dsn.notify is not None:
        # RFC 3461 §4.1: NEVER alone, or a set of SUCCESS/FAILURE/DELAY.
        assert dsn.notify == ("NEVER",) or set(dsn.notify) <= {"SUCCESS", "FAILURE", "DELAY"}
        assert len(set(dsn.notify)) == len(dsn.notify)
    if dsn.orcpt is not None:
        assert ";" in dsn.orcpt
        assert all(" " <= ch <= "~" for ch in dsn.orcpt)
    assert rest.startswith(path)


@given(st.lists(st.sampled_from(["SUCCESS", "FAILURE", "DELAY"]), min_size=1, max_size=3))
def test_notify_keyword_sets(words: list[str]) -> None:
    arg = f"<a@d.test> NOTIFY={','.join(words)}"
    if len(set(words)) != len(words):
        with pytest.raises(ParamError):
            take_rcpt_dsn(arg)
    else:
        assert take_rcpt_dsn(arg)[1].notify == tuple(words)
    with pytest.raises(ParamError):
        take_rcpt_dsn(f"<a@d.test> NOTIFY=NEVER,{words[0]}")


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1))
def test_envid_and_orcpt_decode(text: str) -> None:
    encoded = xtext_encode(text)
    if len(encoded) <= 100:
        assert take_mail_dsn(f"<> ENVID={encoded}")[1].envid == text
    if len(encoded) <= 490:
        assert take_rcpt_dsn(f"<a@d.test> ORCPT=rfc822;{encoded}")[1].orcpt == "rfc822;" + text


@given(st.text(max_size=400))
def test_users_file_parser_never_raises(text: str) -> None:
    users = parse_users(text)
    assert all(":" not in name and name for name in users)


@given(st.text(max_size=300), st.one_of(st.none(), st.text(max_size=80)))
def test_received_field_never_carries_client_controls(helo: str, rcpt: str | None) -> None:
    field = received_header(
        client_ip="192.0.2.1",
        helo=helo,
        by_host="relay.test",
        queue_id="Q1",
        tls=None,
        when=datetime(2026, 3, 1, tzinfo=UTC),
        for_rcpt=rcpt,
    )
    assert field.endswith(b"\r\n")
    # Only folding CRLFs (followed by a tab) inside; nothing the client sent breaks a line.
    body = field[:-2]
    assert body.replace(b"\r\n\t", b"").count(b"\r") == 0
    assert body.replace(b"\r\n\t", b"").count(b"\n") == 0
