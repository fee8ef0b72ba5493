"""DNS for TLS reporting: the `_smtp._tls.<domain>` TXT record (RFC 8460 §3) and the
addresses of an `https:` reporting endpoint.

Owns these lookups through dnspython and turns every outcome into a value; no exception
leaves this module. Knows nothing about SMTP, HTTP or the counters.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from tlsrpt.model import TlsRptRecord
from tlsrpt.record import select_record

_SLACK = 0.5  # dnspython's own lifetime usually wins; asyncio's deadline is the hard stop


@dataclass(frozen=True, slots=True)
class NoRecord:
    """The domain does not implement TLSRPT (no record, or not exactly one valid one)."""

    detail: str


@dataclass(frozen=True, slots=True)
class LookupFailed:
    """The lookup failed temporarily (SERVFAIL, timeout): try again later."""

    detail: str


Discovery = TlsRptRecord | NoRecord | LookupFailed


async def discover_record(
    domain: str,
    resolver: dns.asyncresolver.Resolver,
    timeout: float,  # noqa: ASYNC109 - also dnspython's lifetime
) -> Discovery:
    """Look up TXT `_smtp._tls.<domain>`; strings of one record are joined without
    spaces (RFC 8460 §3, RFC-CHECKLIST §11)."""
    qname_text = f"_smtp._tls.{domain.removesuffix('.')}"
    try:
        qname = dns.name.from_text(qname_text, origin=dns.name.root)
        async with asyncio.timeout(timeout + _SLACK):
            answer = await resolver.resolve(qname, "TXT", lifetime=timeout, search=False)
        records = [b"".join(rdata.strings) for rdata in answer]
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return NoRecord(f"no TXT record at {qname_text}")
    except (dns.resolver.LifetimeTimeout, TimeoutError):
        return LookupFailed(f"TXT lookup for {qname_text} timed out")
    except (dns.exception.DNSException, OSError, ValueError, AttributeError) as exc:
        return LookupFailed(f"TXT lookup for {qname_text} failed: {type(exc).__name__}")
    record = select_record(records)
    if record is None:
        return NoRecord(f"{len(records)} TXT record(s) at {qname_text}, not one valid TLSRPTv1")
    return record


async def host_addresses(
    host: str,
    resolver: dns.asyncresolver.Resolver,
    timeout: float,  # noqa: ASYNC109 - also dnspython's lifetime
) -> list[str]:
    """A then AAAA addresses of `host`; [] when there are none or DNS fails."""
    try:
        qname = dns.name.from_text(host, origin=dns.name.root)
    except (dns.exception.DNSException, ValueError):
        return []
    found: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            async with asyncio.timeout(timeout + _SLACK):
                answer = await resolver.resolve(qname, rdtype, lifetime=timeout, search=False)
            found.extend(rdata.address for rdata in answer)
        except (dns.exception.DNSException, OSError, ValueError, AttributeError, TimeoutError):
            continue
    return found
