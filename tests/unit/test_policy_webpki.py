"""policy.webpki: the TLS client contexts and RFC 8460 result types (STS-92 to STS-98).

Real handshakes against bad certificates are in tests/integration/test_policy_fetch.py.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from policy.model import TlsRptResult
from policy.webpki import classify_certificate_error, client_context, unverified_context


def test_client_context_is_strict() -> None:
    context = client_context(None)
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.hostname_checks_common_name is False  # STS-95
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2  # STS-33, STS-98
    assert (
        context.cert_store_stats()["x509_ca"] == client_context(None).cert_store_stats()["x509_ca"]
    )


def test_client_context_adds_ca_file_to_system_roots(tmp_path: Path) -> None:
    ca = trustme.CA()
    path = str(tmp_path / "ca.pem")
    ca.cert_pem.write_to_path(path)
    base = client_context(None).cert_store_stats()["x509_ca"]
    assert client_context(path).cert_store_stats()["x509_ca"] == base + 1


def test_client_context_missing_ca_file_raises() -> None:
    with pytest.raises(OSError, match="No such file"):
        client_context("/nonexistent/ca.pem")


def test_unverified_context() -> None:
    context = unverified_context()
    assert context.verify_mode is ssl.CERT_NONE
    assert context.check_hostname is False
    # Opportunistic: any encryption beats none (issue 11); verified stays TLS 1.2 (above).
    assert context.minimum_version is ssl.TLSVersion.TLSv1
    assert context.security_level == 0  # OpenSSL 3 negotiates TLS 1.0/1.1 only at level 0


def _error(code: int | None, message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    exc.verify_code = code  # type: ignore[assignment]
    exc.verify_message = message
    return exc


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (10, "certificate has expired", TlsRptResult.CERTIFICATE_EXPIRED),
        (
            62,
            "Hostname mismatch, certificate is not valid for 'x.test'.",
            TlsRptResult.CERTIFICATE_HOST_MISMATCH,
        ),
        (9, "certificate is not yet valid", TlsRptResult.CERTIFICATE_NOT_TRUSTED),
        (18, "self-signed certificate", TlsRptResult.CERTIFICATE_NOT_TRUSTED),
        (19, "self-signed certificate in certificate chain", TlsRptResult.CERTIFICATE_NOT_TRUSTED),
        (20, "unable to get local issuer certificate", TlsRptResult.CERTIFICATE_NOT_TRUSTED),
        (21, "unable to verify the first certificate", TlsRptResult.CERTIFICATE_NOT_TRUSTED),
        (26, "unsupported certificate purpose", TlsRptResult.VALIDATION_FAILURE),
        (None, "certificate has expired", TlsRptResult.CERTIFICATE_EXPIRED),
        (None, "something else", TlsRptResult.VALIDATION_FAILURE),
    ],
)
def test_classify(code: int | None, message: str, expected: TlsRptResult) -> None:
    assert classify_certificate_error(_error(code, message)) is expected
