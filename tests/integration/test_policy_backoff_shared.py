"""The fetch back-off (STS-32) and single-flight shared by relay processes on one state
database: two PolicyCache/PolicyResolver pairs on one SQLite file, as `serve.processes = 2`
runs them, against the lab's real DNS server and HTTPS policy host."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.asyncresolver
import pytest

from policy.cache import PolicyCache
from policy.model import Mode, PolicyLookup, TlsRptResult
from policy.resolver import PolicyResolver
from policy.webpki import client_context
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
class Process:
    cache: PolicyCache
    resolver: PolicyResolver


@dataclass
class Lab:
    world: World
    clock: Clock
    one: Process
    two: Process

    def fetches(self) -> int:
        return len(self.world.policy_server.requests_for(DOMAIN))

    def serve(self, status: int) -> None:
        body = policy_body("enforce", [f"mx1.{DOMAIN}"], 86400)
        self.world.policy_server.serve(DOMAIN, body, status=status)


def _process(world: World, db_path: Path, clock: Clock) -> Process:
    resolver = dns.asyncresolver.Resolver(configure=False)  # no answer cache
    resolver.nameservers = [world.dns.address[0]]
    resolver.port = world.dns.address[1]
    resolver.timeout = resolver.lifetime = 2.0
    # revalidate_after=0: each lookup reads SQLite, so what is seen is the shared table.
    cache = PolicyCache(db_path, revalidate_after=0.0)
    return Process(
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
def lab(world: World, tmp_path: Path) -> Iterator[Lab]:
    clock = Clock()
    db_path = tmp_path / "state.sqlite3"
    made = Lab(world, clock, _process(world, db_path, clock), _process(world, db_path, clock))
    world.publish_policy(DOMAIN, policy_id="1")
    made.serve(500)
    yield made
    made.one.cache.close()
    made.two.cache.close()


def assert_failed_without_policy(lookup: PolicyLookup) -> None:
    assert (lookup.domain, lookup.policy, lookup.source) == (DOMAIN, None, "none")
    assert lookup.failure is TlsRptResult.STS_POLICY_FETCH_ERROR
    assert lookup.detail is not None
    assert "500" in lookup.detail


async def test_back_off_is_shared_then_one_refetch_then_success_clears_it(lab: Lab) -> None:
    # One process's failed fetch holds back the other (one request, not one per process).
    assert_failed_without_policy(await lab.one.resolver.resolve(DOMAIN))
    assert lab.fetches() == 1
    for _ in range(3):
        assert_failed_without_policy(await lab.two.resolver.resolve(DOMAIN))
        assert_failed_without_policy(await lab.one.resolver.resolve(DOMAIN))
    assert lab.fetches() == 1

    # After the back-off, the first to look fetches again; its failure holds back both.
    lab.clock.now += BACKOFF
    assert_failed_without_policy(await lab.two.resolver.resolve(DOMAIN))
    assert_failed_without_policy(await lab.one.resolver.resolve(DOMAIN))
    assert lab.fetches() == 2

    # After that one, a success: stored for both, and the back-off row is gone.
    lab.clock.now += BACKOFF
    lab.serve(200)
    fetched = await lab.one.resolver.resolve(DOMAIN)
    assert (fetched.source, fetched.policy_id, fetched.failure) == ("fetched", "1", None)
    assert lab.one.cache.fetch_state(DOMAIN, "1", lab.clock.now) is None
    cached = await lab.two.resolver.resolve(DOMAIN)
    assert (cached.source, cached.policy_id, cached.failure) == ("cached", "1", None)
    assert cached.policy is not None
    assert cached.policy.mode is Mode.ENFORCE
    assert lab.fetches() == 3


async def test_a_new_id_is_fetched_at_once_by_either(lab: Lab) -> None:
    assert_failed_without_policy(await lab.one.resolver.resolve(DOMAIN))
    lab.world.publish_policy(DOMAIN, policy_id="2")
    lab.serve(500)
    assert_failed_without_policy(await lab.two.resolver.resolve(DOMAIN))
    assert lab.fetches() == 2
    assert_failed_without_policy(await lab.one.resolver.resolve(DOMAIN))
    assert lab.fetches() == 2


@pytest.mark.parametrize("status", [500, 200])
async def test_two_processes_at_once_fetch_once(lab: Lab, status: int) -> None:
    # Whichever claims the fetch first, the other waits for it or finds what it left: one
    # request either way.
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
        assert {lookup.policy_id for lookup in lookups} == {"1"}


async def test_recheck_fetches_whatever_the_other_process_recorded(lab: Lab) -> None:
    # §5.1 step 3 (STS-74): the check before a bounce ignores the shared back-off.
    assert_failed_without_policy(await lab.one.resolver.resolve(DOMAIN))
    lab.serve(200)
    lookup = await lab.two.resolver.recheck(DOMAIN)
    assert (lookup.source, lookup.policy_id) == ("fetched", "1")
    assert lab.fetches() == 2
    assert (await lab.one.resolver.resolve(DOMAIN)).source == "cached"
