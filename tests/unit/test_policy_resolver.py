"""The RFC 8461 §5.1 control flow of PolicyResolver (RFC-CHECKLIST 1.4), over fakes of our
own discover/fetch functions and a real SQLite cache."""

from __future__ import annotations

import asyncio
import sqlite3
import ssl
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.asyncresolver
import pytest

import policy.resolver as resolver_module
from policy.cache import CachedPolicy, FetchBackoff, FetchClaim, PolicyCache
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


# -- two processes on one state database (STS-32 across `serve.processes`) ----------------


class WatchedCache(PolicyCache):
    """The real cache, counting the reads of fetch state that a waiting resolver polls."""

    polls = 0

    def fetch_state(
        self, domain: str, policy_id: str, now: float
    ) -> FetchBackoff | FetchClaim | None:
        self.polls += 1
        return super().fetch_state(domain, policy_id, now)


@dataclass
class Process:
    """A second relay process: its own cache connection and resolver on the same file."""

    cache: WatchedCache
    observer: Recorder
    resolver: PolicyResolver


@pytest.fixture
def other(env: Env, tmp_path: Path) -> Iterator[Process]:
    cache = WatchedCache(tmp_path / "state.sqlite3")
    observer = Recorder()
    yield Process(cache, observer, _resolver(cache, env.clock, observer))
    cache.close()


async def test_a_failure_in_one_process_is_honoured_by_another(env: Env, other: Process) -> None:
    failure = FetchFailed(TlsRptResult.STS_WEBPKI_INVALID, "certificate for other.test")
    env.world.publish("d.test", "1", failure)
    first = await env.resolver.resolve("d.test")
    second = await other.resolver.resolve("d.test")
    for lookup in (first, second):
        assert (lookup.policy, lookup.source) == (None, "none")
        assert (lookup.failure, lookup.detail) == (failure.result, failure.detail)
    assert env.world.fetch_count("d.test") == 1
    assert len(env.observer.failed) == 1
    assert other.observer.failed == []  # the failure is reported once, by who fetched
    env.world.publish("d.test", "2", P1)  # a new id is fetched at once, by either
    assert (await other.resolver.resolve("d.test")).source == "fetched"
    assert env.world.fetch_count("d.test") == 2


async def test_after_the_back_off_one_process_fetches_again(env: Env, other: Process) -> None:
    env.world.publish("d.test", "1", FAIL)
    await env.resolver.resolve("d.test")
    env.clock.now += 301
    await other.resolver.resolve("d.test")  # fetches, fails again: a new back-off for all
    assert env.world.fetch_count("d.test") == 2
    lookup = await env.resolver.resolve("d.test")
    assert lookup.failure is TlsRptResult.STS_POLICY_FETCH_ERROR
    assert env.world.fetch_count("d.test") == 2
    assert (len(env.observer.failed), len(other.observer.failed)) == (1, 1)


async def test_a_success_ends_the_back_off_for_all(env: Env, other: Process) -> None:
    env.world.publish("d.test", "1", FAIL)
    await env.resolver.resolve("d.test")
    env.clock.now += 301
    env.world.served["d.test"] = Fetched(P1)
    assert (await other.resolver.resolve("d.test")).source == "fetched"
    assert env.cache.fetch_state("d.test", "1", env.clock.now) is None
    # The first process's cache still remembers "nothing cached" (its memory trusts a read
    # for a few seconds); the back-off has ended, and its claim finds the stored policy.
    lookup = await env.resolver.resolve("d.test")
    assert (lookup.source, lookup.policy, lookup.failure) == ("cached", P1, None)
    assert env.world.fetch_count("d.test") == 2


async def test_recheck_ignores_another_process_back_off(env: Env, other: Process) -> None:
    # §5.1 step 3 (STS-74): before a bounce, fetch whatever any process recorded.
    env.world.publish("d.test", "1", FAIL)
    await env.resolver.resolve("d.test")
    env.world.served["d.test"] = Fetched(P_NONE)
    lookup = await other.resolver.recheck("d.test")
    assert (lookup.source, lookup.policy) == ("fetched", P_NONE)
    assert env.world.fetch_count("d.test") == 2
    assert env.cache.fetch_state("d.test", "1", env.clock.now) is None


@pytest.mark.parametrize("served", [P1, FAIL], ids=["fetched", "failed"])
async def test_one_fetch_when_two_processes_resolve_at_once(
    env: Env, other: Process, served: Policy | FetchFailed
) -> None:
    # Single-flight across processes: the second waits for the first one's fetch.
    env.world.publish("d.test", "1", served)
    gate = env.world.gates["d.test"] = asyncio.Event()
    first = asyncio.create_task(env.resolver.resolve("d.test"))
    await _until(lambda: env.world.fetch_count("d.test") == 1)
    second = asyncio.create_task(other.resolver.resolve("d.test"))
    await _until(lambda: other.cache.polls > 0)  # waiting for the first one's fetch
    gate.set()
    lookups = await asyncio.gather(first, second)
    assert env.world.fetch_count("d.test") == 1
    if served is FAIL:
        assert {(lk.source, lk.failure, lk.detail) for lk in lookups} == {
            ("none", FAIL.result, FAIL.detail)
        }
        assert (len(env.observer.failed), other.observer.failed) == (1, [])
    else:
        assert [(lk.source, lk.policy) for lk in lookups] == [("fetched", P1), ("cached", P1)]


async def test_waiting_for_another_process_ends_with_the_fetch_deadline(
    env: Env, other: Process
) -> None:
    # A fetch under way elsewhere that outlasts this resolver's own fetch deadline: the
    # delivery is not held longer than a fetch of its own would hold it, nor fetches twice.
    env.world.publish("d.test", "1", P1)
    gate = env.world.gates["d.test"] = asyncio.Event()
    first = asyncio.create_task(env.resolver.resolve("d.test"))
    await _until(lambda: env.world.fetch_count("d.test") == 1)
    impatient = PolicyResolver(
        other.cache,
        dns.asyncresolver.Resolver(configure=False),
        ssl.create_default_context(),
        fetch_deadline=0.2,
        observer=other.observer,
        clock=env.clock,
    )
    lookup = await impatient.resolve("d.test")
    assert (lookup.policy, lookup.source) == (None, "none")
    assert lookup.failure is TlsRptResult.STS_POLICY_FETCH_ERROR
    assert lookup.detail is not None
    assert "another lookup" in lookup.detail
    assert env.world.fetch_count("d.test") == 1
    assert other.observer.failed == []
    gate.set()
    assert (await first).source == "fetched"


async def test_a_claim_left_by_a_dead_process_runs_out(env: Env, other: Process) -> None:
    env.world.publish("d.test", "1", P1)
    now = env.clock.now
    assert other.cache.claim_fetch("d.test", "1", now, now + 30) is None  # then it died
    env.clock.now += 30
    assert (await env.resolver.resolve("d.test")).source == "fetched"
    assert env.world.fetch_count("d.test") == 1


async def test_a_policy_stored_meanwhile_is_not_fetched_again(env: Env, other: Process) -> None:
    # The first process read the cache (nothing), the other stored the policy before the
    # first claimed the fetch: the claim finds the policy, no second request.
    env.world.publish("d.test", "1", P1)
    assert env.cache.get("d.test") is None  # remembered by the first process as "nothing"
    assert (await other.resolver.resolve("d.test")).source == "fetched"
    lookup = await env.resolver.resolve("d.test")
    assert (lookup.source, lookup.policy) == ("cached", P1)
    assert env.world.fetch_count("d.test") == 1
    assert env.cache.fetch_state("d.test", "1", env.clock.now) is None  # claim released


async def test_refresh_without_a_record_alerts_once_for_all(env: Env, other: Process) -> None:
    # STS-71: each process runs refreshes; one warning per failure_backoff, not one each.
    env.world.publish("d.test", "1", P1)
    await env.resolver.resolve("d.test")
    entry = env.cache.get("d.test")
    assert entry is not None
    env.world.txt["d.test"] = NotFound()
    env.clock.now = refresh_at(entry) + 1
    assert await env.resolver.refresh_due(env.clock.now, recently_used=86_400) == 0
    discovered = len(env.world.discovered)
    assert await other.resolver.refresh_due(env.clock.now, recently_used=86_400) == 0
    assert len(env.world.discovered) == discovered  # no query either
    assert (len(env.observer.failed), other.observer.failed) == (1, [])


async def test_a_claim_that_cannot_be_written_does_not_stop_the_fetch(
    env: Env, tmp_path: Path
) -> None:
    # The write lock is held elsewhere: the fetch goes ahead unclaimed, as one process's.
    env.world.publish("d.test", "1", P1)
    gate = env.world.gates["d.test"] = asyncio.Event()
    holder = sqlite3.connect(tmp_path / "state.sqlite3", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        lookup = asyncio.create_task(env.resolver.resolve("d.test"))
        await _until(lambda: env.world.fetch_count("d.test") == 1)
        holder.execute("ROLLBACK")  # so that the policy can be stored
    finally:
        holder.close()
    gate.set()
    assert (await lookup).source == "fetched"
    assert env.cache.fetch_state("d.test", "1", env.clock.now) is None
