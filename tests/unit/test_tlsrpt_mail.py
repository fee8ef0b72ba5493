"""The report mail (RFC 8460 §5.3, RPT-09) and its DKIM signature (RFC 8460 §3, RPT-10)."""

from __future__ import annotations

import base64
import email
import email.policy
import gzip
import json
from datetime import UTC, datetime
from email.message import EmailMessage

import dkim  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tlsrpt.mail import DkimError, DkimKey, ReportMail, build_mail, check_key
from tlsrpt.report import compress, report_json

NOW = datetime(2026, 3, 5, 1, 2, 3, tzinfo=UTC)
REPORT = {"organization-name": "Relay Org", "report-id": "r1", "policies": []}
MAIL = ReportMail(
    sender="tlsrpt@relay.test",
    recipient="reports@d.test",
    domain="d.test",
    submitter="relay.test",
    report_id="20260304.abc.d.test@relay.test",
    filename="relay.test!d.test!1772582400!1772668800!abc.json.gz",
    payload=compress(report_json(REPORT)),
)


def _key_pair() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, base64.b64encode(public)


def _parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_report_mail_is_multipart_report_tlsrpt_with_the_required_headers() -> None:
    data = build_mail(MAIL, now=NOW, dkim_key=None)
    assert b"\r\n" in data
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    msg = _parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == "d.test"
    assert msg["TLS-Report-Submitter"] == "relay.test"
    assert msg["TLS-Required"] == "No"
    assert msg["Subject"] == (
        "Report Domain: d.test Submitter: relay.test Report-ID: <20260304.abc.d.test@relay.test>"
    )
    assert msg["Message-ID"]
    assert msg["Date"]
    text, attachment = list(msg.iter_parts())
    assert text.get_content_type() == "text/plain"
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment.get_filename() == MAIL.filename
    assert attachment["Content-Transfer-Encoding"] == "base64"
    payload = attachment.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert json.loads(gzip.decompress(payload)) == REPORT


def test_signed_report_verifies_and_signs_the_report_headers() -> None:
    private, public = _key_pair()
    key = DkimKey("sel", "relay.test", private)
    data = build_mail(MAIL, now=NOW, dkim_key=key)
    assert data.startswith(b"DKIM-Signature:")
    signature = _parse(data)["DKIM-Signature"]
    tags = {
        t.split("=", 1)[0].strip(): t.split("=", 1)[1].strip()
        for t in "".join(str(signature).split()).split(";")
        if "=" in t
    }
    assert "l" not in tags  # RFC 8460 §3: no body length tag
    assert tags["a"] == "rsa-sha256"
    assert tags["d"] == "relay.test"
    assert tags["s"] == "sel"
    signed = tags["h"].lower().split(":")
    assert {"tls-report-domain", "tls-report-submitter", "from", "subject"} <= set(signed)

    def dns_txt(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"sel._domainkey.relay.test."
        return b"v=DKIM1; k=rsa; s=tlsrpt; p=" + public

    assert dkim.verify(data, dnsfunc=dns_txt, tlsrpt="strict")
    tampered = data.replace(b"TLS-Report-Domain: d.test", b"TLS-Report-Domain: e.test")
    assert not dkim.verify(tampered, dnsfunc=dns_txt, tlsrpt="strict")


def test_a_key_that_cannot_sign_is_refused() -> None:
    with pytest.raises(DkimError):
        check_key(DkimKey("sel", "relay.test", b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END"))
