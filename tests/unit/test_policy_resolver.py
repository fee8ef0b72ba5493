"""The RFC 8461 §5.1 control flow of PolicyResolver (RFC-CHECKLIST 1.4), over fakes of our
own discover/fetch functions and a real SQLite cache."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.asyncresolver
import pytest

import policy.resolver as resolver_module
from policy.cache import CachedPolicy, PolicyCache
from policy.discover import Found, NotFound, TempFail
from policy.fetch import Fetched, FetchFailed
from policy.model import Mode, Policy, StsRecord, TlsRptResult
from policy.parse import parse_policy
from policy.resolver import PolicyResolver, refresh_at

P1 = parse_policy(b"version: STSv1\nmode: enforce\nmx: mx1.d.test\nmax_age: 86400\n")
P_NONE = parse_policy(b"version: STSv1\nmode: none\nmax_age: 86400\n")
P_ZERO = parse_policy(b"version: STSv1\nmode: enforce\nmx: mx1.d.test\nmax_age: 0\n")
FAIL = FetchFailed(TlsRptResult.STS_POLICY_FETCH_ERROR, "HTTP status 500")


@dataclass
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    """What DNS and the policy host answer, per domain, and what was asked."""

    txt: dict[str, Found | NotFound | TempFail] = field(default_factory=dict)
    served: dict[str, Fetched | FetchFailed] = field(default_factory=dict)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    discovered: list[str] = field(default_factory=list)
    fetched: list[tuple[str, tuple[str, ...], int, float]] = field(default_factory=list)
    address_lookups: list[str] = field(default_factory=list)

    def publish(self, domain: str, record_id: str, served: Policy | FetchFailed) -> None:
        self.txt[domain] = Found(StsRecord(record_id))
        self.served[domain] = Fetched(served) if isinstance(served, Policy) else served

    async def discover(
        self,
        domain: str,
        resolver: dns.asyncresolver.Resolver,
        timeout: float,  # noqa: ASYNC109 - mirrors policy.discover.discover
    ) -> Found | NotFound | TempFail:
        self.discovered.append(domain)
        return self.txt.get(domain, NotFound())

    async def lookup_addresses(
        self,
        host: str,
        resolver: dns.asyncresolver.Resolver,
        timeout: float,  # noqa: ASYNC109 - mirrors policy.discover.lookup_addresses
    ) -> list[str]:
        self.address_lookups.append(host)
        return ["127.0.0.10"]

    async def fetch_policy(
        self,
        domain: str,
        *,
        addresses: Sequence[str],
        ssl_context: ssl.SSLContext,
        port: int = 443,
        deadline: float = 20.0,
        max_bytes: int = 65536,
    ) -> Fetched | FetchFailed:
        self.fetched.append((domain, tuple(addresses), port, deadline))
        gate = self.gates.get(domain)
        if gate is not None:
            await gate.wait()
        return self.served.get(domain, FAIL)

    def fetch_count(self, domain: str) -> int:
        return sum(1 for entry in self.fetched if entry[0] == domain)


@dataclass
class Recorder:
    fetched: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str | None, TlsRptResult, CachedPolicy | None]] = field(
        default_factory=list
    )

    def policy_fetched(self, domain: str, policy_id: str, policy: Policy) -> None:
        self.fetched.append((domain, policy_id))

    def policy_fetch_failed(
        self,
        domain: str,
        policy_id: str | None,
        result: TlsRptResult,
        detail: str,
        cached: CachedPolicy | None,
    ) -> None:
        self.failed.append((domain, policy_id, result, cached))


@dataclass
class Env:
    world: World
    clock: Clock
    cache: PolicyCache
    observer: Recorder
    resolver: PolicyResolver

    def new_resolver(self) -> PolicyResolver:
        return _resolver(self.cache, self.clock, self.observer)


def _resolver(cache: PolicyCache, clock: Clock, observer: Recorder) -> PolicyResolver:
    return PolicyResolver(
        cache,
        dns.asyncresolver.Resolver(configure=False),
        ssl.create_default_context(),
        https_port=8443,
        fetch_deadline=3.0,
        failure_backoff=300.0,
        observer=observer,
        clock=clock,
    )


@pytest.fixture
async def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Env]:
    world = World()
    monkeypatch.setattr(resolver_module, "discover", world.discover)
    monkeypatch.setattr(resolver_module, "lookup_addresses", world.lookup_addresses)
    monkeypatch.setattr(resolver_module, "fetch_policy", world.fetch_policy)
    cache = PolicyCache(tmp_path / "state.sqlite3")
    clock, observer = Clock(), Recorder()
    yield Env(world, clock, cache, observer, _resolver(cache, clock, observer))
    cache.close()


async def test_first_fetch_is_synchronous_and_cached(env: Env) -> None:
    env.world.publish("d.test", "1", P1)
    lookup = await env.resolver.resolve("D.test.")
    assert (lookup.domain, lookup.policy, lookup.policy_id, lookup.source) == (
        "d.test",
        P1,
        "1",
        "fetched",
    )
    assert lookup.failure is None
    assert env.world.fetched == [("d.test", ("127.0.0.10",), 8443, 3.0)]
    assert env.world.address_lookups == ["mta-sts.d.test"]
    cached = env.cache.get("d.test")
    assert cached is not None
    assert cached.policy == P1
    assert cached.expires_at == env.clock.now + 86400
    assert env.observer.fetched == [("d.test", "1")]


async def test_same_id_uses_cache_without_fetch(env: Env) -> None:
    # STS-61
    env.world.publish("d.test", "1", P1)
    await env.resolver.resolve("d.test")
    for _ in range(3):
        env.clock.now += 100
        lookup = await env.resolver.resolve("d.test")
        assert lookup.source == "cached"
        assert lookup.policy == P1
    assert env.world.fetch_count("d.test") == 1
    assert len(env.world.discovered) == 4  # the TXT record is checked every time


async def test_new_id_replaces_policy(env: Env) -> None:
    # STS-62, STS-72: a fetched none policy replaces an enforce one.
    env.world.publish("d.test", "1", P1)
    await env.resolver.resolve("d.test")
    env.world.publish("d.test", "2", P_NONE)
    lookup = await env.resolver.resolve("d.test")
    assert (lookup.source, lookup.policy_id) == ("fetched", "2")
    assert lookup.policy is not None
    assert lookup.policy.mode is Mode.NONE
    cached = env.cache.get("d.test")
    assert cached is not None
    assert cached.policy_id == "2"


async def test_new_id_fetch_failure_keeps_cached_policy(env: Env) -> None:
    # STS-63, STS-73
    env.world.publish("d.test", "1", P1)
    await env.resolver.resolve("d.test")
    env.world.publish("d.test", "2", FAIL)
    lookup = await env.resolver.resolve("d.test")
    assert (lookup.source, lookup.policy, lookup.policy_id) == ("cached", P1, "1")
    assert lookup.failure is TlsRptResult.STS_POLICY_FETCH_ERROR
    assert lookup.detail == "HTTP status 500"
    ((domain, policy_id, result, cached),) = env.observer.failed
    assert (domain, policy_id, result) == ("d.test", "2", TlsRptResult.STS_POLICY_FETCH_ERROR)
    assert cached is not None
    assert cached.policy == P1
    stored = env.cache.get("d.test")
    assert stored is not None
    assert stored.policy_id == "1"


@pytest.mark.parametrize(
    "txt",
    [NotFound(), NotFound("2 records"), TempFail("SERVFAIL")],
    ids=["nxdomain", "two-records", "servfail"],
)
async def test_missing_txt_never_weakens_live_cache(env: Env, txt: NotFound | TempFail) -> None:
    # STS-64, STS-65, STS-66
    env.world.publish("d.test", "1", P1)
    await env.resolver.resolve("d.test")
    env.world.txt["d.test"] = txt
    env.clock.now += 86_000
    lookup = await env.resolver.resolve("d.test")
    assert (lookup.source, lookup.policy) == ("cached", P1)
    assert env.world.fetch_count("d.test") == 1
    assert env.cache.get("d.test") is not None


@pytest.mark.parametrize("txt", [NotFound(), TempFail("timeout")], ids=["none", "tempfail"])
async def test_no_record_no_cache_means_no_policy(env: Env, txt: NotFound | TempFail) -> None:
    # STS-02, STS-12 (fail open)
    env.world.txt["d.test"] = txt
    lookup = await env.resolver.resolve("d.test")
    assert (lookup.policy, lookup.source, lookup.failure) == (None, "none", None)
    assert env.world.fetched == []


async def test_expired_cache_and_nothing_live_means_no_policy(env: Env) -> None:
    # STS-67
    env.world.publish("d.test", "1", P1)
    await env.resolver.resolve("d.test")
    env.clock.now += 86_401
    env.world.txt["d.test"] = NotFound()
    lookup = await env.resolver.resolve("d.test")
    assert (lookup.policy, lookup.source) == (None, "none")


async def test_expired_cache_same_id_refetches(env: Env) -> None:
    env.world.publish("d.test", "1", P1)
    await env.resolver.resolve("d.test")
    env.clock.now += 86_401
    lookup = await env.resolver.resolve("d.test")
    assert lookup.source == "fetched"
    assert env.world.fetch_count("d.test") == 2


async def test_expired_cache_and_failed_fetch_means_no_policy(env: Env) -> None:
    env.world.publish("d.test", "1", P1)
    await env.resolver.resolve("d.test")
    env.clock.now += 86_401
    env.world.served["d.test"] = FAIL
    lookup = await env.resolver.resolve("d.test")
    assert (lookup.policy, lookup.source, lookup.failure) == (
        None,
        "none",
        TlsRptResult.STS_POLICY_FETCH_ERROR,
    )
    assert env.observer.failed[0][3] is None  # nothing live was cached


async def test_failure_backoff_per_id(env: Env) -> None:
    # STS-32: at most one fetch per (domain, id) per back-off period.
    failure = FetchFailed(TlsRptResult.STS_WEBPKI_INVALID, "certificate for other.test")
    env.world.publish("d.test", "1", failure)
    for _ in range(5):
        lookup = await env.resolver.resolve("d.test")
        assert lookup.failure is TlsRptResult.STS_WEBPKI_INVALID
        assert lookup.detail == "certificate for other.test"
        assert lookup.policy is None
        env.clock.now += 50
    assert env.world.fetch_count("d.test") == 1
    assert len(env.observer.failed) == 1
    env.world.publish("d.test", "2", P1)  # a new id is fetched at once
    assert (await env.resolver.resolve("d.test")).source == "fetched"
    assert env.world.fetch_count("d.test") == 2


async def test_backoff_expires(env: Env) -> None:
    env.world.publish("d.test", "1", FAIL)
    await env.resolver.resolve("d.test")
    env.clock.now += 301
    env.world.served["d.test"] = Fetched(P1)
    assert (await env.resolver.resolve("d.test")).source == "fetched"
    assert env.world.fetch_count("d.test") == 2


async def test_recheck_ignores_backoff(env: Env) -> None:
    # §5.1 step 3 before a bounce (STS-74).
    env.world.publish("d.test", "1", FAIL)
    await env.resolver.resolve("d.test")
    env.world.served["d.test"] = Fetched(P_NONE)
    lookup = await env.resolver.recheck("d.test")
    assert (lookup.source, lookup.policy) == ("fetched", P_NONE)
    assert env.world.fetch_count("d.test") == 2


async def test_max_age_zero_applies_but_is_not_cached(env: Env) -> None:
    # STS-68
    env.world.publish("d.test", "1", P_ZERO)
    for _ in range(2):
        lookup = await env.resolver.resolve("d.test")
        assert (lookup.source, lookup.policy) == ("fetched", P_ZERO)
    assert env.world.fetch_count("d.test") == 2
    assert env.cache.get("d.test") is None


async def test_cache_survives_new_resolver(env: Env) -> None:
    # STS-69: a restart with DNS blocked still applies the cached policy.
    env.world.publish("d.test", "1", P1)
    await env.resolver.resolve("d.test")
    env.world.txt["d.test"] = TempFail("blocked")
    lookup = await env.new_resolver().resolve("d.test")
    assert (lookup.source, lookup.policy) == ("cached", P1)


@pytest.mark.parametrize("domain", ["[127.0.0.11]", "", "a..test", "*.d.test", "bad_name.test"])
async def test_not_a_domain_has_no_policy(env: Env, domain: str) -> None:
    # §3.4: address literals have no policy (STS-14); no DNS query is made.
    lookup = await env.resolver.resolve(domain)
    assert (lookup.policy, lookup.source) == (None, "none")
    assert env.world.discovered == []


async def test_concurrent_resolves_share_one_lookup(env: Env) -> None:
    env.world.publish("d.test", "1", P1)
    gate = env.world.gates["d.test"] = asyncio.Event()
    tasks = [asyncio.create_task(env.resolver.resolve("d.test")) for _ in range(5)]
    await _until(lambda: env.world.fetch_count("d.test") == 1)
    gate.set()
    lookups = await asyncio.gather(*tasks)
    assert {(lk.source, lk.policy_id) for lk in lookups} == {("fetched", "1")}
    assert env.world.fetch_count("d.test") == 1
    assert env.world.discovered == ["d.test"]


async def test_cancelled_waiter_does_not_cancel_shared_lookup(env: Env) -> None:
    env.world.publish("d.test", "1", P1)
    gate = env.world.gates["d.test"] = asyncio.Event()
    first = asyncio.create_task(env.resolver.resolve("d.test"))
    second = asyncio.create_task(env.resolver.resolve("d.test"))
    await _until(lambda: env.world.fetch_count("d.test") == 1)
    first.cancel()
    gate.set()
    assert (await second).source == "fetched"
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_one_domain_never_blocks_another(env: Env) -> None:
    env.world.publish("slow.test", "1", P1)
    env.world.gates["slow.test"] = asyncio.Event()
    env.world.publish("fast.test", "1", P_NONE)
    slow = asyncio.create_task(env.resolver.resolve("slow.test"))
    await _until(lambda: env.world.fetch_count("slow.test") == 1)
    fast = await env.resolver.resolve("fast.test")
    assert fast.source == "fetched"
    assert not slow.done()
    env.world.gates["slow.test"].set()
    assert (await slow).source == "fetched"


async def test_refresh_due(env: Env) -> None:
    # STS-70, STS-72: refresh recently used policies late in life; keep last_used_at.
    for domain in ("used.test", "idle.test", "young.test"):
        env.world.publish(domain, "1", P1)
    await env.resolver.resolve("idle.test")
    await env.resolver.resolve("used.test")
    entries = [env.cache.get(d) for d in ("idle.test", "used.test")]
    env.clock.now = max(refresh_at(e) for e in entries if e is not None) + 1
    await env.resolver.resolve("used.test")  # cached: marks it used now
    await env.resolver.resolve("young.test")  # fetched now: not due
    used_at = env.clock.now
    env.clock.now += 10
    refreshed = await env.resolver.refresh_due(env.clock.now, recently_used=3600)
    assert refreshed == 1
    counts = {d: env.world.fetch_count(d) for d in ("used.test", "idle.test", "young.test")}
    assert counts == {"used.test": 2, "idle.test": 1, "young.test": 1}
    after = env.cache.get("used.test")
    assert after is not None
    assert after.fetched_at == env.clock.now
    assert after.expires_at == env.clock.now + 86_400
    assert after.last_used_at == used_at  # a refresh is not a use


async def test_refresh_not_due_does_nothing(env: Env) -> None:
    env.world.publish("d.test", "1", P1)
    await env.resolver.resolve("d.test")
    assert await env.resolver.refresh_due(env.clock.now + 100, recently_used=3600) == 0
    assert env.world.fetch_count("d.test") == 1


async def test_refresh_failure_keeps_policy_and_reports(env: Env) -> None:
    # STS-71 (the observer is told, with the cached policy), STS-73.
    env.world.publish("d.test", "1", P1)
    await env.resolver.resolve("d.test")
    entry = env.cache.get("d.test")
    assert entry is not None
    env.world.served["d.test"] = FAIL
    env.clock.now = refresh_at(entry) + 1
    assert await env.resolver.refresh_due(env.clock.now, recently_used=86_400) == 0
    ((_, _, result, cached),) = env.observer.failed
    assert result is TlsRptResult.STS_POLICY_FETCH_ERROR
    assert cached is not None
    assert cached.policy == P1
    lookup = await env.resolver.resolve("d.test")
    assert (lookup.source, lookup.policy) == ("cached", P1)


@pytest.mark.parametrize("txt", [NotFound(), TempFail("SERVFAIL")])
async def test_refresh_without_a_usable_txt_record_alerts_and_keeps_policy(
    env: Env, txt: NotFound | TempFail
) -> None:
    # STS-71 when DNS, not HTTPS, is what fails: the operator hears of it before expiry.
    env.world.publish("d.test", "1", P1)
    await env.resolver.resolve("d.test")
    entry = env.cache.get("d.test")
    assert entry is not None
    env.world.txt["d.test"] = txt
    assert await env.resolver.resolve("d.test") is not None
    assert env.observer.failed == []  # a delivery-time TXT failure is not an alert
    env.clock.now = refresh_at(entry) + 1
    assert await env.resolver.refresh_due(env.clock.now, recently_used=86_400) == 0
    ((domain, policy_id, result, cached),) = env.observer.failed
    assert (domain, policy_id, result) == ("d.test", "1", TlsRptResult.STS_POLICY_FETCH_ERROR)
    assert cached is not None
    lookup = await env.resolver.resolve("d.test")
    assert (lookup.source, lookup.policy) == ("cached", P1)


def test_refresh_at_is_late_in_life_and_capped() -> None:
    short = CachedPolicy("a.test", "1", P1, 0.0, 1000.0, 0.0)
    assert 500.0 <= refresh_at(short) <= 750.0
    year = CachedPolicy("a.test", "1", P1, 0.0, 31_557_600.0, 0.0)
    assert refresh_at(year) <= 86_400.0
    spread = {refresh_at(CachedPolicy(f"d{i}.test", "1", P1, 0.0, 1000.0, 0.0)) for i in range(20)}
    assert len(spread) > 10  # randomised per domain


async def _until(condition: Callable[[], bool]) -> None:
    """Poll a fake's state with a deadline (the fakes have no events to wait on)."""
    async with asyncio.timeout(5.0):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.001)
