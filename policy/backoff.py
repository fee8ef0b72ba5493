"""The resolver's fetch back-off (STS-32) and fetch claims, shared by every process on one
state database (and every node on a shared PostgreSQL one) through the policy cache's
`sts_fetch_backoff` table (policy/cache.py, policy/cache_postgres.py).

A failed fetch of a (domain, TXT id) is recorded for all: no process fetches that id again
before the back-off ends. A fetch about to start is claimed first; a process that finds
another's claim waits for that fetch's outcome (polling the table: SQLite has no way to
notify another process) instead of fetching too, never longer than the deadline it is
given. This process's memory holds the back-offs it recorded or read, each trusted until
it ends: answering from it needs no thread hop, and a back-off only ends early when a
fetch succeeds, whose policy the cache then serves. Nothing here says "no back-off" from
memory: before any fetch the table is read (in claim_fetch).

The table is a courtesy to policy hosts, not a security control: when the store fails, this
process backs off from its own failures only and fetches unclaimed, as a single process
would. Whether a cache that cannot be read fails a lookup is the resolver's rule.
Knows nothing about DNS, HTTPS or the §5.1 control flow.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

from policy.cache import CACHE_ERRORS, FetchBackoff, FetchClaim, PolicyStore

_POLL_FIRST: Final = 0.05  # seconds before the first look at another process's claim
_POLL_MAX: Final = 0.5  # the interval doubles up to this


class SharedBackoff:
    """Back-offs and claims by (domain, policy_id) for one resolver (domains in A-label,
    lower-case form; policy_id '' is the resolver's "no usable TXT record" key)."""

    def __init__(self, cache: PolicyStore, clock: Callable[[], float]) -> None:
        self._cache = cache
        self._clock = clock
        self._memory: dict[tuple[str, str], FetchBackoff] = {}

    def remembered(self, domain: str, policy_id: str, now: float) -> FetchBackoff | None:
        """The back-off this process recorded or read for the pair, if it stands at `now`."""
        backoff = self._memory.get((domain, policy_id))
        return backoff if backoff is not None and backoff.until > now else None

    async def active(self, domain: str, policy_id: str, now: float) -> FetchBackoff | None:
        """The back-off standing at `now`, whichever process recorded it."""
        backoff = self.remembered(domain, policy_id, now)
        if backoff is None:
            state = await self._read(domain, policy_id, now)
            if isinstance(state, FetchBackoff):
                backoff = self._remember(domain, policy_id, state, now)
        return backoff

    async def claim(
        self, domain: str, policy_id: str, now: float, until: float
    ) -> FetchBackoff | FetchClaim | None:
        """Claim the fetch until `until`: None when the caller may fetch (the claim is its
        own, or the store failed), else the back-off or the other claim standing."""
        try:
            standing = await asyncio.to_thread(
                self._cache.claim_fetch, domain, policy_id, now, until
            )
        except CACHE_ERRORS:
            return None
        if isinstance(standing, FetchBackoff):
            self._remember(domain, policy_id, standing, now)
        return standing

    async def wait(
        self, domain: str, policy_id: str, claim: FetchClaim, give_up: float
    ) -> FetchBackoff | FetchClaim | None:
        """Wait for another process's claimed fetch to end: its back-off if it failed;
        None if it succeeded, or its claim ran out (the caller looks at the cache again);
        the claim itself when `give_up` (event-loop time) comes first."""
        loop = asyncio.get_running_loop()
        delay = _POLL_FIRST
        while (remaining := give_up - loop.time()) > 0:
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, _POLL_MAX)
            now = self._clock()
            state = await self._read(domain, policy_id, now)
            if not isinstance(state, FetchClaim):
                if state is not None:
                    self._remember(domain, policy_id, state, now)
                return state
            claim = state
        return claim

    async def record(self, domain: str, policy_id: str, backoff: FetchBackoff, now: float) -> None:
        """Back off from the pair until backoff.until, in this process even if the store fails."""
        self._remember(domain, policy_id, backoff, now)
        try:
            await asyncio.to_thread(self._cache.back_off, domain, policy_id, backoff, now)
        except CACHE_ERRORS:
            return

    def forget(self, domain: str, policy_id: str) -> None:
        """Drop the remembered back-off (after the cache's put, which clears the table)."""
        self._memory.pop((domain, policy_id), None)

    async def clear(self, domain: str, policy_id: str) -> None:
        """End a back-off this process remembers, in the table too (nothing to do, and no
        write, when it remembers none)."""
        if self._memory.pop((domain, policy_id), None) is None:
            return
        await self.release(domain, policy_id)

    async def release(self, domain: str, policy_id: str) -> None:
        """Delete the pair's row, whatever it holds (a claim that ended without a store)."""
        try:
            await asyncio.to_thread(self._cache.clear_fetch_state, domain, policy_id)
        except CACHE_ERRORS:
            return

    async def _read(
        self, domain: str, policy_id: str, now: float
    ) -> FetchBackoff | FetchClaim | None:
        try:
            return await asyncio.to_thread(self._cache.fetch_state, domain, policy_id, now)
        except CACHE_ERRORS:
            return None  # as if nothing stood: the caller fetches, as one process would

    def _remember(
        self, domain: str, policy_id: str, backoff: FetchBackoff, now: float
    ) -> FetchBackoff:
        for key in [key for key, held in self._memory.items() if held.until <= now]:
            del self._memory[key]
        self._memory[(domain, policy_id)] = backoff
        return backoff
