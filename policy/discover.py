"""Policy discovery: the `_mta-sts.<domain>` TXT record (RFC 8461 §3.1), and the policy
host's addresses for the fetch.

Owns the DNS side of MTA-STS through dnspython and turns every dnspython outcome into a
value (Found, NotFound, TempFail); no exception leaves this module. Knows nothing about
HTTP, the cache or the relay.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from policy.model import StsRecord
from policy.parse import select_sts_record

# dnspython's `lifetime` bounds its own retries; the asyncio deadline is the hard stop
# (CONVENTIONS: every network await inside asyncio.timeout), with a little slack so that
# dnspython's clearer LifetimeTimeout usually wins.
_SLACK = 0.5


@dataclass(frozen=True, slots=True)
class Found:
    """Exactly one valid MTA-STS TXT record was published."""

    record: StsRecord


@dataclass(frozen=True, slots=True)
class NotFound:
    """No usable record: NXDOMAIN, NODATA, or not exactly one valid record (§3.1)."""

    detail: str = "no MTA-STS TXT record"


@dataclass(frozen=True, slots=True)
class TempFail:
    """The lookup failed temporarily: SERVFAIL, timeout, or a malformed answer."""

    detail: str


Discovery = Found | NotFound | TempFail


@functools.lru_cache(maxsize=4096)  # the same domains are looked up for every delivery
def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name.removesuffix("."), origin=dns.name.root)


async def discover(
    domain: str,
    resolver: dns.asyncresolver.Resolver,
    timeout: float,  # noqa: ASYNC109 - part of the API; also dnspython's lifetime
) -> Found | NotFound | TempFail:
    """Look up TXT `_mta-sts.<domain>` and select its MTA-STS record.

    A CNAME at `_mta-sts` is followed by the resolver (§3.1, STS-07). The strings of each
    TXT record are concatenated with nothing in between (STS-06): `rdata.to_text()`
    would add quotes and spaces.
    """
    try:
        qname = _absolute(f"_mta-sts.{domain}")
        async with asyncio.timeout(timeout + _SLACK):
            answer = await resolver.resolve(qname, "TXT", lifetime=timeout, search=False)
        records = [b"".join(rdata.strings) for rdata in answer]
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return NotFound()
    except dns.resolver.YXDOMAIN:
        return NotFound("name too long after DNAME substitution")
    except (dns.resolver.LifetimeTimeout, TimeoutError):
        return TempFail(f"TXT lookup for _mta-sts.{domain} timed out")
    except dns.resolver.NoNameservers as exc:
        return TempFail(f"TXT lookup failed: {_one_line(exc)}")
    except (dns.exception.DNSException, OSError, ValueError, AttributeError) as exc:
        # DNSException covers malformed answers and bad names; OSError a broken socket.
        return TempFail(f"TXT lookup failed: {type(exc).__name__}: {_one_line(exc)}")
    record = select_sts_record(records)
    if record is None:
        return NotFound(f"{len(records)} TXT record(s) but not exactly one valid v=STSv1 record")
    return Found(record)


def forget_record(domain: str, resolver: dns.asyncresolver.Resolver) -> None:
    """Drop the resolver's cached answer for TXT `_mta-sts.<domain>` (and a cached
    NXDOMAIN), so that the next `discover` asks DNS: the check for a new policy before a
    bounce (§5.1 step 3) must not be answered from a cache. No-op without a cache."""
    cache = resolver.cache
    if cache is None:
        return
    try:
        qname = _absolute(f"_mta-sts.{domain}")
    except (dns.exception.DNSException, ValueError):
        return
    cache.flush((qname, dns.rdatatype.TXT, dns.rdataclass.IN))
    cache.flush((qname, dns.rdatatype.ANY, dns.rdataclass.IN))


async def lookup_addresses(
    host: str,
    resolver: dns.asyncresolver.Resolver,
    timeout: float,  # noqa: ASYNC109 - part of the API; also dnspython's lifetime
) -> list[str]:
    """A and AAAA addresses of `host` (IPv4 first), or [] when there are none or DNS fails.

    Both queries run at once under one deadline. IPv4 comes first so that a host with
    broken IPv6 routing does not spend the whole fetch deadline on its first address.
    """
    try:
        qname = _absolute(host)
    except (dns.exception.DNSException, ValueError):
        return []
    try:
        async with asyncio.timeout(timeout + _SLACK):
            v4, v6 = await asyncio.gather(
                _addresses(resolver, qname, "A", timeout),
                _addresses(resolver, qname, "AAAA", timeout),
            )
    except TimeoutError:
        return []
    return v4 + v6


async def _addresses(
    resolver: dns.asyncresolver.Resolver, qname: dns.name.Name, rdtype: str, lifetime: float
) -> list[str]:
    try:
        answer = await resolver.resolve(qname, rdtype, lifetime=lifetime, search=False)
        return [rdata.address for rdata in answer]
    except (dns.exception.DNSException, OSError, ValueError, AttributeError):
        return []


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
