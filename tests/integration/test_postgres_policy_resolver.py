"""One policy fetch per domain refresh across nodes (issue 15): two PostgresPolicyCache /
PolicyResolver pairs on one PostgreSQL database, as two relay nodes run them, against the
lab's real DNS server and HTTPS policy host; and a database that goes away, which the
resolver takes for "unknown", never for "nothing cached" (as with SQLite,
tests/integration/test_policy_cache_errors.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import dns.asyncresolver
import pytest

from policy.cache_postgres import PostgresPolicyCache
from policy.model import Mode, PolicyLookup, TlsRptResult
from policy.resolver import PolicyCacheUnavailable, PolicyResolver
from policy.webpki import client_context
from tests.support.postgres import PostgresServer
from tests.support.world import World, policy_body

DOMAIN = "policy-500.test"
BACKOFF = 300.0


class Clock:
    """Wall-clock seconds for both resolvers, moved by hand past the back-off."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Node:
    cache: PostgresPolicyCache
    resolver: PolicyResolver


@dataclass
class Lab:
    world: World
    clock: Clock
    one: Node
    two: Node

    def fetches(self) -> int:
        return len(self.world.policy_server.requests_for(DOMAIN))

    def serve(self, status: int) -> None:
        body = policy_body("enforce", [f"mx1.{DOMAIN}"], 86400)
        self.world.policy_server.serve(DOMAIN, body, status=status)


def _node(world: World, url: str, clock: Clock) -> Node:
    resolver = dns.asyncresolver.Resolver(configure=False)  # no answer cache
    resolver.nameservers = [world.dns.address[0]]
    resolver.port = world.dns.address[1]
    resolver.timeout = resolver.lifetime = 2.0
    # revalidate_after=0: each lookup reads the database, so what is seen is shared.
    cache = PostgresPolicyCache(url, revalidate_after=0.0, reconnect_pause=0.0)
    return Node(
        cache,
        PolicyResolver(
            cache,
            resolver,
            client_context(str(world.pki.ca_file)),
            https_port=world.policy_server.port,
            fetch_deadline=3.0,
            dns_timeout=2.0,
            failure_backoff=BACKOFF,
            clock=clock,
        ),
    )


@pytest.fixture
def lab(world: World, pg_url: str) -> Iterator[Lab]:
    clock = Clock()
    made = Lab(world, clock, _node(world, pg_url, clock), _node(world, pg_url, clock))
    world.publish_policy(DOMAIN, policy_id="1")
    made.serve(500)
    yield made
    made.one.cache.close()
    made.two.cache.close()


def assert_failed_without_policy(lookup: PolicyLookup) -> None:
    assert (lookup.domain, lookup.policy, lookup.source) == (DOMAIN, None, "none")
    assert lookup.failure is TlsRptResult.STS_POLICY_FETCH_ERROR


async def test_a_back_off_holds_back_every_node_then_a_success_ends_it(lab: Lab) -> None:
    assert_failed_without_policy(await lab.one.resolver.resolve(DOMAIN))
    for _ in range(3):
        assert_failed_without_policy(await lab.two.resolver.resolve(DOMAIN))
        assert_failed_without_policy(await lab.one.resolver.resolve(DOMAIN))
    assert lab.fetches() == 1

    lab.clock.now += BACKOFF
    lab.serve(200)
    fetched = await lab.two.resolver.resolve(DOMAIN)
    assert (fetched.source, fetched.policy_id, fetched.failure) == ("fetched", "1", None)
    assert lab.one.cache.fetch_state(DOMAIN, "1", lab.clock.now) is None
    cached = await lab.one.resolver.resolve(DOMAIN)
    assert (cached.source, cached.policy_id) == ("cached", "1")
    assert cached.policy is not None
    assert cached.policy.mode is Mode.ENFORCE
    assert lab.fetches() == 2


@pytest.mark.parametrize("status", [500, 200])
async def test_two_nodes_at_once_fetch_once(lab: Lab, status: int) -> None:
    # Whichever claims the fetch first, the other waits for it or finds what it left.
    lab.serve(status)
    lookups = await asyncio.gather(
        lab.one.resolver.resolve(DOMAIN), lab.two.resolver.resolve(DOMAIN)
    )
    assert lab.fetches() == 1
    if status == 500:
        for lookup in lookups:
            assert_failed_without_policy(lookup)
    else:
        assert sorted(lookup.source for lookup in lookups) == ["cached", "fetched"]


async def test_a_proactive_refresh_on_both_nodes_fetches_once(lab: Lab) -> None:
    lab.serve(200)
    assert (await lab.one.resolver.resolve(DOMAIN)).source == "fetched"
    lab.clock.now += 86_400 * 0.8  # past the refresh point (50-75% of the lifetime)
    refreshed = await asyncio.gather(
        lab.one.resolver.refresh_due(lab.clock.now, recently_used=86_400),
        lab.two.resolver.refresh_due(lab.clock.now, recently_used=86_400),
    )
    assert sum(refreshed) == 1
    assert lab.fetches() == 2


async def test_a_database_gone_is_unknown_not_empty(lab: Lab, postgres: PostgresServer) -> None:
    lab.serve(200)
    assert (await lab.one.resolver.resolve(DOMAIN)).source == "fetched"
    lab.serve(500)
    postgres.stop()
    try:
        # The cache cannot say whether an enforce policy is cached: unknown, not "none".
        lookup = await lab.two.resolver.resolve(DOMAIN)
        assert (lookup.policy, lookup.source) == (None, "unavailable")
        assert lookup.detail is not None
        assert lookup.detail.startswith("policy cache unreadable: PolicyCacheError: PostgreSQL")
        with pytest.raises(PolicyCacheUnavailable):
            await lab.two.resolver.refresh_due(lab.clock.now, recently_used=86_400)
    finally:
        postgres.start()
    lookup = await lab.two.resolver.resolve(DOMAIN)  # the same node, connected again
    assert (lookup.source, lookup.policy_id) == ("cached", "1")
