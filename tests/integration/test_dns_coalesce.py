"""Identical DNS queries in flight at the same time are sent once (relay/delivery/dns_coalesce.py),
against the lab DNS server on loopback (TTL 0 unless a test says otherwise, as in the lab):
every caller gets the one query's outcome, keeps its own lifetime and cancellation, and
nothing outlives the flight (the TTL cache alone keeps answers).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import dns.flags
import dns.resolver
import pytest

from policy.discover import Found, discover, forget_record
from relay.app import make_resolver
from relay.delivery.dns_coalesce import CoalescingResolver
from relay.delivery.mx import MxList, resolve_mx
from tests.support.dns import DnsServer
from tests.support.waiting import eventually

DELAY = 0.3  # seconds the slow server takes to answer: long enough for callers to pile up


@pytest.fixture
async def slow_dns() -> AsyncIterator[DnsServer]:
    """The lab DNS server answering each UDP query DELAY seconds after it came."""
    server = DnsServer(udp_delay=DELAY)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _resolver(server: DnsServer, lifetime: float = 2.0) -> CoalescingResolver:
    resolver = make_resolver((server.nameserver,), lifetime)
    assert isinstance(resolver, CoalescingResolver)
    return resolver


def _addresses(answer: dns.resolver.Answer) -> list[str]:
    return [r.address for r in answer]


async def test_concurrent_identical_queries_are_sent_once(slow_dns: DnsServer) -> None:
    slow_dns.add("busy.test", "A", "127.0.0.7")
    resolver = _resolver(slow_dns)
    answers = await asyncio.gather(*(resolver.resolve("busy.test.", "A") for _ in range(20)))
    assert all(_addresses(a) == ["127.0.0.7"] for a in answers)
    assert all(a is answers[0] for a in answers)  # one shared Answer
    assert slow_dns.queries == [("busy.test", "A")]
    assert (resolver.queries, resolver.coalesced) == (1, 19)


async def test_different_questions_are_not_merged(slow_dns: DnsServer) -> None:
    slow_dns.add("one.test", "A", "127.0.0.1")
    slow_dns.add("one.test", "MX", "10 mx.one.test.")
    slow_dns.add("two.test", "A", "127.0.0.2")
    resolver = _resolver(slow_dns)
    calls = [("one.test.", "A"), ("one.test.", "MX"), ("two.test.", "A"), ("One.Test.", "A")]
    answers = await asyncio.gather(*(resolver.resolve(n, t) for n, t in calls))
    assert [a.rdtype for a in answers] == [1, 15, 1, 1]
    assert answers[3] is answers[0]  # names compare without regard to case
    assert sorted(slow_dns.queries) == [("one.test", "A"), ("one.test", "MX"), ("two.test", "A")]


async def test_queries_asked_with_other_resolver_settings_are_not_merged(
    slow_dns: DnsServer,
) -> None:
    # dnssec.request_dnssec turns DO on for the resolver: a query started before must not
    # answer one asked after, whose answer would carry the AD bit.
    slow_dns.add("signed.test", "A", "127.0.0.3")
    resolver = _resolver(slow_dns)
    plain = asyncio.create_task(resolver.resolve("signed.test.", "A"))
    await asyncio.sleep(0)
    resolver.use_edns(0, dns.flags.DO, 1232)
    with_do = asyncio.create_task(resolver.resolve("signed.test.", "A"))
    first, second = await asyncio.gather(plain, with_do)
    assert first is not second
    assert slow_dns.queries == [("signed.test", "A")] * 2


async def test_nodata_is_handled_per_caller(slow_dns: DnsServer) -> None:
    slow_dns.add("v4only.test", "A", "127.0.0.4")
    resolver = _resolver(slow_dns)
    raising, quiet = await asyncio.gather(
        resolver.resolve("v4only.test.", "AAAA"),
        resolver.resolve("v4only.test.", "AAAA", raise_on_no_answer=False),
        return_exceptions=True,
    )
    assert isinstance(raising, dns.resolver.NoAnswer)
    assert isinstance(quiet, dns.resolver.Answer)
    assert quiet.rrset is None
    assert slow_dns.queries == [("v4only.test", "AAAA")]


async def test_nxdomain_reaches_every_waiter(slow_dns: DnsServer) -> None:
    resolver = _resolver(slow_dns)
    outcomes = await asyncio.gather(
        *(resolver.resolve("absent.test.", "MX") for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(o, dns.resolver.NXDOMAIN) for o in outcomes)
    assert slow_dns.queries == [("absent.test", "MX")]


async def test_a_server_that_never_answers_times_out_every_waiter(dns_server: DnsServer) -> None:
    dns_server.add("mute.test", "A", "127.0.0.5")
    dns_server.fail("mute.test", None, "timeout")
    resolver = _resolver(dns_server, lifetime=0.5)
    outcomes = await asyncio.gather(
        *(resolver.resolve("mute.test.", "A") for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(o, dns.resolver.LifetimeTimeout) for o in outcomes)
    assert dns_server.queries == [("mute.test", "A")]


async def test_a_waiter_with_a_shorter_lifetime_times_out_alone(slow_dns: DnsServer) -> None:
    slow_dns.add("slow.test", "A", "127.0.0.6")
    resolver = _resolver(slow_dns)
    patient = asyncio.create_task(resolver.resolve("slow.test.", "A", lifetime=2.0))
    await asyncio.sleep(0)
    start = time.monotonic()
    with pytest.raises(dns.resolver.LifetimeTimeout):
        await resolver.resolve("slow.test.", "A", lifetime=0.05)
    assert time.monotonic() - start < DELAY  # its own lifetime, not the query's
    assert _addresses(await patient) == ["127.0.0.6"]
    assert slow_dns.queries == [("slow.test", "A")]


async def test_a_caller_allowing_longer_than_the_query_in_flight_asks_itself(
    slow_dns: DnsServer,
) -> None:
    # Joining a query that gives up sooner would cut the caller's own lifetime short.
    slow_dns.add("slow.test", "A", "127.0.0.6")
    resolver = _resolver(slow_dns)
    hasty = asyncio.create_task(resolver.resolve("slow.test.", "A", lifetime=0.1))
    await asyncio.sleep(0)
    assert _addresses(await resolver.resolve("slow.test.", "A", lifetime=2.0)) == ["127.0.0.6"]
    with pytest.raises(dns.resolver.LifetimeTimeout):
        await hasty
    assert slow_dns.queries == [("slow.test", "A")] * 2


async def test_cancelling_one_waiter_leaves_the_other_its_answer(slow_dns: DnsServer) -> None:
    slow_dns.add("cancel.test", "A", "127.0.0.8")
    resolver = _resolver(slow_dns)
    first = asyncio.create_task(resolver.resolve("cancel.test.", "A"))  # started the query
    second = asyncio.create_task(resolver.resolve("cancel.test.", "A"))
    await asyncio.sleep(DELAY / 3)
    first.cancel()
    assert _addresses(await second) == ["127.0.0.8"]
    assert first.cancelled()
    assert slow_dns.queries == [("cancel.test", "A")]


async def test_cancelling_every_waiter_cancels_the_query(dns_server: DnsServer) -> None:
    dns_server.add("gone.test", "A", "127.0.0.9")
    dns_server.fail("gone.test", "A", "timeout")  # the query can only end by cancellation
    resolver = _resolver(dns_server, lifetime=5.0)
    waiters = [asyncio.create_task(resolver.resolve("gone.test.", "A")) for _ in range(3)]
    await eventually(lambda: dns_server.queried("gone.test", "A"))
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    # The query's task ends too (cancelled, so nobody hears of it): no task is left.
    await eventually(lambda: asyncio.all_tasks() == {asyncio.current_task()}, timeout=2.0)
    # A new call does not join the cancelled query: it asks, and is answered at once.
    dns_server.clear_failure("gone.test", "A")
    async with asyncio.timeout(2.0):
        assert _addresses(await resolver.resolve("gone.test.", "A")) == ["127.0.0.9"]
    assert dns_server.queries == [("gone.test", "A")] * 2


async def test_a_call_after_the_answer_arrived_asks_again(dns_server: DnsServer) -> None:
    dns_server.add("fresh.test", "A", "127.0.0.10")  # TTL 0: nothing is cached
    resolver = _resolver(dns_server)
    assert _addresses(await resolver.resolve("fresh.test.", "A")) == ["127.0.0.10"]
    dns_server.remove("fresh.test", "A")
    dns_server.add("fresh.test", "A", "127.0.0.11")
    assert _addresses(await resolver.resolve("fresh.test.", "A")) == ["127.0.0.11"]
    assert dns_server.queries == [("fresh.test", "A")] * 2
    assert resolver.coalesced == 0


async def test_the_ttl_cache_answers_first(dns_server: DnsServer) -> None:
    dns_server.add("kept.test", "MX", "10 mx.kept.test.", ttl=300)
    resolver = _resolver(dns_server)
    first = await resolver.resolve("kept.test.", "MX")
    answers = await asyncio.gather(*(resolver.resolve("kept.test.", "MX") for _ in range(5)))
    assert all(a is first for a in answers)
    assert dns_server.queries == [("kept.test", "MX")]
    assert (resolver.queries, resolver.coalesced) == (1, 0)


async def test_the_check_before_a_bounce_never_joins_an_earlier_query(slow_dns: DnsServer) -> None:
    # RFC 8461 §5.1 step 3: forget_record (policy/discover.py) makes the next lookup ask DNS;
    # a query already in flight when it was called may carry the record as it was before.
    slow_dns.txt("_mta-sts.recheck.test", "v=STSv1; id=1")
    resolver = _resolver(slow_dns)
    ordinary = asyncio.create_task(discover("recheck.test", resolver, 2.0))
    await asyncio.sleep(DELAY / 3)
    slow_dns.remove("_mta-sts.recheck.test", "TXT")
    slow_dns.txt("_mta-sts.recheck.test", "v=STSv1; id=2")
    forget_record("recheck.test", resolver)
    recheck = await discover("recheck.test", resolver, 2.0)
    assert isinstance(recheck, Found)
    assert recheck.record.id == "2"
    before = await ordinary
    assert isinstance(before, Found)
    assert before.record.id == "1"
    assert slow_dns.queries == [("_mta-sts.recheck.test", "TXT")] * 2


async def test_concurrent_deliveries_share_their_lookups(slow_dns: DnsServer) -> None:
    # What the relay does for each of many messages to one domain at once.
    slow_dns.add("bulk.test", "MX", "10 mx.bulk.test.")
    slow_dns.add("mx.bulk.test", "A", "127.0.0.12")
    slow_dns.txt("_mta-sts.bulk.test", "v=STSv1; id=9")
    resolver = _resolver(slow_dns)

    async def deliver() -> tuple[object, object]:
        mx = await resolve_mx("bulk.test", resolver, timeout=2.0, rng=random.Random(1))
        return mx, await discover("bulk.test", resolver, 2.0)

    results = await asyncio.gather(*(deliver() for _ in range(10)))
    assert all(mx == MxList(hosts=("mx.bulk.test",), authenticated=False) for mx, _ in results)
    assert all(isinstance(found, Found) for _, found in results)
    assert sorted(slow_dns.queries) == [("_mta-sts.bulk.test", "TXT"), ("bulk.test", "MX")]
