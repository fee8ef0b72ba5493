"""Which DNS answers the relay's cache keeps (relay/delivery/dns_cache.py): positive answers
for their TTL, negative ones only with an SOA (RFC 2308 §5), nothing with TTL 0."""

from __future__ import annotations

import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest

from relay.delivery.dns_cache import TtlCache


def _answer(ttl: int, *, soa: bool, rrset: bool) -> dns.resolver.Answer:
    qname = dns.name.from_text("x.test.")
    response = dns.message.make_response(dns.message.make_query(qname, "A"))
    sections = []
    if rrset:
        sections.append((response.answer, dns.rrset.from_text(qname, ttl, "IN", "A", "127.0.0.1")))
    if soa:
        text = f"ns.test. host.test. 1 3600 600 86400 {ttl}"
        sections.append((response.authority, dns.rrset.from_text("test.", ttl, "IN", "SOA", text)))
    for section, records in sections:
        # find_rrset(create=True) also indexes the RRset, as parsing a reply would.
        found = response.find_rrset(
            section, records.name, records.rdclass, records.rdtype, create=True
        )
        for rdata in records:
            found.add(rdata, ttl)
    assert isinstance(response, dns.message.QueryMessage)
    return dns.resolver.Answer(qname, dns.rdatatype.A, dns.rdataclass.IN, response)


@pytest.mark.parametrize(
    ("ttl", "soa", "rrset", "kept"),
    [
        (300, False, True, True),  # a positive answer, for its TTL
        (0, False, True, False),  # TTL 0: not cached
        (300, True, False, True),  # NODATA with the zone's SOA: negative TTL known
        (300, False, False, False),  # NODATA without SOA: no negative TTL, not cached
    ],
)
def test_cache_keeps_only_what_may_be_kept(ttl: int, soa: bool, rrset: bool, kept: bool) -> None:
    cache = TtlCache()
    answer = _answer(ttl, soa=soa, rrset=rrset)
    key = (answer.qname, answer.rdtype, answer.rdclass)
    cache.put(key, answer)
    assert (cache.get(key) is answer) is kept
