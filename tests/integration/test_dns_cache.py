"""The relay's DNS answer cache against the lab DNS server: answers are reused for their
TTL and no longer; negative answers without an SOA and SERVFAIL are never kept; the check
for a newer MTA-STS policy before a bounce (RFC 8461 §5.1 step 3, STS-74) asks DNS again.
"""

from __future__ import annotations

from pathlib import Path

import dns.asyncresolver
import dns.resolver
import pytest

from policy.cache import PolicyCache
from policy.resolver import PolicyResolver
from policy.webpki import client_context
from relay.app import make_resolver
from relay.delivery.dns_cache import TtlCache
from tests.support.world import World


def _count(world: World, name: str, rtype: str) -> int:
    return world.dns.queries.count((name, rtype))


def _resolver(world: World) -> dns.asyncresolver.Resolver:
    resolver = make_resolver((world.dns.nameserver,), 2.0)
    assert isinstance(resolver.cache, TtlCache)
    return resolver


async def test_answer_is_reused_within_its_ttl(world: World) -> None:
    resolver = _resolver(world)
    world.dns.add("cached.test", "MX", "10 mx1.cached.test.", ttl=300)
    for _ in range(3):
        answer = await resolver.resolve("cached.test.", "MX")
        assert [r.exchange.to_text() for r in answer] == ["mx1.cached.test."]
    assert _count(world, "cached.test", "MX") == 1


async def test_ttl_zero_is_never_cached_and_changes_show_at_once(world: World) -> None:
    resolver = _resolver(world)
    world.dns.add("fresh.test", "A", "127.0.0.7", ttl=0)
    assert [r.address for r in await resolver.resolve("fresh.test.", "A")] == ["127.0.0.7"]
    world.dns.remove("fresh.test", "A")
    world.dns.add("fresh.test", "A", "127.0.0.8", ttl=0)
    assert [r.address for r in await resolver.resolve("fresh.test.", "A")] == ["127.0.0.8"]
    assert _count(world, "fresh.test", "A") == 2


async def test_negative_answers_without_soa_are_not_cached(world: World) -> None:
    # RFC 2308 §5: no SOA, no negative TTL (dnspython would guess 300 s).
    resolver = _resolver(world)
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("later.test.", "A")
    world.dns.add("other.later.test", "A", "127.0.0.9", ttl=300)  # now the name exists
    with pytest.raises(dns.resolver.NoAnswer):
        await resolver.resolve("later.test.", "A")
    world.dns.add("later.test", "A", "127.0.0.9", ttl=300)
    assert [r.address for r in await resolver.resolve("later.test.", "A")] == ["127.0.0.9"]
    assert _count(world, "later.test", "A") == 3


async def test_servfail_is_not_cached(world: World) -> None:
    resolver = _resolver(world)
    world.dns.add("flaky.test", "MX", "10 mx1.flaky.test.", ttl=300)
    world.dns.fail("flaky.test", "MX", "servfail")
    with pytest.raises(dns.resolver.NoNameservers):
        await resolver.resolve("flaky.test.", "MX", lifetime=2.0)
    world.dns.clear_failure("flaky.test", "MX")
    assert len(await resolver.resolve("flaky.test.", "MX")) == 1


async def test_policy_recheck_before_a_bounce_bypasses_the_cache(
    world: World, tmp_path: Path
) -> None:
    # STS-62 with realistic TTLs: an ordinary lookup may keep using the cached TXT id for
    # its TTL; the §5.1 step 3 check must see the new id at once (STS-74).
    world.dns.default_ttl = 300
    world.publish_policy("recheck.test", policy_id="1")
    policies = PolicyResolver(
        PolicyCache(tmp_path / "policies.sqlite3"),
        _resolver(world),
        client_context(str(world.pki.ca_file)),
        https_port=world.policy_server.port,
        dns_timeout=2.0,
    )
    assert (await policies.resolve("recheck.test")).policy_id == "1"
    world.publish_policy("recheck.test", policy_id="2", mx=["mx2.recheck.test"])
    assert (await policies.resolve("recheck.test")).policy_id == "1"  # TXT still cached
    rechecked = await policies.recheck("recheck.test")
    assert rechecked.policy_id == "2"
    assert rechecked.policy is not None
    assert rechecked.policy.mx == ("mx2.recheck.test",)
    assert _count(world, "_mta-sts.recheck.test", "TXT") == 2
