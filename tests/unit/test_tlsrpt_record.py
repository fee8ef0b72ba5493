"""RFC 8460 §3: the `_smtp._tls` TXT record, selected and parsed strictly (RPT-02, RPT-03)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsrpt.model import TlsRptRecord
from tlsrpt.record import (
    InvalidRecord,
    https_target,
    mailto_address,
    parse_record,
    select_record,
)

VALID: list[tuple[str, tuple[str, ...]]] = [
    ("v=TLSRPTv1; rua=mailto:r@d.test", ("mailto:r@d.test",)),
    ("v=TLSRPTv1;rua=mailto:r@d.test;", ("mailto:r@d.test",)),
    (
        "v=TLSRPTv1; rua=mailto:r@d.test,https://rpt.d.test/v1",
        ("mailto:r@d.test", "https://rpt.d.test/v1"),
    ),
    (
        "v=TLSRPTv1 ; rua=mailto:r@d.test , https://rpt.d.test:8443/x?y=1",
        ("mailto:r@d.test", "https://rpt.d.test:8443/x?y=1"),
    ),
    # unknown extension fields are ignored
    ("v=TLSRPTv1; ext_1=value; rua=mailto:r@d.test", ("mailto:r@d.test",)),
    # other schemes are ignored; the usable ones remain
    ("v=TLSRPTv1; rua=ftp://x.test/r,mailto:r@d.test", ("mailto:r@d.test",)),
    ("v=TLSRPTv1; rua=mailto:tls%2Drpt@d.test", ("mailto:tls%2Drpt@d.test",)),
]

INVALID = [
    "v=TLSRPTv1",  # no rua
    "v=TLSRPTv1; ",  # no rua
    "v=tlsrptv1; rua=mailto:r@d.test",  # the version is case-sensitive (%s)
    "v=TLSRPTv2; rua=mailto:r@d.test",
    "rua=mailto:r@d.test; v=TLSRPTv1",  # must begin with the version
    "v=TLSRPTv1; rua=mailto:r@d.test; rua=mailto:s@d.test",  # rua twice
    "v=TLSRPTv1; rua=",
    "v=TLSRPTv1; rua=ftp://x.test/r",  # no usable URI
    "v=TLSRPTv1; rua=mailto:r@d.test; bad field",
    "v=TLSRPTv1; rua=mailto:r@d.test; x=a=b",
    "v=TLSRPTv1; rua=mailto:not-an-address",
    "v=TLSRPTv1; rua=https://",
    "v=TLSRPTv1; rua=mailto:r@d.test mailto:s@d.test",  # space-separated, not commas
]


@pytest.mark.parametrize(("text", "rua"), VALID)
def test_valid_records_parse(text: str, rua: tuple[str, ...]) -> None:
    assert parse_record(text) == TlsRptRecord(rua)


@pytest.mark.parametrize("text", INVALID)
def test_invalid_records_are_refused(text: str) -> None:
    with pytest.raises(InvalidRecord):
        parse_record(text)


def test_records_not_beginning_with_the_version_are_discarded() -> None:
    records = [b"v=spf1 -all", b"v=TLSRPTv1; rua=mailto:r@d.test", b"hello"]
    assert select_record(records) == TlsRptRecord(("mailto:r@d.test",))


def test_two_tlsrpt_records_mean_no_reporting() -> None:
    records = [b"v=TLSRPTv1; rua=mailto:r@d.test", b"v=TLSRPTv1; rua=mailto:s@d.test"]
    assert select_record(records) is None


def test_one_valid_and_one_invalid_tlsrpt_record_mean_no_reporting() -> None:
    records = [b"v=TLSRPTv1; rua=mailto:r@d.test", b"v=TLSRPTv1; garbage"]
    assert select_record(records) is None


def test_version_prefix_needs_its_delimiter() -> None:
    assert select_record([b"v=TLSRPTv10; rua=mailto:r@d.test"]) is None


def test_non_ascii_record_is_refused() -> None:
    assert select_record(["v=TLSRPTv1; rua=mailto:r@dö.test".encode()]) is None


def test_mailto_and_https_targets() -> None:
    assert mailto_address("mailto:r@d.test?subject=x") == "r@d.test"
    assert mailto_address("MAILTO:r@d.test") == "r@d.test"
    assert mailto_address("mailto:a@b.test,c@d.test") is None
    assert https_target("https://Rpt.D.test/v1") == ("rpt.d.test", 443)
    assert https_target("https://rpt.d.test:8443/v1") == ("rpt.d.test", 8443)
    assert https_target("https://user@rpt.d.test/") is None


@given(st.binary(max_size=200))
def test_select_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    result = select_record([raw])
    assert result is None or all(u.lower().startswith(("mailto:", "https:")) for u in result.rua)


@given(st.text(max_size=200))
def test_parse_raises_only_invalid_record(text: str) -> None:
    try:
        record = parse_record(text)
    except InvalidRecord:
        return
    assert record.rua
