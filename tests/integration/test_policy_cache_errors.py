"""No failing open on our own errors (issue 10, item 5): a policy cache that cannot be read
is not an empty one. PolicyResolver against the lab's real DNS server and HTTPS policy host,
with a real SQLite cache made unreadable for real: its table renamed away through a second
connection (and back again), or the cache's own connection closed. No mocks of sqlite3.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.asyncresolver
import pytest

from policy.cache import REVALIDATE_AFTER_S, PolicyCache
from policy.model import Mode, PolicyLookup, TlsRptResult
from policy.resolver import PolicyCacheUnavailable, PolicyResolver
from policy.webpki import client_context
from tests.support.world import World

DOMAIN = "enforce-cached.test"
TXT_NAME = f"_mta-sts.{DOMAIN}"
HIDDEN = "sts_policies_hidden"


class Monotonic:
    """The cache's monotonic clock, moved by hand (how long a remembered entry is trusted)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Lab:
    world: World
    db_path: Path
    cache: PolicyCache
    resolver: PolicyResolver

    def hide_table(self) -> None:
        """Make every read of the cache fail: `no such table: sts_policies`."""
        _alter(self.db_path, f"ALTER TABLE sts_policies RENAME TO {HIDDEN}")

    def restore_table(self) -> None:
        _alter(self.db_path, f"ALTER TABLE {HIDDEN} RENAME TO sts_policies")

    def close_connection(self) -> None:
        """Make every call on the cache fail: `Cannot operate on a closed database.`"""
        self.cache.close()

    def fetches(self) -> int:
        return len(self.world.policy_server.requests_for(DOMAIN))


def _alter(db_path: Path, statement: str) -> None:
    # A second connection, as another process (or a damaged disk) would change the file.
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute(statement)
    finally:
        other.close()


def _dns(world: World) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)  # no answer cache
    resolver.nameservers = [world.dns.address[0]]
    resolver.port = world.dns.address[1]
    resolver.timeout = resolver.lifetime = 2.0
    return resolver


LabMaker = Callable[..., Lab]


@pytest.fixture
def make_lab(world: World, tmp_path: Path) -> Iterator[LabMaker]:
    """Builds Labs on one state file; closes their caches at the end."""
    made: list[Lab] = []

    def make(revalidate_after: float = 0.0, monotonic: Callable[[], float] = time.monotonic) -> Lab:
        lab = _lab(world, tmp_path / "state.sqlite3", revalidate_after, monotonic)
        made.append(lab)
        return lab

    yield make
    for lab in made:
        lab.cache.close()  # a second close (connection-closed tests) is harmless


def _lab(
    world: World, db_path: Path, revalidate_after: float, monotonic: Callable[[], float]
) -> Lab:
    # revalidate_after=0 by default here: every lookup reads SQLite (in production a
    # remembered entry answers for REVALIDATE_AFTER_S first; see the test of that window).
    cache = PolicyCache(db_path, revalidate_after=revalidate_after, monotonic=monotonic)
    resolver = PolicyResolver(
        cache,
        _dns(world),
        client_context(str(world.pki.ca_file)),
        https_port=world.policy_server.port,
        fetch_deadline=3.0,
        dns_timeout=2.0,
    )
    return Lab(world, db_path, cache, resolver)


@pytest.fixture
async def lab(world: World, make_lab: LabMaker) -> Lab:
    """An enforce policy for DOMAIN fetched and cached through a healthy cache."""
    made = make_lab()
    world.publish_policy(DOMAIN, mode="enforce", policy_id="1")
    first = await made.resolver.resolve(DOMAIN)
    assert (first.source, first.policy_id) == ("fetched", "1")
    assert first.policy is not None
    assert first.policy.mode is Mode.ENFORCE
    return made


Breakage = Callable[[Lab], None]
BREAKAGES: dict[str, Breakage] = {
    "table-renamed": Lab.hide_table,
    "connection-closed": Lab.close_connection,
}


def assert_unavailable(lookup: PolicyLookup, failure: TlsRptResult | None = None) -> None:
    assert lookup.unavailable, lookup
    assert (lookup.domain, lookup.policy, lookup.policy_id, lookup.source) == (
        DOMAIN,
        None,
        None,
        "unavailable",
    )
    assert lookup.failure is failure
    assert lookup.detail is not None
    assert lookup.detail.startswith("policy cache unreadable: "), lookup.detail
    assert "\n" not in lookup.detail
    assert "\r" not in lookup.detail


def assert_cached_enforce(lookup: PolicyLookup) -> None:
    assert not lookup.unavailable
    assert (lookup.source, lookup.policy_id) == ("cached", "1")
    assert lookup.policy is not None
    assert lookup.policy.mode is Mode.ENFORCE


def fail_txt(world: World, how: str) -> None:
    if how == "absent":
        world.dns.remove(TXT_NAME, "TXT")
    else:
        world.dns.fail(TXT_NAME, "TXT", "servfail")


# -- TXT lookup fails -----------------------------------------------------------------------


@pytest.mark.parametrize("breakage", BREAKAGES)
@pytest.mark.parametrize("txt", ["absent", "servfail"])
async def test_txt_failure_with_unreadable_cache_is_unavailable(
    lab: Lab, breakage: str, txt: str
) -> None:
    # Before the fix: "nothing cached" + no TXT = no policy (source "none"): fail open.
    BREAKAGES[breakage](lab)
    fail_txt(lab.world, txt)
    assert_unavailable(await lab.resolver.resolve(DOMAIN))
    assert_unavailable(await lab.resolver.recheck(DOMAIN))
    assert lab.fetches() == 1  # only the fixture's


@pytest.mark.parametrize("txt", ["absent", "servfail"])
async def test_txt_failure_with_healthy_cache_keeps_enforce(lab: Lab, txt: str) -> None:
    # As before: a missing or failing TXT record never weakens a cached policy (STS-64..66).
    fail_txt(lab.world, txt)
    assert_cached_enforce(await lab.resolver.resolve(DOMAIN))
    assert_cached_enforce(await lab.resolver.recheck(DOMAIN))


@pytest.mark.parametrize("txt", ["absent", "servfail"])
async def test_txt_failure_with_nothing_cached_is_still_no_policy(
    world: World, make_lab: LabMaker, txt: str
) -> None:
    # As before: a readable, empty cache and no TXT record: RFC 8461 §3.3 fails open.
    lab = make_lab()
    fail_txt(world, txt)
    lookup = await lab.resolver.resolve(DOMAIN)
    assert (lookup.policy, lookup.source, lookup.unavailable) == (None, "none", False)


# -- TXT answers, the fetch fails ---------------------------------------------------------


@pytest.mark.parametrize("breakage", BREAKAGES)
@pytest.mark.parametrize("record_id", ["1", "2"], ids=["same-id", "new-id"])
async def test_fetch_failure_with_unreadable_cache_is_unavailable(
    lab: Lab, breakage: str, record_id: str
) -> None:
    BREAKAGES[breakage](lab)
    lab.world.dns.remove(TXT_NAME, "TXT")
    lab.world.dns.txt(TXT_NAME, f"v=STSv1; id={record_id}")
    lab.world.policy_server.misbehave(DOMAIN, "refuse")  # closed before TLS
    fetch_error = TlsRptResult.STS_POLICY_FETCH_ERROR
    before = lab.world.policy_server.connections
    assert_unavailable(await lab.resolver.resolve(DOMAIN), fetch_error)
    assert lab.world.policy_server.connections > before  # it did try to fetch
    # Within the failure back-off the failure is answered without a fetch: still unknown.
    connections = lab.world.policy_server.connections
    assert_unavailable(await lab.resolver.resolve(DOMAIN), fetch_error)
    assert lab.world.policy_server.connections == connections
    # The check before a bounce ignores the back-off and fetches again: still unknown.
    assert_unavailable(await lab.resolver.recheck(DOMAIN), fetch_error)
    assert lab.world.policy_server.connections > connections


async def test_fetch_failure_with_healthy_cache_keeps_enforce(lab: Lab) -> None:
    # As before: STS-63, the cached policy applies and the failure is reported with it.
    lab.world.publish_policy(DOMAIN, mode="enforce", policy_id="2")
    lab.world.policy_server.misbehave(DOMAIN, "refuse")
    lookup = await lab.resolver.resolve(DOMAIN)
    assert_cached_enforce(lookup)
    assert lookup.failure is TlsRptResult.STS_POLICY_FETCH_ERROR


# -- TXT answers, the fetch succeeds ------------------------------------------------------


@pytest.mark.parametrize("breakage", BREAKAGES)
async def test_successful_fetch_with_unreadable_cache_is_used(lab: Lab, breakage: str) -> None:
    # What the domain publishes now may be used even though the cache cannot say what it
    # held; the cache write fails too, and that fails nothing.
    BREAKAGES[breakage](lab)
    lab.world.publish_policy(DOMAIN, mode="testing", policy_id="2")
    lookup = await lab.resolver.resolve(DOMAIN)
    assert (lookup.source, lookup.policy_id, lookup.failure, lookup.unavailable) == (
        "fetched",
        "2",
        None,
        False,
    )
    assert lookup.policy is not None
    assert lookup.policy.mode is Mode.TESTING
    assert lab.fetches() == 2


# -- recovery, the remembered window, refresh ---------------------------------------------


async def test_cache_readable_again_answers_from_cache(lab: Lab) -> None:
    lab.hide_table()
    fail_txt(lab.world, "servfail")
    assert_unavailable(await lab.resolver.resolve(DOMAIN))
    lab.restore_table()
    assert_cached_enforce(await lab.resolver.resolve(DOMAIN))
    assert lab.fetches() == 1


async def test_remembered_policy_answers_until_revalidation_then_unavailable(
    world: World, make_lab: LabMaker
) -> None:
    # The production cache trusts what it last read for REVALIDATE_AFTER_S seconds; after
    # that it reads SQLite again, and a failing read is then "unavailable", never "none".
    clock = Monotonic()
    lab = make_lab(revalidate_after=REVALIDATE_AFTER_S, monotonic=clock)
    world.publish_policy(DOMAIN, mode="enforce", policy_id="1")
    assert (await lab.resolver.resolve(DOMAIN)).source == "fetched"
    lab.hide_table()
    fail_txt(world, "servfail")
    assert_cached_enforce(await lab.resolver.resolve(DOMAIN))  # from memory
    clock.now += REVALIDATE_AFTER_S
    assert_unavailable(await lab.resolver.resolve(DOMAIN))


@pytest.mark.parametrize("breakage", BREAKAGES)
async def test_refresh_due_raises_on_unreadable_cache(lab: Lab, breakage: str) -> None:
    assert await lab.resolver.refresh_due(0.0, recently_used=1.0) == 0  # healthy: nothing due
    BREAKAGES[breakage](lab)
    with pytest.raises(PolicyCacheUnavailable, match=r"^policy cache unreadable: \w+Error: "):
        await lab.resolver.refresh_due(0.0, recently_used=1.0)
