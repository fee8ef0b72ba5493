"""RFC 8461 §3.1 TXT records and §3.2 policy files: strict ABNF (RFC-CHECKLIST 1.1, 1.3)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.model import Mode, StsRecord
from policy.parse import (
    InvalidPolicy,
    InvalidRecord,
    parse_policy,
    parse_sts_record,
    select_sts_record,
)

# --- TXT record (§3.1) ---------------------------------------------------------------

VALID_RECORDS = [
    ("v=STSv1; id=1", "1"),
    ("v=STSv1;id=20160831085700Z", "20160831085700Z"),
    ("v=STSv1; id=20160831085700Z;", "20160831085700Z"),
    ("v=STSv1; id=abc; ", "abc"),  # trailing sts-field-delim may carry WSP
    ("v=STSv1 ; id=abc", "abc"),  # sts-field-delim = *WSP ";" *WSP
    ("v=STSv1;\tid=abc\t;", "abc"),
    ("v=STSv1; id=abc ;", "abc"),
    ("v=STSv1; id=1; foo=bar; x.y-z=9", "1"),  # STS-10: extensions ignored
    ("v=STSv1; foo=bar; id=xyz", "xyz"),
    ("v=STSv1; id=" + "a" * 32, "a" * 32),
    ("v=STSv1; id=1; id=2", "1"),  # first wins
]

INVALID_RECORDS = [
    "",
    "v=STSv1",  # no field at all
    "v=STSv1;",
    "v=STSv1; ",
    "V=STSv1; id=1",  # STS-08: %s, case-sensitive
    "v=stsv1; id=1",
    "v=STSv10; id=1",
    "v=STSv2; id=1",
    " v=STSv1; id=1",  # leading space
    "id=1; v=STSv1",  # v not first
    "v=STSv1; id=1 ",  # trailing space without delimiter
    "v=STSv1;; id=1",  # empty field
    "v=STSv1; id=1;;",
    "v=STSv1; id=",
    "v=STSv1; id=a_b",  # STS-05: id is ALPHA / DIGIT only
    "v=STSv1; id=a-b",
    "v=STSv1; id=a.b",
    "v=STSv1; id=" + "a" * 33,
    "v=STSv1; id=1; note=café",  # STS-11: US-ASCII only
    "v=STSv1; foo=bar",  # id required
    "v=STSv1; ID=1",
    "v=STSv1; id=1; foo",  # extension without "="
    "v=STSv1; id=1; foo=",  # empty extension value
    "v=STSv1; id=1; foo=a=b",  # "=" not allowed in ext value
    "v=STSv1; id=1; _x=1",  # ext name starts with ALPHA / DIGIT
    "v=STSv1; id=1; " + "x" * 33 + "=1",  # ext name at most 32
    "v=STSv1 id=1",
    "v=STSv1; id=1\n",
    "v=STSv1;\rid=1",
    "v=STSv1; id=1 2",
]


@pytest.mark.parametrize(("text", "record_id"), VALID_RECORDS)
def test_valid_record(text: str, record_id: str) -> None:
    assert parse_sts_record(text) == StsRecord(id=record_id)


@pytest.mark.parametrize("text", INVALID_RECORDS)
def test_invalid_record(text: str) -> None:
    with pytest.raises(InvalidRecord):
        parse_sts_record(text)


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([b"v=STSv1; id=1"], "1"),
        ([b"v=spf1 -all", b"verification=abc", b"v=STSv1; id=1"], "1"),  # STS-04
        ([b"v=STSv10; id=x1", b"v=STSv1; id=x2"], "x2"),  # STS-09
        ([b"V=STSv1; id=x1", b"v=STSv1; id=x2"], "x2"),
        ([b"verification=caf\xc3\xa9", b"v=STSv1; id=x2"], "x2"),  # unrelated non-ASCII
        ([b"v=STSv1", b"v=STSv1; id=x3"], "x3"),  # does not begin with "v=STSv1;"
        ([], None),
        ([b"v=spf1 -all"], None),
        ([b"v=STSv1; id=1", b"v=STSv1; id=2"], None),  # STS-03
        ([b"v=STSv1; id=1", b"v=STSv1; id=1"], None),
        ([b"v=STSv1; id=1", b"v=STSv1; id=a_b"], None),  # the invalid one still counts
        ([b"v=STSv1; id=a_b"], None),  # STS-05
        ([b"v=STSv1; id=1; note=caf\xc3\xa9"], None),  # STS-11
        ([b"v=STSv1; id=1\xff"], None),
        ([b"v=STSv1; id=1 "], None),
    ],
)
def test_select_sts_record(records: list[bytes], expected: str | None) -> None:
    result = select_sts_record(records)
    assert result == (None if expected is None else StsRecord(expected))


@given(st.lists(st.binary(max_size=80), max_size=4))
def test_select_never_raises(records: list[bytes]) -> None:
    result = select_sts_record(records)
    assert result is None or isinstance(result, StsRecord)


@given(st.text(max_size=80))
def test_parse_record_raises_only_invalid_record(text: str) -> None:
    try:
        record = parse_sts_record(text)
    except InvalidRecord:
        return
    assert text.startswith("v=STSv1")
    assert record.id.isascii()
    assert record.id.isalnum()
    assert 1 <= len(record.id) <= 32


@given(
    st.text(alphabet="abcXYZ019", min_size=1, max_size=32),
    st.sampled_from(["", ";", "; ", " ;", ";\t"]),
)
def test_generated_valid_records(record_id: str, tail: str) -> None:
    assert parse_sts_record(f"v=STSv1; id={record_id}{tail}").id == record_id


# --- Policy file (§3.2) --------------------------------------------------------------

P1 = b"version: STSv1\r\nmode: enforce\r\nmx: mx1.d.test\r\nmax_age: 86400\r\n"


def policy(*lines: str, end: str = "\n") -> bytes:
    return (end.join(lines) + end).encode("utf-8")


BASE = ("version: STSv1", "mode: enforce", "mx: mx1.d.test", "max_age: 86400")


def test_p1() -> None:
    parsed = parse_policy(P1)
    assert parsed.mode is Mode.ENFORCE
    assert parsed.mx == ("mx1.d.test",)
    assert parsed.max_age == 86400
    assert parsed.text == P1.decode()


def test_rfc_example_lf_without_final_terminator() -> None:
    body = b"version: STSv1\nmode: testing\nmx: mx1.example.com\nmx: mx2.example.com\n"
    body += b"mx: mx.backup-example.com\nmax_age: 1296000"
    parsed = parse_policy(body)
    assert parsed.mode is Mode.TESTING
    assert parsed.mx == ("mx1.example.com", "mx2.example.com", "mx.backup-example.com")
    assert parsed.max_age == 1296000


VALID_POLICIES: list[tuple[str, bytes]] = [
    ("crlf", policy(*BASE, end="\r\n")),
    ("lf", policy(*BASE)),
    ("mixed", b"version: STSv1\r\nmode: enforce\nmx: mx1.d.test\r\nmax_age: 86400\n"),
    ("no final terminator", policy(*BASE)[:-1]),
    ("no space after colon", b"version:STSv1\nmode:enforce\nmx:mx1.d.test\nmax_age:86400\n"),
    ("tab after colon", b"version:\tSTSv1\nmode: enforce\nmx: mx1.d.test\nmax_age: 86400\n"),
    ("trailing wsp", b"version: STSv1 \nmode: enforce\t\nmx: mx1.d.test  \nmax_age: 86400 \n"),
    ("max 31557600", policy("version: STSv1", "mode: enforce", "mx: a.test", "max_age: 31557600")),
    ("max_age 0", policy("version: STSv1", "mode: enforce", "mx: a.test", "max_age: 0")),
    ("leading zeros", policy("version: STSv1", "mode: enforce", "mx: a.test", "max_age: 0086400")),
    ("none without mx", policy("version: STSv1", "mode: none", "max_age: 86400")),
    ("unknown field", policy(*BASE, "foo: bar")),
    ("utf-8 extension", policy(*BASE, "comment: café au lait")),
    ("inner spaces in ext", policy(*BASE, "comment: a  b c")),
    ("ext name chars", policy(*BASE, "x_1.y-z: 1")),
    ("wildcard mx", policy("version: STSv1", "mode: enforce", "mx: *.d.test", "max_age: 1")),
    (
        "a-label mx",
        policy("version: STSv1", "mode: enforce", "mx: xn--mx-lka.example", "max_age: 1"),
    ),
    ("mx order any", policy("mx: mx1.d.test", "max_age: 86400", "mode: enforce", "version: STSv1")),
    ("dup version", policy("version: STSv1", "version: STSv2", *BASE[1:])),
    ("dup max_age", policy(*BASE, "max_age: 5")),
    ("u+2028 in ext", policy(*BASE, "comment: a\u2028b")),
    ("single-label mx", policy("version: STSv1", "mode: enforce", "mx: localhost", "max_age: 1")),
]


@pytest.mark.parametrize(
    "body", [body for _, body in VALID_POLICIES], ids=[n for n, _ in VALID_POLICIES]
)
def test_valid_policy(body: bytes) -> None:
    parsed = parse_policy(body)
    assert parsed.text == body.decode("utf-8")


def test_duplicate_mode_first_wins() -> None:
    # STS-47: testing then enforce gives testing.
    body = b"version: STSv1\nmode: testing\nmode: enforce\nmx: mx1.d.test\nmax_age: 86400\n"
    assert parse_policy(body).mode is Mode.TESTING


def test_duplicate_max_age_first_wins() -> None:
    assert parse_policy(policy(*BASE, "max_age: 5")).max_age == 86400


def test_every_mx_line_is_used_lowercased() -> None:
    body = policy("version: STSv1", "mode: enforce", "mx: MXA.d.test", "mx: mxb.d.test")
    body += b"mx: *.c.d.test\nmax_age: 60\n"
    assert parse_policy(body).mx == ("mxa.d.test", "mxb.d.test", "*.c.d.test")


def test_none_policy_mx_optional() -> None:
    parsed = parse_policy(policy("version: STSv1", "mode: none", "max_age: 86400"))
    assert parsed.mode is Mode.NONE
    assert parsed.mx == ()


def _swap(index: int, line: str) -> bytes:
    lines = list(BASE)
    lines[index] = line
    return policy(*lines)


def _drop(index: int) -> bytes:
    return policy(*(line for i, line in enumerate(BASE) if i != index))


INVALID_POLICIES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("only newline", b"\n"),
    ("bare CR", b"version: STSv1\rmode: enforce\rmx: mx1.d.test\rmax_age: 86400\r"),
    ("CR CR LF", policy(*BASE, end="\r\r\n")),
    ("U+2028 as terminator", "\u2028".join(BASE).encode()),
    ("NEL as terminator", "\u0085".join(BASE).encode()),
    ("double terminator", policy(*BASE) + b"\n"),
    ("blank line", policy(*BASE[:2], "", *BASE[2:])),
    ("leading space", policy(" version: STSv1", *BASE[1:])),
    ("space before colon", _swap(0, "version : STSv1")),
    ("BOM", b"\xef\xbb\xbf" + policy(*BASE)),
    ("latin-1", policy(*BASE) + b"comment: caf\xe9\n"),
    ("Version key", _swap(0, "Version: STSv1")),
    ("MX key", _swap(2, "MX: mx1.d.test")),
    ("mode Enforce", _swap(1, "mode: Enforce")),
    ("version stsv1", _swap(0, "version: stsv1")),
    ("version missing", _drop(0)),
    ("version STSv2", _swap(0, "version: STSv2")),
    ("version STSv10", _swap(0, "version: STSv10")),
    ("version extra", _swap(0, "version: STSv1 extra")),
    ("mode missing", _drop(1)),
    ("mode doubt", _swap(1, "mode: doubt")),
    ("mode report", _swap(1, "mode: report")),
    (
        "dup mode invalid first",
        policy(*BASE, "mode: enforce").replace(b"mode: enforce", b"mode: x", 1),
    ),
    ("max_age missing", _drop(3)),
    ("max_age empty", _swap(3, "max_age:")),
    ("max_age over", _swap(3, "max_age: 31557601")),
    ("max_age xxx", _swap(3, "max_age: xxx")),
    ("max_age -1", _swap(3, "max_age: -1")),
    ("max_age +", _swap(3, "max_age: +86400")),
    ("max_age underscore", _swap(3, "max_age: 86_400")),
    ("max_age fullwidth", _swap(3, "max_age: \uff18\uff16\uff14\uff10\uff10")),
    ("max_age float", _swap(3, "max_age: 86400.0")),
    ("max_age 11 digits", _swap(3, "max_age: 00000086400")),
    ("max_age inner space", _swap(3, "max_age: 86 400")),
    ("enforce without mx", _drop(2)),
    ("testing without mx", policy("version: STSv1", "mode: testing", "max_age: 86400")),
    ("u-label mx", _swap(2, "mx: møx.example")),
    ("double wildcard", _swap(2, "mx: *.*.example")),
    ("star star", _swap(2, "mx: **.example")),
    ("partial wildcard", _swap(2, "mx: service-alpha-inbound-*.mimecast.com")),
    ("leading dot", _swap(2, "mx: .example.net")),
    ("trailing hyphen", _swap(2, "mx: test.example-")),
    ("trailing dot", _swap(2, "mx: mx1.d.test.")),
    ("empty mx", _swap(2, "mx:")),
    ("mx with space", _swap(2, "mx: mx1.d.test mx2.d.test")),
    ("bare star", _swap(2, "mx: *")),
    ("mx underscore", _swap(2, "mx: mx_1.d.test")),
    ("second mx invalid", policy(*BASE, "mx: *.*.d.test")),
    ("ext leading underscore", policy(*BASE, "_comment: x")),
    ("ext empty value", policy(*BASE, "ext:")),
    ("ext NUL", policy(*BASE, "ext: a\x00b")),
    ("ext inner tab", policy(*BASE, "ext: a\tb")),
    ("ext name too long", policy(*BASE, "a" * 33 + ": x")),
    ("no colon", policy(*BASE, "garbage")),
    ("html", b"<html><body>version: STSv1</body></html>"),
]


@pytest.mark.parametrize(
    "body", [body for _, body in INVALID_POLICIES], ids=[n for n, _ in INVALID_POLICIES]
)
def test_invalid_policy(body: bytes) -> None:
    with pytest.raises(InvalidPolicy) as info:
        parse_policy(body)
    message = str(info.value)
    assert message
    assert "\n" not in message


@given(st.binary(max_size=300))
def test_parse_policy_raises_only_invalid_policy(body: bytes) -> None:
    message = ""
    try:
        parse_policy(body)
    except InvalidPolicy as exc:
        message = str(exc)
    assert "\n" not in message


_lines = st.lists(
    st.one_of(
        st.sampled_from(
            [*BASE, "mode: none", "mode: testing", "mx: *.d.test", "max_age: 0", "foo: bar"]
        ),
        st.text(max_size=30),
    ),
    max_size=8,
)


@given(_lines, st.sampled_from(["\n", "\r\n"]))
def test_parse_policy_on_near_valid_input(lines: list[str], end: str) -> None:
    body = end.join(lines).encode("utf-8", "surrogatepass")
    try:
        parsed = parse_policy(body)
    except InvalidPolicy:
        return
    assert 0 <= parsed.max_age <= 31557600
    assert parsed.mode is Mode.NONE or parsed.mx
    assert all(pattern == pattern.lower() for pattern in parsed.mx)
