"""DaneLookup remembers a domain's evidence for the shortest TTL of the answers it came from,
never evidence built on a failed lookup (relay/delivery/dane.py). The DNS side is a fake of
our own `_lookup` (answers chosen per test); the resolver itself is never called."""

from __future__ import annotations

import asyncio

import dns.asyncresolver
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from relay.delivery.dane import DaneLookup, DaneState
from relay.delivery.dnssec import Answer, Failed, Security
from relay.delivery.mx import MxList

MX = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.MX, "10 mx.d.test.")


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


class Scripted(DaneLookup):
    """Answers every MX query with `self.answer` and counts the queries."""

    def __init__(self, answer: Answer | Failed, clock: Clock) -> None:
        super().__init__(dns.asyncresolver.Resolver(configure=False), timeout=1.0, clock=clock)
        self.answer = answer
        self.queries = 0

    async def _lookup(
        self, name: str, rdtype: str, seen: list[Answer | Failed] | None = None
    ) -> Answer | Failed:
        self.queries += 1
        if seen is not None:
            seen.append(self.answer)
        return self.answer


def gather(lookup: DaneLookup) -> DaneState:
    evidence = asyncio.run(lookup.gather("d.test", MxList(("mx.d.test",), False)))
    host = evidence.host("mx.d.test")
    assert host is not None
    return host.state


def test_evidence_is_remembered_for_the_answers_ttl_then_looked_up_again() -> None:
    clock = Clock()
    lookup = Scripted(Answer((MX,), Security.INSECURE, ttl=60), clock)
    assert gather(lookup) is DaneState.NOT_APPLICABLE
    assert gather(lookup) is DaneState.NOT_APPLICABLE
    assert lookup.queries == 1
    clock.now += 61
    gather(lookup)
    assert lookup.queries == 2


def test_evidence_is_never_kept_longer_than_the_cap() -> None:
    clock = Clock()
    lookup = Scripted(Answer((MX,), Security.INSECURE, ttl=86_400), clock)
    gather(lookup)
    clock.now += 301
    gather(lookup)
    assert lookup.queries == 2


def test_evidence_from_a_failed_lookup_is_not_remembered() -> None:
    clock = Clock()
    lookup = Scripted(Failed("MX d.test.: SERVFAIL"), clock)
    gather(lookup)
    gather(lookup)
    assert lookup.queries == 2


def test_an_mx_answer_without_the_ad_bit_settles_it_without_any_lookup() -> None:
    lookup = Scripted(Answer((MX,), Security.SECURE, ttl=60), Clock())
    insecure = MxList(("mx.d.test",), False, authenticated=False)
    evidence = asyncio.run(lookup.gather("d.test", insecure))
    assert evidence.mx is Security.INSECURE
    assert lookup.queries == 0
    # Unknown (an MxList not from resolve_mx, e.g. `policy check`): looked up as before.
    unknown = MxList(("mx.d.test",), False)
    assert asyncio.run(lookup.gather("d.test", unknown)).mx is Security.SECURE
    assert lookup.queries > 0
