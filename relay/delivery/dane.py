"""DANE for SMTP (RFC 7672, with RFC 7671 and RFC 6698): TLSA evidence and certificate checks.

Owns three things, and knows nothing of MTA-STS, the queue or aiosmtplib:
- `Tlsa`: one TLSA record and whether it is usable for SMTP (RFC 7672 §3.1: DANE-TA(2) and
  DANE-EE(3), selectors Cert(0)/SPKI(1), matching Full(0)/SHA2-256(1)/SHA2-512(2);
  PKIX-TA(0)/PKIX-EE(1) are unusable; digest agility of RFC 7671 §9).
- `DaneLookup.gather`: the DANE evidence of one domain's MX hosts (RFC 7672 §2.2): a TLSA
  lookup at `_25._tcp.<MX host>` only when the MX RRset and the host's address records are
  DNSSEC-secure; what each host's TLSA RRset makes of it (`HostDane`).
- `verify_chain`: does the certificate chain a server sent match one usable record
  (RFC 7672 §3.1.1, §3.1.2, §3.2)? Pure; `now` is a parameter.

Certificate checks (how, and why so):
- The TLS handshake runs with an unverified context (CERT_NONE, TLS 1.2 or newer) and SNI =
  the MX host name (RFC 7672 §8.1); the chain is checked here afterwards, before any mail
  command. Python 3.11 has no public call for the chain the server sent:
  `peer_chain` uses `SSLObject._sslobj.get_unverified_chain()` (CPython's private `_ssl`
  method since 3.10; public as `get_unverified_chain()` from 3.13, which is preferred
  when present). tests/unit/test_ssl_internals.py pins it; without it only the leaf is
  known, so DANE-EE still works and DANE-TA never matches (fails closed).
- DANE-EE(3): the leaf (its DER, or its SubjectPublicKeyInfo) must match. Names and dates
  are ignored (RFC 7672 §3.1.1).
- DANE-TA(2): a certificate the server sent (not the leaf) must match; it becomes the one
  trust anchor of an X.509 path check (`cryptography.x509.verification`, an RFC 5280 path
  builder): signatures, validity dates, CA basic constraints and the leaf's DNS-ID SAN
  against the reference identifier. Extension profiles are permissive (private CAs of
  DANE-TA do not follow the CA/Browser Forum profile), but the leaf needs a SAN: a CN-only
  certificate does not match (RFC 7672 §3.2.2 allows a CN fallback; we do not, as for
  MTA-STS). A TA given only as a bare key (`2 1 0` of a key not sent as a certificate) is
  not supported: such a record never matches.
- Reference identifier for DANE-TA: the TLSA base domain, i.e. the MX host name (RFC 7672
  §3.2.2 requires it; accepting the next-hop domain too is allowed, not required). Only
  that name, so a connection verified for an MX host is verified for every domain using
  that host, and the pool may share it. Wildcards match one left-most label (§3.2.3).
- Several records (a key rollover): one match suffices; records are tried in order.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.rdatatype

from policy.model import TlsRptResult
from relay.delivery.dnssec import (
    Answer,
    DnssecSetting,
    Failed,
    Security,
    lookup,
    request_dnssec,
)
from relay.delivery.mx import MxList, normalize_host

if TYPE_CHECKING:
    # cryptography (several MiB a process) is imported when a chain is first checked
    # against TLSA records (verify_chain): never where DANE is off or no MX publishes any.
    from cryptography import x509

SMTP_PORT = 25  # RFC 7672 §2.2.3: TLSA records of SMTP live at _25._tcp.<host>
# `_ssl.Certificate.public_bytes(format)`: CPython's _ssl.ENCODING_DER (pinned by
# tests/unit/test_ssl_internals.py).
_ENCODING_DER = int(getattr(ssl, "_ssl").ENCODING_DER)  # noqa: B009 - private module


class Usage(IntEnum):
    PKIX_TA = 0
    PKIX_EE = 1
    DANE_TA = 2
    DANE_EE = 3


_DIGEST_SIZES = {1: 32, 2: 64}  # SHA2-256, SHA2-512 (RFC 6698 §2.1.3)


@dataclass(frozen=True, slots=True)
class Tlsa:
    """One TLSA record (RFC 6698 §2.1)."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def text(self) -> str:
        """Presentation form, as RFC 8460 reports name it: "3 1 1 <hex>"."""
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    @property
    def usable(self) -> bool:
        """RFC 7672 §3.1 and RFC 7671 §9: DANE-TA/DANE-EE, a known selector and matching
        type, and a digest of the right length."""
        if self.usage not in (Usage.DANE_TA, Usage.DANE_EE) or self.selector not in (0, 1):
            return False
        if self.mtype == 0:
            return bool(self.data)
        return _DIGEST_SIZES.get(self.mtype) == len(self.data)


def usable_records(records: Sequence[Tlsa]) -> tuple[Tlsa, ...]:
    """The records to match, in order. RFC 7671 §9 (digest algorithm agility): when the same
    usage and selector are published with SHA2-512 as well, SHA2-256 ones are ignored."""
    usable = [r for r in records if r.usable]
    strong = {(r.usage, r.selector) for r in usable if r.mtype == 2}
    return tuple(r for r in usable if not (r.mtype == 1 and (r.usage, r.selector) in strong))


class DaneState(StrEnum):
    """What DANE makes of one MX host (RFC 7672 §2.2)."""

    NOT_APPLICABLE = "not-applicable"  # insecure somewhere, or securely no TLSA records
    USABLE = "usable"  # secure TLSA RRset with a usable record: authenticated TLS, by DANE
    UNUSABLE = "unusable"  # secure TLSA RRset, all unusable: TLS required, unauthenticated
    FAILED = "failed"  # bogus or failed lookup: this host cannot be used now


@dataclass(frozen=True, slots=True)
class HostDane:
    """The DANE evidence of one MX host, with the DNSSEC status of each answer used."""

    host: str
    state: DaneState
    detail: str
    records: tuple[Tlsa, ...] = ()  # the TLSA RRset as published
    addresses: Security | None = None  # the A/AAAA answers (None: not looked up)
    tlsa: Security | None = None  # the TLSA answer (None: not looked up)

    @property
    def usable(self) -> tuple[Tlsa, ...]:
        return usable_records(self.records)

    @property
    def tlsrpt(self) -> TlsRptResult | None:
        return TlsRptResult.DNSSEC_INVALID if self.state is DaneState.FAILED else None


@dataclass(frozen=True, slots=True)
class DaneEvidence:
    """The DANE evidence of one domain: its MX RRset's status and each MX host's."""

    domain: str
    mx: Security
    hosts: Mapping[str, HostDane]

    def host(self, name: str) -> HostDane | None:
        return self.hosts.get(normalize_host(name))


def _records(answer: Answer) -> tuple[Tlsa, ...]:
    return tuple(
        Tlsa(int(rd.usage), int(rd.selector), int(rd.mtype), bytes(rd.cert))  # type: ignore[attr-defined]
        for rd in answer.records
        if rd.rdtype == dns.rdatatype.TLSA
    )


# Evidence is remembered per domain for the shortest TTL of the answers it was built from,
# and never longer than this (the DNS cache caps answers at dns.max_ttl as well).
_EVIDENCE_MAX_S = 300.0


class DaneLookup:
    """The DNS side of DANE over a resolver whose AD bit is trusted (`dnssec.DnssecSetting`).

    A domain's evidence is remembered for the shortest TTL among the answers it came from
    (what the DNS cache would answer anyway), so a busy domain costs no DNS work per
    delivery; evidence built on a failed lookup is never remembered (the next attempt asks
    again)."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        *,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolver = resolver
        self._timeout = timeout
        self._clock = clock
        self._remembered: dict[tuple[str, tuple[str, ...]], tuple[float, DaneEvidence]] = {}

    async def _lookup(
        self, name: str, rdtype: str, seen: list[Answer | Failed] | None = None
    ) -> Answer | Failed:
        found = await lookup(self._resolver, name, rdtype, timeout=self._timeout, trusted=True)
        if seen is not None:
            seen.append(found)
        return found

    async def gather(self, domain: str, mx: MxList) -> DaneEvidence:
        """The evidence of `domain`'s MX hosts: remembered (see the class), else looked up.
        An MX answer that came without the AD bit (`MxList.authenticated` False, from the
        same trusted resolver) settles it at once: DANE does not apply (§2.2.1)."""
        if mx.authenticated is False:
            why = f"MX RRset of {domain} is insecure: DANE does not apply"
            hosts = {h: HostDane(h, DaneState.NOT_APPLICABLE, why) for h in mx.hosts}
            return DaneEvidence(domain, Security.INSECURE, hosts)
        key = (domain.lower(), tuple(mx.hosts))
        now = self._clock()
        remembered = self._remembered.get(key)
        if remembered is not None and remembered[0] > now:
            return remembered[1]
        seen: list[Answer | Failed] = []
        evidence = await self._gather(domain, mx, seen)
        # Negative answers carry no RRset TTL: the positive ones bound the memory.
        ttls = [a.ttl for a in seen if isinstance(a, Answer) and a.records]
        failed = any(isinstance(a, Failed) for a in seen)
        keep = 0.0 if failed else min(min(ttls, default=0), _EVIDENCE_MAX_S)
        if keep > 0:
            if len(self._remembered) > 10_000:
                self._remembered = {k: v for k, v in self._remembered.items() if v[0] > now}
            self._remembered[key] = (now + keep, evidence)
        else:
            self._remembered.pop(key, None)
        return evidence

    async def _gather(self, domain: str, mx: MxList, seen: list[Answer | Failed]) -> DaneEvidence:
        """RFC 7672 §2.2.1: DANE applies only below a secure MX RRset (for an implicit MX,
        the secure denial of MX records). A bogus MX lookup never gets here: it fails the
        MX lookup itself (SERVFAIL from the validating resolver) and the mail waits."""
        answer = await self._lookup(domain, "MX", seen)
        if isinstance(answer, Failed) or answer.security is not Security.SECURE:
            status = answer.security
            why = f"MX RRset of {domain} is {status.value}: DANE does not apply"
            hosts = {h: HostDane(h, DaneState.NOT_APPLICABLE, why) for h in mx.hosts}
            return DaneEvidence(domain, status, hosts)
        found = await asyncio.gather(*(self.host(h, seen) for h in mx.hosts))
        return DaneEvidence(domain, Security.SECURE, {h.host: h for h in found})

    async def host(self, host: str, seen: list[Answer | Failed] | None = None) -> HostDane:
        """One MX host below a secure MX RRset: its address records (§2.2.2), then its
        TLSA RRset (§2.2.3)."""
        host = normalize_host(host)
        addresses = await asyncio.gather(
            self._lookup(host, "AAAA", seen), self._lookup(host, "A", seen)
        )
        failed = [a for a in addresses if isinstance(a, Failed)]
        if any(isinstance(a, Failed) and a.bogus for a in addresses):
            detail = f"address records of {host} are bogus: {failed[0].detail}"
            return HostDane(host, DaneState.FAILED, detail, addresses=Security.BOGUS)
        answered = [a for a in addresses if isinstance(a, Answer)]
        if not answered:
            # No address at all: the attempt cannot reach the host anyway, and says why.
            detail = f"address lookup of {host} failed: {failed[0].detail}"
            return HostDane(host, DaneState.NOT_APPLICABLE, detail, addresses=Security.BOGUS)
        if any(a.security is not Security.SECURE for a in answered):
            detail = f"address records of {host} are insecure: DANE does not apply"
            return HostDane(host, DaneState.NOT_APPLICABLE, detail, addresses=Security.INSECURE)
        return await self._tlsa(host, seen)

    async def _tlsa(self, host: str, seen: list[Answer | Failed] | None) -> HostDane:
        name = f"_{SMTP_PORT}._tcp.{host}"
        answer = await self._lookup(name, "TLSA", seen)
        secure = Security.SECURE
        if isinstance(answer, Failed):
            # RFC 7672 §2.2: a failed TLSA lookup is no evidence of absence: never a
            # downgrade to MTA-STS or to cleartext, the host is skipped (or the mail waits).
            detail = f"TLSA lookup failed: {answer.detail}"
            return HostDane(host, DaneState.FAILED, detail, addresses=secure, tlsa=Security.BOGUS)
        if answer.security is not Security.SECURE:
            detail = f"TLSA RRset {name} is insecure: DANE does not apply"
            return HostDane(
                host, DaneState.NOT_APPLICABLE, detail, addresses=secure, tlsa=answer.security
            )
        records = _records(answer)
        if not records:
            detail = f"no TLSA records at {name} (secure denial)"
            return HostDane(host, DaneState.NOT_APPLICABLE, detail, addresses=secure, tlsa=secure)
        if not usable_records(records):
            detail = f"TLSA RRset {name} has no usable record: TLS required, unauthenticated"
            return HostDane(host, DaneState.UNUSABLE, detail, records, secure, secure)
        detail = f"TLSA RRset {name}: {len(usable_records(records))} usable record(s)"
        return HostDane(host, DaneState.USABLE, detail, records, secure, secure)


def dane_lookup(
    setting: DnssecSetting, resolver: dns.asyncresolver.Resolver, *, timeout: float
) -> DaneLookup | None:
    """DANE over `resolver` when `setting` trusts its AD bit (and DO is then asked on
    every query of it), else None: DANE off."""
    if not setting.trusted:
        return None
    request_dnssec(resolver)
    return DaneLookup(resolver, timeout=timeout)


# --- certificates ---------------------------------------------------------------------


@functools.cache
def dane_context() -> ssl.SSLContext:
    """The client context of DANE sessions (RFC 7672 §3, §8.1): the certificate is checked
    here (`verify_chain`), not by OpenSSL (CERT_NONE), and TLS 1.2 or newer (RFC 8996),
    whatever opportunistic sessions accept. Shared: SSLContexts are costly to build."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    return context


def peer_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[bytes, ...]:
    """The certificate chain the server sent (DER, leaf first), whether or not verified."""
    public = getattr(ssl_object, "get_unverified_chain", None)  # Python >= 3.13
    if callable(public):
        return tuple(_der(c) for c in public())
    inner = getattr(ssl_object, "_sslobj", None)
    private = getattr(inner, "get_unverified_chain", None)  # CPython 3.10-3.12 `_ssl`
    if callable(private):
        chain = private() or []
        return tuple(_der(c) for c in chain)
    leaf = ssl_object.getpeercert(binary_form=True)
    return (leaf,) if leaf else ()


def _der(cert: object) -> bytes:
    if isinstance(cert, bytes):
        return cert
    public_bytes = getattr(cert, "public_bytes", None)
    if not callable(public_bytes):
        raise TypeError(f"not a certificate: {type(cert).__name__}")
    der = public_bytes(_ENCODING_DER)
    if not isinstance(der, bytes):
        raise TypeError(f"not DER: {type(der).__name__}")
    return der


@dataclass(frozen=True, slots=True)
class DaneMatch:
    """A record matched: the connection is DANE-authenticated."""

    record: Tlsa


@dataclass(frozen=True, slots=True)
class DaneMismatch:
    """No record matched. `result` is the RFC 8460 type: tlsa-invalid, or for a DANE-TA
    anchor found but failing the path check, certificate-host-mismatch / -expired."""

    result: TlsRptResult
    detail: str


def _selected(cert: x509.Certificate, der: bytes, selector: int) -> bytes:
    if selector == 0:
        return der
    from cryptography.hazmat.primitives import serialization

    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _matches(record: Tlsa, cert: x509.Certificate, der: bytes) -> bool:
    data = _selected(cert, der, record.selector)
    if record.mtype == 1:
        data = hashlib.sha256(data).digest()
    elif record.mtype == 2:
        data = hashlib.sha512(data).digest()
    return data == record.data


def _path_check(
    leaf: x509.Certificate, others: Sequence[x509.Certificate], anchor: x509.Certificate,
    name: str, now: datetime,
) -> DaneMismatch | None:  # fmt: skip
    """RFC 7672 §3.1.2, §3.2.2: `leaf` chains to `anchor` (through `others`), is in date
    and names `name` in a DNS-ID SAN."""
    from cryptography import x509
    from cryptography.x509.verification import (
        Criticality,
        ExtensionPolicy,
        PolicyBuilder,
        Store,
        VerificationError,
    )

    agnostic = Criticality.AGNOSTIC
    policies = {
        "ca_policy": ExtensionPolicy.permit_all().require_present(
            x509.BasicConstraints, agnostic, None
        ),
        "ee_policy": ExtensionPolicy.permit_all().require_present(
            x509.SubjectAlternativeName, agnostic, None
        ),
    }
    try:
        verifier = (
            PolicyBuilder()
            .store(Store([anchor]))
            .time(now)
            .extension_policies(**policies)
            .build_server_verifier(x509.DNSName(name))
        )
        verifier.verify(leaf, [c for c in others if c != anchor])
    except VerificationError as exc:
        text = " ".join(str(exc).split()).split(" (encountered", 1)[0][:200]
        lowered = text.lower()
        if "subjectaltname" in lowered or ("name" in lowered and "match" in lowered):
            result = TlsRptResult.CERTIFICATE_HOST_MISMATCH
        elif "validity" in lowered or "expired" in lowered or "not valid" in lowered:
            result = TlsRptResult.CERTIFICATE_EXPIRED
        else:
            result = TlsRptResult.TLSA_INVALID
        return DaneMismatch(result, f"DANE-TA path check for {name} failed: {text}")
    except ValueError as exc:  # a name cryptography refuses
        return DaneMismatch(TlsRptResult.TLSA_INVALID, f"DANE-TA path check failed: {exc}")
    return None


def verify_chain(
    chain: Sequence[bytes], records: Sequence[Tlsa], name: str, now: datetime
) -> DaneMatch | DaneMismatch:
    """Match the server's chain (DER, leaf first) against usable TLSA `records` for the MX
    host `name` (the TLSA base domain) at time `now`. Pure."""
    usable = usable_records(records)
    if not chain:
        return DaneMismatch(TlsRptResult.TLSA_INVALID, "the server sent no certificate")
    from cryptography import x509

    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as exc:
        return DaneMismatch(TlsRptResult.TLSA_INVALID, f"unreadable certificate: {exc}")
    leaf, others = certs[0], certs[1:]
    ta_failure: DaneMismatch | None = None
    for record in usable:
        if record.usage == Usage.DANE_EE:
            if _matches(record, leaf, chain[0]):
                return DaneMatch(record)
            continue
        for cert, der in zip(others, chain[1:], strict=True):
            if not _matches(record, cert, der):
                continue
            failure = _path_check(leaf, others, cert, name.rstrip(".").lower(), now)
            if failure is None:
                return DaneMatch(record)
            ta_failure = ta_failure or failure
    if ta_failure is not None:
        return ta_failure
    shown = ", ".join(r.text[:24] + "..." for r in usable[:3])
    return DaneMismatch(
        TlsRptResult.TLSA_INVALID, f"no TLSA record ({shown}) matches the certificate chain"
    )
