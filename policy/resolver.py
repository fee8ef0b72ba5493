"""Which MTA-STS policy applies to a domain now: the RFC 8461 §5.1 control flow.

Owns the decisions between DNS, HTTPS and the cache: when to fetch, when a cached policy
still applies, back-off after failures, single-flight lookups and proactive refresh. The
back-off and single-flight hold across processes on one state database (backoff.py):
a failure recorded by one is honoured by all, and a fetch under way in one is awaited by
the others rather than repeated.
Knows nothing about SMTP or the queue; it reports fetches to a PolicyObserver (the relay
logs them) and answers with PolicyLookup values. Lookups never raise. A cache that cannot
be read is our own failure, never taken for "nothing cached": a lookup then answers
source "unavailable" (unless a fetch succeeds) and refresh_due raises
PolicyCacheUnavailable for its caller to report.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final, Protocol

import dns.asyncresolver
import dns.exception
import dns.name

from policy.backoff import SharedBackoff
from policy.cache import CACHE_ERRORS, CachedPolicy, FetchBackoff, PolicyStore
from policy.discover import Found, discover, forget_record, lookup_addresses
from policy.fetch import Fetched, fetch_policy
from policy.match import is_valid_hostname
from policy.model import Policy, PolicyLookup, TlsRptResult

_TOUCH_INTERVAL: Final = 60.0  # write last_used_at at most once a minute per domain
_REFRESH_PERIOD_CAP: Final = 86_400.0  # RFC 8461 §3.3: "suggested ... once per day"
_REFRESH_CONCURRENCY: Final = 8
_DETAIL_LIMIT: Final = 200  # characters of a library error kept in a lookup's detail
# The back-off key of "a refresh found no usable TXT record" (a record id is never empty).
_NO_RECORD: Final = ""
# How long a claim outlives the claimant's own deadlines (its writes to the cache): past
# that, a claimant that died or hung no longer holds the others back.
_CLAIM_MARGIN: Final = 2.0
# After waiting for another lookup's fetch that ended without a stored policy, a fetch of
# our own gets what is left of the deadline, if at least this much (else it would fail, and
# its failure would hold every process back for failure_backoff).
_MIN_FETCH_BUDGET: Final = 1.0


class PolicyCacheUnavailable(Exception):
    """refresh_due could not read the policy cache (its message is one safe line)."""


class PolicyObserver(Protocol):
    """What the resolver reports; the relay turns these into log events."""

    def policy_fetched(self, domain: str, policy_id: str, policy: Policy) -> None: ...

    def policy_fetch_failed(
        self,
        domain: str,
        policy_id: str | None,
        result: TlsRptResult,
        detail: str,
        cached: CachedPolicy | None,
    ) -> None: ...


class NullObserver:
    """A PolicyObserver that ignores everything."""

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
        pass


class _Kind(Enum):
    RESOLVE = "resolve"  # a delivery attempt: honours the failure back-off
    RECHECK = "recheck"  # before a bounce (§5.1 step 3): ignores the back-off
    REFRESH = "refresh"  # proactive: fetches even when the id is unchanged


@dataclass(frozen=True, slots=True)
class _Unreadable:
    """The cache could not be read: whether it holds a policy for the domain is unknown."""

    detail: str  # "policy cache unreadable: ..."


class PolicyResolver:
    """Resolve the policy for a recipient domain; see resolve() for the rules."""

    def __init__(
        self,
        cache: PolicyStore,
        dns_resolver: dns.asyncresolver.Resolver,
        ssl_context: ssl.SSLContext,
        *,
        https_port: int = 443,
        fetch_deadline: float = 20.0,
        dns_timeout: float = 5.0,
        failure_backoff: float = 300.0,
        observer: PolicyObserver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._cache = cache
        self._dns = dns_resolver
        self._ssl_context = ssl_context
        self._https_port = https_port
        self._fetch_deadline = fetch_deadline
        self._dns_timeout = dns_timeout
        self._failure_backoff = failure_backoff
        self._observer: PolicyObserver = observer or NullObserver()
        self._clock = clock
        self._inflight: dict[tuple[str, _Kind], asyncio.Task[PolicyLookup]] = {}
        self._backoff = SharedBackoff(cache, clock)

    async def resolve(self, domain: str) -> PolicyLookup:
        """The policy for this delivery attempt (RFC 8461 §3.3, §5.1).

        The TXT record is looked up on every call. An unexpired cached policy with the
        same id is used as is; a new id, an expired policy or an empty cache means a
        fetch, awaited within its deadline (STS-16). A failed fetch keeps an unexpired
        cached policy; a missing or failing TXT lookup never erases or weakens one
        (STS-63 to STS-66). With nothing live and nothing unexpired cached, the answer
        has no policy (§3.3 fails open). A failed (domain, id) is not refetched for
        `failure_backoff` seconds (STS-32), by any process on the state database; its
        failure is returned meanwhile. Concurrent calls for one domain share one lookup,
        and a fetch under way in another process is awaited (within the fetch deadline)
        instead of repeated.

        When the cache cannot be read, §3.3's fail-open does not apply: a cached policy
        may exist, so the answer is source "unavailable" (policy unknown) whenever the
        TXT lookup or the fetch fails. A policy fetched now is what the domain publishes
        and is used (and stored, if the cache takes the write).
        """
        return await self._shared(domain, _Kind.RESOLVE)

    async def recheck(self, domain: str) -> PolicyLookup:
        """Like resolve() but ignoring the failure back-off (and fetches under way in other
        processes): the check for a newer policy that must precede a permanent failure
        (§5.1 step 3, STS-74)."""
        return await self._shared(domain, _Kind.RECHECK)

    async def refresh_due(self, now: float, recently_used: float) -> int:
        """Refetch cached policies near their end that were used in the last
        `recently_used` seconds (§3.3, §10.2: refresh before expiry, at a randomised
        time); return how many were refreshed.

        Raises PolicyCacheUnavailable when the cache cannot be read: an unreadable cache is
        not an empty one, and the caller reports it and tries again.
        """
        try:
            entries = await asyncio.to_thread(self._cache.all)
        except CACHE_ERRORS as exc:
            raise PolicyCacheUnavailable(_unreadable(exc).detail) from exc
        due = [
            entry
            for entry in entries
            if now - entry.last_used_at <= recently_used and refresh_at(entry) <= now
        ]
        limit = asyncio.Semaphore(_REFRESH_CONCURRENCY)

        async def refresh(entry: CachedPolicy) -> bool:
            async with limit:
                lookup = await self._shared(entry.domain, _Kind.REFRESH)
            return lookup.source == "fetched"

        results = await asyncio.gather(*(refresh(entry) for entry in due))
        return sum(results)

    async def _shared(self, domain: str, kind: _Kind) -> PolicyLookup:
        name = _policy_domain(domain)
        if name is None:
            return PolicyLookup(domain, None, None, "none", detail="not a DNS domain name")
        key = (name, kind)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._lookup(name, kind), name=f"sts-{kind.value}-{name}")
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget_task(key, done))
        # shield: one caller giving up must not cancel the lookup the others await.
        return await asyncio.shield(task)

    def _forget_task(self, key: tuple[str, _Kind], task: asyncio.Task[PolicyLookup]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]

    async def _lookup(self, name: str, kind: _Kind) -> PolicyLookup:
        now = self._clock()
        read = await self._cache_get(name)
        # Unreadable: nothing is known to be cached or live, and every answer that would
        # have said "no policy" says "unavailable" instead (_failed, below).
        unreadable = read if isinstance(read, _Unreadable) else None
        cached = None if isinstance(read, _Unreadable) else read
        live = cached if cached is not None and cached.expires_at > now else None
        if kind is _Kind.RECHECK:  # §5.1 step 3: the record as published now, not cached
            forget_record(name, self._dns)
        if kind is _Kind.REFRESH:
            no_record = await self._backoff.active(name, _NO_RECORD, now)
            if no_record is not None:
                # Backing off after a refresh (here or in another process) found no record,
                # as after a failed fetch: no query and no new warning until it ends.
                return await self._use_cached(name, live, now, kind, no_record.detail)
        found = await discover(name, self._dns, self._dns_timeout)
        if not isinstance(found, Found):
            # §3.3: "absence of a usable TXT record is not by itself sufficient to remove
            # a sender's previously cached policy" (STS-64 to STS-66).
            if kind is _Kind.REFRESH and live is not None:
                # §3.3, §10.2: a refresh that cannot even find the record must still alert
                # the operator before the cached policy quietly expires (STS-71), once per
                # failure_backoff (the policy stays due, so every refresh_interval would).
                detail = f"refresh: no usable _mta-sts TXT record ({found.detail})"
                result = TlsRptResult.STS_POLICY_FETCH_ERROR
                backoff = FetchBackoff(now + self._failure_backoff, result, found.detail)
                await self._backoff.record(name, _NO_RECORD, backoff, now)
                self._observer.policy_fetch_failed(name, live.policy_id, result, detail, live)
            if unreadable is not None:
                return _unavailable(name, unreadable, None)
            return await self._use_cached(name, live, now, kind, found.detail)
        await self._backoff.clear(name, _NO_RECORD)
        record_id = found.record.id
        if live is not None and live.policy_id == record_id and kind is not _Kind.REFRESH:
            return await self._use_cached(name, live, now, kind, None)
        if kind is _Kind.RECHECK:
            deadline = self._fetch_deadline
            return await self._fetch(name, record_id, cached, live, now, kind, unreadable, deadline)
        return await self._fetch_once(name, record_id, cached, live, now, kind, unreadable)

    async def _fetch_once(
        self,
        name: str,
        record_id: str,
        cached: CachedPolicy | None,
        live: CachedPolicy | None,
        now: float,
        kind: _Kind,
        unreadable: _Unreadable | None,
    ) -> PolicyLookup:
        """Fetch (name, record_id) unless a back-off stands (STS-32) or another process is
        fetching it: then that fetch's outcome, awaited within the fetch deadline."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._fetch_deadline
        waited = False
        backoff = self._backoff.remembered(name, record_id, now)
        while backoff is None:
            # The claim lasts as long as the claimant may take: address lookup, fetch.
            until = self._clock() + self._dns_timeout + self._fetch_deadline + _CLAIM_MARGIN
            standing = await self._backoff.claim(name, record_id, now, until)
            if standing is None:
                # Ours. Another process may have stored the policy since the cache was read
                # (or the cache's memory is a few seconds behind): then there is no fetch.
                fresh = await self._stored_since(name, record_id, cached, now)
                if fresh is not None:
                    await self._backoff.release(name, record_id)
                    return await self._use_cached(name, fresh, now, kind, None)
                # A wait before it counts against the deadline (never blocked longer).
                deadline = give_up - loop.time() if waited else self._fetch_deadline
                return await self._fetch(
                    name, record_id, cached, live, now, kind, unreadable, deadline
                )
            if isinstance(standing, FetchBackoff):
                backoff = standing
                break
            waited = True
            ended = await self._backoff.wait(name, record_id, standing, give_up)
            if isinstance(ended, FetchBackoff):
                backoff = ended
                break
            now = self._clock()
            if ended is None:  # succeeded (or ran out): the policy is in the cache, if stored
                fresh = await self._stored_since(name, record_id, cached, now)
                if fresh is not None:
                    return await self._use_cached(name, fresh, now, kind, None)
            if ended is not None or give_up - loop.time() < _MIN_FETCH_BUDGET:
                detail = "another lookup's fetch of this policy did not end within the deadline"
                result = TlsRptResult.STS_POLICY_FETCH_ERROR
                return _failed(name, live, result, detail, unreadable)
        return _failed(name, live, backoff.result, backoff.detail, unreadable)

    async def _stored_since(
        self, name: str, record_id: str, cached: CachedPolicy | None, now: float
    ) -> CachedPolicy | None:
        """The live policy for `record_id` stored since `cached` was read, if any."""
        try:
            entry = await asyncio.to_thread(self._cache.get, name)  # the store, not memory
        except CACHE_ERRORS:
            return None
        if entry is None or entry.policy_id != record_id or entry.expires_at <= now:
            return None
        if cached is not None and entry.fetched_at <= cached.fetched_at:
            return None
        return entry

    async def _use_cached(
        self, name: str, live: CachedPolicy | None, now: float, kind: _Kind, detail: str | None
    ) -> PolicyLookup:
        if live is None:
            return PolicyLookup(name, None, None, "none", detail=detail)
        if kind is not _Kind.REFRESH and now - live.last_used_at >= _TOUCH_INTERVAL:
            await self._cache_call(self._cache.touch, name, now)
        return PolicyLookup(name, live.policy, live.policy_id, "cached", detail=detail)

    async def _fetch(
        self,
        name: str,
        record_id: str,
        cached: CachedPolicy | None,
        live: CachedPolicy | None,
        now: float,
        kind: _Kind,
        unreadable: _Unreadable | None,
        deadline: float,
    ) -> PolicyLookup:
        # The policy host is always mta-sts.<recipient domain>, even when _mta-sts is a
        # CNAME to a provider (§3.1, §8.2).
        addresses = await lookup_addresses(f"mta-sts.{name}", self._dns, self._dns_timeout)
        outcome = await fetch_policy(
            name,
            addresses=addresses,
            ssl_context=self._ssl_context,
            port=self._https_port,
            deadline=deadline,
        )
        if isinstance(outcome, Fetched):
            policy = outcome.policy
            fetched_at = self._clock()
            # A refresh is not a use: keep last_used_at so unused domains stop refreshing.
            used_at = cached.last_used_at if kind is _Kind.REFRESH and cached else fetched_at
            entry = CachedPolicy(
                name, record_id, policy, fetched_at, fetched_at + policy.max_age, used_at
            )
            # The put also ends the back-off or claim in the table (one transaction).
            if not await self._cache_call(self._cache.put, entry):
                await self._backoff.release(name, record_id)  # no waiter kept waiting
            self._backoff.forget(name, record_id)
            self._observer.policy_fetched(name, record_id, policy)
            return PolicyLookup(name, policy, record_id, "fetched")
        backoff = FetchBackoff(now + self._failure_backoff, outcome.result, outcome.detail)
        await self._backoff.record(name, record_id, backoff, now)  # replaces our claim
        self._observer.policy_fetch_failed(name, record_id, outcome.result, outcome.detail, live)
        return _failed(name, live, outcome.result, outcome.detail, unreadable)

    async def _cache_get(self, name: str) -> CachedPolicy | _Unreadable | None:
        # Most lookups are answered from the cache's memory: no thread hop per delivery.
        remembered = self._cache.remembered(name)
        if remembered is not None:
            return remembered.entry
        try:
            return await asyncio.to_thread(self._cache.get, name)
        except CACHE_ERRORS as exc:
            # Not "nothing cached": an enforce policy may sit behind the error, and taking
            # it for absent would deliver that domain's mail opportunistically.
            return _unreadable(exc)

    async def _cache_call(self, method: Callable[..., object], *args: object) -> bool:
        # A cache write that fails (disk full, lock timeout) must not fail the delivery.
        try:
            await asyncio.to_thread(method, *args)
        except CACHE_ERRORS:
            return False
        return True


def _failed(
    name: str,
    live: CachedPolicy | None,
    result: TlsRptResult,
    detail: str,
    unreadable: _Unreadable | None,
) -> PolicyLookup:
    # §3.3: an unexpired cached policy still applies when the fetch fails (STS-63).
    if live is not None:
        return PolicyLookup(name, live.policy, live.policy_id, "cached", result, detail)
    if unreadable is not None:
        return _unavailable(name, unreadable, result)
    return PolicyLookup(name, None, None, "none", result, detail)


def _unavailable(name: str, unreadable: _Unreadable, failure: TlsRptResult | None) -> PolicyLookup:
    # The fetch failure (if any) is kept as `failure`; `detail` names the cache, the cause
    # of not knowing (the fetch failure itself reaches the observer).
    return PolicyLookup(name, None, None, "unavailable", failure, unreadable.detail)


def _unreadable(exc: Exception) -> _Unreadable:
    """The error as one safe line: no line breaks or control characters, bounded length."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    if len(text) > _DETAIL_LIMIT:
        text = text[: _DETAIL_LIMIT - 3] + "..."
    return _Unreadable(f"policy cache unreadable: {text}")


def refresh_at(entry: CachedPolicy) -> float:
    """When `entry` becomes due for a proactive refresh.

    Between 50% and 75% of its lifetime (capped at a day), at a point fixed per domain and
    fetch so that many policies fetched together do not refresh together.
    """
    seed = hashlib.sha256(f"{entry.domain}|{entry.fetched_at!r}".encode()).digest()
    fraction = 0.5 + 0.25 * (int.from_bytes(seed[:4], "big") / 2**32)
    lifetime = min(entry.expires_at - entry.fetched_at, _REFRESH_PERIOD_CAP)
    return entry.fetched_at + lifetime * fraction


def _policy_domain(domain: str) -> str | None:
    """The A-label form of `domain`, or None when it cannot have a policy (an address
    literal, §3.4, or not a host name)."""
    name = domain.strip().lower().removesuffix(".")
    if not name.isascii():
        try:
            name = dns.name.from_text(name).to_text(omit_final_dot=True).lower()
        except dns.exception.DNSException:
            return None
    return name if is_valid_hostname(name) else None
