"""The TLS client contexts and the mapping of certificate errors to RFC 8460 result types.

Owns the security parameters of every outgoing TLS connection (policy fetches and MX
connections): trusted roots, minimum version (TLS 1.2 whenever anything is verified, TLS
1.0 for opportunistic encryption), name checks. Knows nothing about HTTP, SMTP or
policies; the relay's delivery code uses these same functions for MX certificates.
"""

from __future__ import annotations

import ssl
import warnings
from typing import Final

from policy.model import TlsRptResult

# OpenSSL X509_V_ERR_* codes (include/openssl/x509_vfy.h).
_NOT_YET_VALID: Final = 9
_EXPIRED: Final = 10
_HOSTNAME_MISMATCH: Final = 62
_IP_ADDRESS_MISMATCH: Final = 64
_NOT_TRUSTED: Final = frozenset(
    {
        2,  # UNABLE_TO_GET_ISSUER_CERT
        4,  # UNABLE_TO_DECRYPT_CERT_SIGNATURE
        6,  # UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY
        7,  # CERT_SIGNATURE_FAILURE
        18,  # DEPTH_ZERO_SELF_SIGNED_CERT
        19,  # SELF_SIGNED_CERT_IN_CHAIN
        20,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        21,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
        23,  # CERT_REVOKED
        24,  # INVALID_CA
        27,  # CERT_UNTRUSTED
        28,  # CERT_REJECTED
        _NOT_YET_VALID,  # STS-93 allows not-trusted or validation-failure; not trusted *now*
    }
)


def client_context(ca_file: str | None) -> ssl.SSLContext:
    """System roots plus `ca_file`, TLS 1.2 or newer, DNS-ID name checks (RFC 8461 §3.3, §4.2).

    Raises OSError / ssl.SSLError if `ca_file` cannot be read (a configuration error the
    caller reports at start-up).
    """
    # create_default_context(cafile=...) would load ONLY that file and skip the system
    # roots, so load the extra CA separately.
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    _harden(context)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    # RFC 8461 §4.2 / RFC 6125: the name must be a SAN DNS-ID; a CN-only certificate
    # passes on Python 3.11 unless this is off (STS-95).
    context.hostname_checks_common_name = False
    return context


def unverified_context() -> ssl.SSLContext:
    """Encryption without authentication, for opportunistic STARTTLS (no policy, testing).

    Any encryption beats none: this context also speaks TLS 1.0 and 1.1 (which OpenSSL 3
    offers only at security level 0), so an old MX gets TLS rather than plaintext. It
    never authenticates anything; verified delivery uses `client_context` (TLS 1.2 or
    newer, RFC 8461 §7.2, RFC 8996).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.options |= ssl.OP_NO_COMPRESSION
    with warnings.catch_warnings():
        # Python flags the constant as deprecated; here it is the point (RFC 7435 §1).
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def _harden(context: ssl.SSLContext) -> None:
    # RFC 8461 §7.2 and RFC 8996: never TLS 1.0 or 1.1.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION


def classify_certificate_error(exc: ssl.SSLCertVerificationError) -> TlsRptResult:
    """The RFC 8460 §4.3 result type for a failed certificate verification."""
    code = getattr(exc, "verify_code", None)
    if code == _EXPIRED:
        return TlsRptResult.CERTIFICATE_EXPIRED
    if code in (_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH):
        return TlsRptResult.CERTIFICATE_HOST_MISMATCH
    if code in _NOT_TRUSTED:
        return TlsRptResult.CERTIFICATE_NOT_TRUSTED
    if isinstance(code, int):
        return TlsRptResult.VALIDATION_FAILURE
    return _classify_message(str(getattr(exc, "verify_message", None) or exc).lower())


def _classify_message(message: str) -> TlsRptResult:
    # Only when OpenSSL gave no code (should not happen on CPython, but be total).
    if "expired" in message:
        return TlsRptResult.CERTIFICATE_EXPIRED
    if "mismatch" in message:
        return TlsRptResult.CERTIFICATE_HOST_MISMATCH
    if "self-signed" in message or "self signed" in message or "issuer" in message:
        return TlsRptResult.CERTIFICATE_NOT_TRUSTED
    return TlsRptResult.VALIDATION_FAILURE
