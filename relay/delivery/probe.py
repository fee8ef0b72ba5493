"""A diagnostic TLS probe of one MX address, for `sts-relay policy check`.

Talks to the MX exactly as delivery does (same TLS contexts, SNI = the MX name, TLS 1.2 or
newer, aiosmtplib with `start_tls=False`), but sends no mail: greeting, EHLO, STARTTLS,
QUIT. Certificate failures are classified with the RFC 8460 result types delivery uses.
Knows nothing of policies or the queue; `relay.cli.policy_commands` decides what a probe means.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, replace

import aiosmtplib
from aiosmtplib import SMTPException

from policy.model import TlsRptResult
from policy.webpki import classify_certificate_error
from relay.delivery.client import Dialer, describe
from relay.delivery.dane import peer_chain

_ERRORS = (SMTPException, OSError, ValueError)


@dataclass(frozen=True, slots=True)
class Probe:
    """What one address of one MX showed. `result` is why verification failed (None when
    the certificate was valid); `tls_version` is what an unverified handshake got."""

    ip: str
    connected: bool
    starttls: bool | None = None  # offered in the EHLO reply
    tls_version: str | None = None
    verified: bool = False
    result: TlsRptResult | None = None
    detail: str | None = None
    chain: tuple[bytes, ...] = ()  # the certificates the server sent (DER, leaf first)

    def as_dict(self) -> dict[str, object]:
        return {
            "ip": self.ip,
            "connect": "ok" if self.connected else "failed",
            "starttls": self.starttls,
            "tls_version": self.tls_version,
            "certificate": "valid" if self.verified else (self.result or None),
            "chain": _chain(self),
            "name": _name(self),
            "verified": self.verified,
            "detail": self.detail,
        }


def _chain(probe: Probe) -> str:
    # OpenSSL checks the chain first, then the name, then dates and signatures: a name
    # mismatch or an expiry was found after a chain to a trusted root was built.
    if probe.verified or probe.result in (
        TlsRptResult.CERTIFICATE_HOST_MISMATCH,
        TlsRptResult.CERTIFICATE_EXPIRED,
    ):
        return "trusted"
    if probe.result is TlsRptResult.CERTIFICATE_NOT_TRUSTED:
        return "not trusted"
    return "unknown"


def _name(probe: Probe) -> str:
    if probe.verified or probe.result is TlsRptResult.CERTIFICATE_EXPIRED:
        return "matches"
    if probe.result is TlsRptResult.CERTIFICATE_HOST_MISMATCH:
        return "does not match"
    return "unknown"


async def _starttls(ip: str, mx: str, ctx: ssl.SSLContext, settings: Dialer) -> tuple[Probe, bool]:
    """One connection: EHLO, STARTTLS with `ctx`, QUIT. Returns the probe and whether the
    TLS handshake itself succeeded."""
    smtp = aiosmtplib.SMTP(
        hostname=ip,
        port=settings.port,
        local_hostname=settings.helo,
        start_tls=False,
        timeout=settings.command_timeout,
    )
    try:
        await smtp.connect(timeout=settings.connect_timeout)
        await smtp.ehlo()
    except _ERRORS as exc:
        smtp.close()
        return Probe(ip, connected=False, detail=describe(exc)), False
    try:
        if not smtp.supports_extension("starttls"):
            fail = TlsRptResult.STARTTLS_NOT_SUPPORTED
            return Probe(ip, True, False, result=fail, detail="STARTTLS not offered"), False
        await smtp.starttls(server_hostname=mx, tls_context=ctx)
    except ssl.SSLCertVerificationError as exc:
        return Probe(
            ip, True, True, result=classify_certificate_error(exc), detail=describe(exc)
        ), False
    except _ERRORS as exc:
        detail = f"TLS handshake failed: {describe(exc)}"
        return Probe(ip, True, True, result=TlsRptResult.VALIDATION_FAILURE, detail=detail), False
    else:
        ssl_object = smtp.get_transport_info("ssl_object")
        version: str | None = None
        chain: tuple[bytes, ...] = ()
        if isinstance(ssl_object, ssl.SSLObject):
            version, chain = ssl_object.version(), peer_chain(ssl_object)  # DANE: the chain
        verified = ctx.verify_mode != ssl.CERT_NONE
        with contextlib.suppress(*_ERRORS):
            await smtp.quit()
        probe = Probe(ip, True, True, tls_version=version or "TLS", verified=verified)
        return replace(probe, chain=chain), True
    finally:
        smtp.close()


async def probe_mx(ip: str, mx: str, settings: Dialer) -> Probe:
    """Probe `ip` of MX `mx`: a verified STARTTLS first; when the certificate fails, an
    unverified handshake to learn whether TLS works at all and which version."""
    sni = mx.rstrip(".").lower()
    budget = 2 * (settings.connect_timeout + 4 * settings.command_timeout)
    try:
        async with asyncio.timeout(budget):
            probe, _ = await _starttls(ip, sni, settings.verified_ctx, settings)
            if probe.verified or not probe.connected or not probe.starttls:
                return probe
            plain, ok = await _starttls(ip, sni, settings.unverified_ctx, settings)
            version = plain.tls_version if ok else None
            return Probe(ip, True, True, version, False, probe.result, probe.detail, plain.chain)
    except TimeoutError:
        return Probe(ip, connected=False, detail="probe timed out")
