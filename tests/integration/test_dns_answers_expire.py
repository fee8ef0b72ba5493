"""DNS answers are not trusted for ever (issue 11, item 7), against the lab DNS server.

- The relay's DNS cache keeps an answer at most `dns.max_ttl` seconds, whatever its TTL:
  an answer with TTL 2^31-1 (a spoofer's favourite) is asked again after the cap, and a
  change made meanwhile is seen.
- A proactive policy refresh that finds no `_mta-sts` TXT record backs off like a failed
  fetch: one warning, then neither a query nor a warning until `policy.failure_backoff`
  has passed, instead of both at every refresh interval.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.resolver

from policy.cache import CachedPolicy, PolicyCache
from policy.model import Policy, TlsRptResult
from policy.resolver import PolicyResolver, refresh_at
from policy.webpki import client_context
from relay.app import make_resolver
from relay.delivery.dns_cache import DEFAULT_MAX_TTL, TtlCache
from tests.support.world import World

HUGE_TTL = 2**31 - 1  # RFC 2181 §8: the largest TTL there is (68 years)


def _mx(answer: dns.resolver.Answer) -> list[str]:
    return [r.exchange.to_text() for r in answer]


async def test_an_answer_with_a_huge_ttl_is_asked_again_after_the_cap(world: World) -> None:
    resolver = make_resolver((world.dns.nameserver,), 2.0, max_ttl=1.0)
    world.dns.add("spoofed.test", "MX", "10 mx-a.spoofed.test.", ttl=HUGE_TTL)
    assert _mx(await resolver.resolve("spoofed.test.", "MX")) == ["mx-a.spoofed.test."]

    world.dns.remove("spoofed.test", "MX")
    world.dns.add("spoofed.test", "MX", "10 mx-b.spoofed.test.", ttl=HUGE_TTL)
    # Within the cap the cached answer stands (the cache still works) ...
    assert _mx(await resolver.resolve("spoofed.test.", "MX")) == ["mx-a.spoofed.test."]
    assert world.dns.queries.count(("spoofed.test", "MX")) == 1
    await asyncio.sleep(1.2)
    # ... and after it the change is seen.
    assert _mx(await resolver.resolve("spoofed.test.", "MX")) == ["mx-b.spoofed.test."]
    assert world.dns.queries.count(("spoofed.test", "MX")) == 2


async def test_the_default_cap_is_an_hour(world: World) -> None:
    resolver = make_resolver((world.dns.nameserver,), 2.0)
    assert isinstance(resolver.cache, TtlCache)
    assert resolver.cache.max_ttl == DEFAULT_MAX_TTL == 3600
    world.dns.txt("_mta-sts.huge.test", "v=STSv1; id=1", ttl=HUGE_TTL)
    answer = await resolver.resolve("_mta-sts.huge.test.", "TXT")
    assert answer.expiration - time.time() <= 3600
    cached = resolver.cache.get((answer.qname, answer.rdtype, answer.rdclass))
    assert cached is not None
    assert cached.expiration - time.time() <= 3600


@dataclass
class Clock:
    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now


@dataclass
class Warnings:
    """The resolver's observer: what it would log as policy_fetch_failed."""

    failed: list[tuple[str, str | None, TlsRptResult]] = field(default_factory=list)

    def policy_fetched(self, domain: str, policy_id: str, policy: Policy) -> None:
        pass

    def policy_fetch_failed(
        self,
        domain: str,
        policy_id: str | None,
        result: TlsRptResult,
        detail: str,
        cached: CachedPolicy | None,
    ) -> None:
        self.failed.append((domain, policy_id, result))


async def test_a_refresh_without_txt_record_backs_off_instead_of_warning_every_interval(
    world: World, tmp_path: Path
) -> None:
    domain = "txt-gone.test"
    world.publish_policy(domain, policy_id="1")
    clock, warnings = Clock(), Warnings()
    cache = PolicyCache(tmp_path / "policies.sqlite3")
    policies = PolicyResolver(
        cache,
        make_resolver((world.dns.nameserver,), 2.0),
        client_context(str(world.pki.ca_file)),
        https_port=world.policy_server.port,
        dns_timeout=2.0,
        failure_backoff=300.0,
        observer=warnings,
        clock=clock,
    )
    try:
        assert (await policies.resolve(domain)).source == "fetched"
        world.dns.remove(f"_mta-sts.{domain}", "TXT")  # the record is gone, the policy cached
        entry = cache.get(domain)
        assert entry is not None
        clock.now = refresh_at(entry) + 1
        queries_before = world.dns.queries.count((f"_mta-sts.{domain}", "TXT"))

        for _ in range(5):  # five refresh intervals of 60 s: the policy stays due
            assert await policies.refresh_due(clock.now, recently_used=7 * 86400) == 0
            clock.now += 60
        assert warnings.failed == [(domain, "1", TlsRptResult.STS_POLICY_FETCH_ERROR)]
        assert world.dns.queries.count((f"_mta-sts.{domain}", "TXT")) == queries_before + 1

        clock.now += 300  # past policy.failure_backoff: looked up again, warned again
        await policies.refresh_due(clock.now, recently_used=7 * 86400)
        assert len(warnings.failed) == 2
        assert world.dns.queries.count((f"_mta-sts.{domain}", "TXT")) == queries_before + 2

        # Deliveries still look the record up every time and keep the cached policy.
        lookup = await policies.resolve(domain)
        assert (lookup.source, lookup.policy_id) == ("cached", "1")
    finally:
        cache.close()
