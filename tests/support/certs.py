"""Test PKI for the lab: a trusted throwaway CA, an untrusted one, and server certificates.

Owns certificate issuance (trustme, plus `cryptography` for a CN-only certificate) and the
SSLContexts lab servers present. Knows nothing about DNS, SMTP or HTTP. The certificate kinds
follow RFC-CHECKLIST.md §0.1 (C-good, C-self, C-expired, C-future, C-cn, ...).
"""

from __future__ import annotations

import datetime
import ssl
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_KINDS: Final = frozenset({"good", "expired", "future", "self", "cn_only", "tls11"})

_DAY = datetime.timedelta(days=1)


class TestPKI:
    """A trusted test CA (written to `ca_file`), an untrusted CA, and server contexts."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, tmp_dir: Path) -> None:
        self.ca: trustme.CA = trustme.CA(organization_name="sts-relay test CA")
        self.untrusted_ca: trustme.CA = trustme.CA(organization_name="sts-relay untrusted CA")
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.ca_file: Path = tmp_dir / "test-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        # Issued leaves by (names, kind) as (cert chain PEM, key PEM); contexts stay per call.
        self._leaves: dict[tuple[tuple[str, ...], str], tuple[bytes, bytes]] = {}
        self._tmp_dir = tmp_dir

    def server_context(self, names: Sequence[str], kind: str = "good") -> ssl.SSLContext:
        """A fresh server-side context presenting a certificate of `kind` for `names`.

        kind: "good" (test CA, SAN = names), "expired" (notAfter in the past), "future"
        (notBefore in the future), "self" (signed by the untrusted CA), "cn_only" (subject
        CN = names[0], no SAN), "tls11" (good certificate, server speaks at most TLS 1.1).
        """
        if kind not in CERT_KINDS:
            raise ValueError(f"unknown certificate kind {kind!r}; one of {sorted(CERT_KINDS)}")
        if not names:
            raise ValueError("server_context needs at least one name")
        chain_pem, key_pem = self._leaf(tuple(names), kind)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _load_chain(ctx, chain_pem, key_pem, self._tmp_dir)
        if kind == "tls11":
            _limit_to_tls11(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A strict client context trusting only the test CA (like the relay's, minus roots)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # RFC 8461 §4.2 / RFC 6125: names come from the SAN only.
        ctx.hostname_checks_common_name = False
        return ctx

    def _leaf(self, names: tuple[str, ...], kind: str) -> tuple[bytes, bytes]:
        key = (names, kind)
        if key not in self._leaves:
            self._leaves[key] = self._issue(names, kind)
        return self._leaves[key]

    def _issue(self, names: tuple[str, ...], kind: str) -> tuple[bytes, bytes]:
        now = datetime.datetime.now(datetime.UTC)
        if kind == "cn_only":
            return _issue_cn_only(self.ca, names[0], now)
        ca = self.untrusted_ca if kind == "self" else self.ca
        not_before, not_after = now - _DAY, now + 30 * _DAY
        if kind == "expired":
            not_before, not_after = now - 30 * _DAY, now - _DAY
        elif kind == "future":
            not_before, not_after = now + _DAY, now + 30 * _DAY
        leaf = ca.issue_cert(*names, not_before=not_before, not_after=not_after)
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        return chain, leaf.private_key_pem.bytes()


def _load_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes, tmp_dir: Path) -> None:
    # load_cert_chain only reads files; one file holding key + chain is enough.
    path = tmp_dir / f"leaf-{id(ctx)}.pem"
    path.write_bytes(key_pem + chain_pem)
    try:
        ctx.load_cert_chain(str(path))
    finally:
        path.unlink()


def _limit_to_tls11(ctx: ssl.SSLContext) -> None:
    # OpenSSL 3 only negotiates TLS 1.0/1.1 at security level 0; Python flags the
    # constants as deprecated, which pytest's filterwarnings=error would turn fatal.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")


def _issue_cn_only(ca: trustme.CA, name: str, now: datetime.datetime) -> tuple[bytes, bytes]:
    """A test-CA certificate naming the host only in the subject CN (no SAN extension)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError("trustme CA key is expected to be ECDSA")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 30 * _DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
