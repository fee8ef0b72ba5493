"""The DANE lab: the lab world with a signed zone, a validating resolver, and DANE certificates.

Owns `DaneWorld` (World + `dane.test` signed on the fly by the lab DNS server + unbound in
front of it, which the relay is pointed at) and the certificates and TLSA records DANE tests
need: a self-signed leaf (DANE-EE), a private CA whose certificate the MX sends in its chain
(DANE-TA), TLSA presentation strings for either. Knows the relay only through its config.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.signed_dns import SignedDnsServer
from tests.support.smtp import MxSink
from tests.support.unbound import Unbound, unbound_binary
from tests.support.world import World

DANE_APEX = "dane.test"  # signed; every name below it is DNSSEC-secure
_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class ServerCert:
    """What an MX presents: its server context, and the DER of its leaf and issuer (if any)."""

    context: ssl.SSLContext
    leaf: bytes
    issuer: bytes | None = None


def tlsa(der: bytes, usage: int = 3, selector: int = 1, mtype: int = 1) -> str:
    """The TLSA record data ("3 1 1 <hex>") for a certificate (DER)."""
    data = der
    if selector == 1:
        cert = x509.load_der_x509_certificate(der)
        data = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return f"{usage} {selector} {mtype} {data.hex()}"


def _context(key_pem: bytes, chain_pem: bytes, tmp: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"dane-{id(ctx)}.pem"
    path.write_bytes(key_pem + chain_pem)
    try:
        ctx.load_cert_chain(str(path))
    finally:
        path.unlink()
    return ctx


def self_signed(names: Sequence[str], tmp: Path, *, expired: bool = False) -> ServerCert:
    """A self-signed certificate for `names` (DANE-EE ignores names and dates)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = (
        (now - 30 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
    )
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    der = cert.public_bytes(serialization.Encoding.DER)
    return ServerCert(_context(key_pem, pem, tmp), der)


def ca_issued(ca: trustme.CA, names: Sequence[str], tmp: Path) -> ServerCert:
    """A leaf for `names` issued by `ca`, served with the CA certificate in its chain
    (RFC 7672 §3.1.2: a DANE-TA server sends its trust anchor)."""
    leaf = ca.issue_cert(*names)
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems) + ca.cert_pem.bytes()
    ctx = _context(leaf.private_key_pem.bytes(), chain, tmp)
    leaf_der = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(
        serialization.Encoding.DER
    )
    ca_der = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).public_bytes(
        serialization.Encoding.DER
    )
    return ServerCert(ctx, leaf_der, ca_der)


class DaneWorld(World):
    """The lab world with `dane.test` signed and unbound validating in front of it."""

    def __init__(self, tmp_dir: Path) -> None:
        super().__init__(tmp_dir)
        self.signed = SignedDnsServer()
        self.dns = self.signed
        self.signed.sign(DANE_APEX)
        self.validator = Unbound(tmp_dir / "unbound", ("127.0.0.1", 0), [])
        self.dane_ca = trustme.CA(organization_name="sts-relay DANE-TA test CA")

    async def start(self) -> None:
        unbound_binary()  # skip (or fail under CI) before any server is started
        await super().start()
        self.validator.forward = self.signed.address
        self.validator.trust_anchors = self.signed.trust_anchors
        await self.validator.start()

    async def stop(self) -> None:
        await self.validator.stop()
        await super().stop()

    def certs_dir(self) -> Path:
        return self.tmp_dir / "dane-certs"

    async def dane_mx(
        self,
        domain: str,
        cert: ServerCert | ssl.SSLContext | None,
        records: Sequence[str] = (),
        *,
        host: str | None = None,
        **sink_options: Any,
    ) -> MxSink:
        """`domain MX 10 <host>`, a sink at <host> presenting `cert` (a DANE test
        certificate or any server context; no STARTTLS when None), and TLSA `records` at
        `_25._tcp.<host>`."""
        host = host or f"mx1.{domain}"
        self.mx_record(domain, (10, host))
        context = cert.context if isinstance(cert, ServerCert) else cert
        starttls = context is not None
        sink = MxSink(
            self.allocate_ip(),
            self.delivery_port,
            hostname=host,
            starttls=starttls,
            cert=context,
            **sink_options,
        )
        await sink.start()
        if self.delivery_port == 0:
            self.delivery_port = sink.port
        self.dns.add(host, "A", sink.ip)
        self.sinks[host.lower()] = sink
        for record in records:
            self.dns.add(f"_25._tcp.{host}", "TLSA", record)
        return sink

    def relay_config(self, state_dir: Path, **overrides: dict[str, Any]) -> dict[str, Any]:
        """The relay config, DNS through the validating resolver (on loopback: DANE on)."""
        config = super().relay_config(state_dir, **overrides)
        if "nameservers" not in overrides.get("dns", {}):
            config["dns"]["nameservers"] = [self.validator.nameserver]
        return config
