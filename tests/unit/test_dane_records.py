"""DANE's pure parts (relay/delivery/dane.py): which TLSA records are usable for SMTP, and
whether a certificate chain matches one (RFC 7672 §3, RFC 7671 §5, §9). IDs refer to
/work/shared/RFC-CHECKLIST.md (DANE-*)."""

from __future__ import annotations

import datetime
import hashlib

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from policy.model import TlsRptResult
from relay.delivery.dane import DaneMatch, DaneMismatch, Tlsa, usable_records, verify_chain

NOW = datetime.datetime.now(datetime.UTC)
SHA256 = b"\x01" * 32
SHA512 = b"\x02" * 64


@pytest.mark.parametrize(
    ("record", "usable"),
    [
        (Tlsa(3, 1, 1, SHA256), True),
        (Tlsa(3, 0, 2, SHA512), True),
        (Tlsa(2, 0, 1, SHA256), True),
        (Tlsa(2, 1, 0, b"spki"), True),
        (Tlsa(0, 0, 1, SHA256), False),  # PKIX-TA: unusable for SMTP (DANE-08)
        (Tlsa(1, 1, 1, SHA256), False),  # PKIX-EE
        (Tlsa(4, 1, 1, SHA256), False),  # unknown usage
        (Tlsa(3, 2, 1, SHA256), False),  # unknown selector
        (Tlsa(3, 1, 3, SHA256), False),  # unknown matching type
        (Tlsa(3, 1, 1, SHA256[:31]), False),  # wrong digest length (DANE-09)
        (Tlsa(3, 1, 2, SHA256), False),
        (Tlsa(3, 1, 0, b""), False),
    ],
)
def test_usable_records_for_smtp(record: Tlsa, usable: bool) -> None:
    assert record.usable is usable


def test_sha2_512_shadows_sha2_256_of_the_same_usage_and_selector() -> None:
    weak, strong = Tlsa(3, 1, 1, SHA256), Tlsa(3, 1, 2, SHA512)
    other_selector, other_usage = Tlsa(3, 0, 1, SHA256), Tlsa(2, 1, 1, SHA256)
    records = [weak, strong, other_selector, other_usage]
    assert usable_records(records) == (strong, other_selector, other_usage)


def test_record_text_is_the_presentation_form() -> None:
    assert Tlsa(3, 1, 1, b"\xab\xcd").text == "3 1 1 abcd"


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def _spki(der: bytes) -> bytes:
    cert = x509.load_der_x509_certificate(der)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _chain(
    ca: trustme.CA,
    name: str,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    leaf = ca.issue_cert(name, not_before=not_before, not_after=not_after)
    return _der(leaf.cert_chain_pems[0].bytes()), _der(ca.cert_pem.bytes())


@pytest.mark.parametrize(("selector", "mtype"), [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)])
def test_dane_ee_matches_the_leaf_by_each_selector_and_matching_type(
    ca: trustme.CA, selector: int, mtype: int
) -> None:
    leaf, _ = _chain(ca, "other.test")  # DANE-EE ignores the name (DANE-06)
    data = leaf if selector == 0 else _spki(leaf)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    record = Tlsa(3, selector, mtype, data)
    assert verify_chain([leaf], [record], "mx1.d.test", NOW) == DaneMatch(record)


def test_dane_ee_ignores_dates(ca: trustme.CA) -> None:
    past = NOW - datetime.timedelta(days=30)
    leaf, _ = _chain(ca, "mx1.d.test", not_before=past, not_after=past)
    record = Tlsa(3, 1, 1, hashlib.sha256(_spki(leaf)).digest())
    assert isinstance(verify_chain([leaf], [record], "mx1.d.test", NOW), DaneMatch)


def test_no_matching_record_is_tlsa_invalid(ca: trustme.CA) -> None:
    leaf, anchor = _chain(ca, "mx1.d.test")
    verdict = verify_chain([leaf, anchor], [Tlsa(3, 1, 1, SHA256)], "mx1.d.test", NOW)
    assert isinstance(verdict, DaneMismatch)
    assert verdict.result is TlsRptResult.TLSA_INVALID


def test_one_match_among_several_suffices(ca: trustme.CA) -> None:
    leaf, _ = _chain(ca, "mx1.d.test")
    right = Tlsa(3, 0, 1, hashlib.sha256(leaf).digest())
    assert verify_chain([leaf], [Tlsa(3, 0, 1, SHA256), right], "x", NOW) == DaneMatch(right)


def test_dane_ta_checks_the_chain_to_the_anchor_and_the_name(ca: trustme.CA) -> None:
    leaf, anchor = _chain(ca, "mx1.d.test")
    record = Tlsa(2, 0, 1, hashlib.sha256(anchor).digest())
    assert verify_chain([leaf, anchor], [record], "mx1.d.test.", NOW) == DaneMatch(record)
    wrong = verify_chain([leaf, anchor], [record], "mx2.d.test", NOW)
    assert isinstance(wrong, DaneMismatch)
    assert wrong.result is TlsRptResult.CERTIFICATE_HOST_MISMATCH  # DANE-07


def test_dane_ta_needs_the_anchor_in_the_chain(ca: trustme.CA) -> None:
    leaf, anchor = _chain(ca, "mx1.d.test")
    record = Tlsa(2, 1, 1, hashlib.sha256(_spki(anchor)).digest())
    verdict = verify_chain([leaf], [record], "mx1.d.test", NOW)
    assert isinstance(verdict, DaneMismatch)
    assert verdict.result is TlsRptResult.TLSA_INVALID


def test_dane_ta_checks_dates(ca: trustme.CA) -> None:
    past = NOW - datetime.timedelta(days=30)
    leaf, anchor = _chain(ca, "mx1.d.test", not_before=past, not_after=past)
    record = Tlsa(2, 0, 2, hashlib.sha512(anchor).digest())
    verdict = verify_chain([leaf, anchor], [record], "mx1.d.test", NOW)
    assert isinstance(verdict, DaneMismatch)
    assert verdict.result is TlsRptResult.CERTIFICATE_EXPIRED


def test_dane_ta_anchor_is_never_the_leaf_itself(ca: trustme.CA) -> None:
    leaf, _ = _chain(ca, "mx1.d.test")
    record = Tlsa(2, 0, 1, hashlib.sha256(leaf).digest())
    assert isinstance(verify_chain([leaf], [record], "mx1.d.test", NOW), DaneMismatch)


def test_empty_or_garbled_chains_never_match() -> None:
    record = Tlsa(3, 0, 0, b"x")
    assert isinstance(verify_chain([], [record], "mx1.d.test", NOW), DaneMismatch)
    assert isinstance(verify_chain([b"x"], [record], "mx1.d.test", NOW), DaneMismatch)


def test_unusable_records_are_never_matched(ca: trustme.CA) -> None:
    leaf, _ = _chain(ca, "mx1.d.test")
    pkix = Tlsa(1, 0, 1, hashlib.sha256(leaf).digest())
    assert isinstance(verify_chain([leaf], [pkix], "mx1.d.test", NOW), DaneMismatch)
