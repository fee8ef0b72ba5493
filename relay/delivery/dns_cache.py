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
- Every answer is kept at most `max_ttl` seconds (`dns.max_ttl`, default an hour), whatever
  its TTL says: a spoofed answer with a TTL of 2^31-1 s (RFC 2181 §8 allows 68 years)
  would otherwise steer MX choice and the `_mta-sts` id for as long as the process lives.
  Resolvers cap the same way (Unbound's cache-max-ttl, BIND's max-cache-ttl).
- SERVFAIL, timeouts and garbage are never cached (dnspython does not pass them here).
"""

from __future__ import annotations

import time

import dns.message
import dns.rdatatype
import dns.resolver

DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_TTL = 3600.0  # seconds: `dns.max_ttl`


class TtlCache(dns.resolver.LRUCache):
    """A bounded LRU answer cache that refuses what must not be cached and keeps nothing
    longer than `max_ttl` seconds (see module doc)."""

    def __init__(
        self, max_size: int = DEFAULT_MAX_ENTRIES, *, max_ttl: float = DEFAULT_MAX_TTL
    ) -> None:
        super().__init__(max_size)
        self.max_ttl = max_ttl
        # Bumped by every flush: a query in flight before a flush is not shared with calls
        # made after it (relay/delivery/dns_coalesce.py).
        self.flushes = 0

    def put(self, key: dns.resolver.CacheKey, value: dns.resolver.Answer) -> None:
        now = time.time()
        if value.expiration <= now:
            return  # TTL 0: valid for this one answer only
        if value.rrset is None and not _has_soa(value.response):
            return  # a negative answer without an SOA has no negative TTL (RFC 2308 §5)
        # The cap: dnspython reads only `expiration` when it looks an answer up again.
        value.expiration = min(value.expiration, now + self.max_ttl)
        super().put(key, value)

    def flush(self, key: dns.resolver.CacheKey | None = None) -> None:
        self.flushes += 1
        super().flush(key)


def _has_soa(response: dns.message.Message) -> bool:
    return any(rrset.rdtype == dns.rdatatype.SOA for rrset in response.authority)
