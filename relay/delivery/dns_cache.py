"""The relay's DNS answer cache: dnspython's LRU cache, holding answers for their TTL only.

Owns which answers may be kept. Delivery asks DNS for the same names over and over (the
MX of a busy domain, its hosts' addresses, `_mta-sts` TXT on every attempt); like any MTA's
resolver we reuse answers for as long as their publisher allows (RFC 1035 §3.2.1 TTL) and
not a second more. Knows nothing about MTA-STS or SMTP.

- Positive answers: kept until the smallest TTL of the answer (and CNAME chain) runs out;
  TTL 0 means "do not cache" (RFC 1035 §3.2.1).
- Negative answers (NXDOMAIN, NODATA): kept only when the response carries the zone's SOA,
  for min(SOA TTL, SOA minimum) (RFC 2308 §5). dnspython would otherwise guess 300 s for a
  negative answer without an SOA; we never guess.
- SERVFAIL, timeouts and garbage are never cached (dnspython does not pass them here).
"""

from __future__ import annotations

import time

import dns.message
import dns.rdatatype
import dns.resolver

DEFAULT_MAX_ENTRIES = 10_000


class TtlCache(dns.resolver.LRUCache):
    """A bounded LRU answer cache that refuses what must not be cached (see module doc)."""

    def __init__(self, max_size: int = DEFAULT_MAX_ENTRIES) -> None:
        super().__init__(max_size)

    def put(self, key: dns.resolver.CacheKey, value: dns.resolver.Answer) -> None:
        if value.expiration <= time.time():
            return  # TTL 0: valid for this one answer only
        if value.rrset is None and not _has_soa(value.response):
            return  # a negative answer without an SOA has no negative TTL (RFC 2308 §5)
        super().put(key, value)


def _has_soa(response: dns.message.Message) -> bool:
    return any(rrset.rdtype == dns.rdatatype.SOA for rrset in response.authority)
