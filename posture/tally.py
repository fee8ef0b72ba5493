"""Counting off the delivery path: attempts are added in memory (no I/O, no await) and
written to the store in batches from a worker thread, as TLS report sessions are.

Owns the in-memory batch of daily counts, the set of (message, domain) waiting on their
policy (kept whole in memory: it is bounded by the queue, and read at every scrape), and
the flushing of both. `close()` writes what is left, so a clean stop loses no count; a
crash loses at most one flush interval. Knows nothing of SMTP or the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from datetime import date, timedelta

from posture.model import BINDING, Attempt, Cell, Figures, Mechanism, Waiting, utc_day
from posture.store import PostureStore

RETENTION_DAYS = 92  # daily aggregates kept: about a quarter
# A waiting entry no attempt refreshed for this long is dropped (the message was deleted,
# held or expired without us seeing it): longer than any retry step plus a lease.
DEFAULT_STALE_AFTER_S = 2 * 86400.0


def cells_of(attempt: Attempt) -> dict[Cell, Figures]:
    """The daily aggregates one attempt adds: recipients per cell, and one message for
    every cell the attempt's recipients fall in."""
    day = utc_day(attempt.at)
    counts: dict[Cell, int] = {}
    for r in attempt.recipients:
        cell = Cell(
            day,
            attempt.domain,
            r.status,
            r.counted_mechanism,
            r.tls or "",
            r.authenticated,
            r.cause.value if r.cause is not None else "",
        )
        counts[cell] = counts.get(cell, 0) + 1
    return {cell: Figures(1, n) for cell, n in counts.items()}


def waiting_after(attempt: Attempt, before: Waiting | None) -> Waiting | None:
    """The waiting entry of the attempt's (message, domain) once it is recorded: kept (with
    its first `since`) while its recipients wait on a binding policy, else ended."""
    stuck = [r for r in attempt.recipients if r.waits_on_policy]
    if not stuck:
        return None
    binding = [r for r in stuck if r.mechanism in BINDING]
    first = (binding or stuck)[0]
    return Waiting(
        key=attempt.key,
        domain=attempt.domain,
        recipients=len(stuck),
        since=before.since if before is not None else attempt.at,
        last_at=attempt.at,
        mechanism=first.mechanism,
        result=first.result,
    )


def first_kept_day(now: float, retention_days: int = RETENTION_DAYS) -> str:
    """The oldest UTC day still kept."""
    return (date.fromisoformat(utc_day(now)) - timedelta(days=retention_days - 1)).isoformat()


class PostureTally:
    """Counts attempts; `flush()` writes them (call it every few seconds)."""

    def __init__(
        self,
        store: PostureStore,
        *,
        retention_days: int = RETENTION_DAYS,
        stale_after: float = DEFAULT_STALE_AFTER_S,
        clock: Callable[[], float] = time.time,
        shared: bool = False,
    ) -> None:
        self.store = store
        self.retention_days = retention_days
        # Other writers count into the same store (the processes of one relay): a wait may
        # have begun there, so an attempt that ends one is written even when this tally
        # never saw it begin, and the figures of what waits are read from the store.
        self._shared = shared
        self.wait_began = asyncio.Event()  # set (when shared) as a wait begins or changes
        self._stale_after = stale_after
        self._clock = clock
        self._pending: dict[Cell, Figures] = {}
        self._waiting: dict[str, Waiting] = {}
        self._changed: dict[str, Waiting | None] = {}  # waiting entries not written yet
        self._flush_lock = asyncio.Lock()
        self._writing: asyncio.Future[None] | None = None  # the last write, maybe running

    def load(self) -> None:
        """Read the waiting entries a previous run left (synchronous: call at start)."""
        self._waiting = {w.key: w for w in self.store.waiting()}

    def add(self, attempt: Attempt) -> None:
        """Count one committed attempt; cheap and synchronous, safe on the delivery path."""
        for cell, figures in cells_of(attempt).items():
            self._pending[cell] = self._pending.get(cell, Figures()) + figures
        before = self._waiting.get(attempt.key)
        after = waiting_after(attempt, before)
        if after is not None:
            self._waiting[attempt.key] = after
            self._changed[attempt.key] = after
            if self._shared:
                self.wait_began.set()
        elif before is not None or self._shared:
            self._waiting.pop(attempt.key, None)
            self._changed[attempt.key] = None

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._changed)

    def waiting(self) -> list[Waiting]:
        """What waits on its policy now, oldest first (in memory: no I/O)."""
        return sorted(self._waiting.values(), key=lambda w: (w.since, w.key))

    def waiting_summary(self) -> dict[Mechanism, tuple[int, float]]:
        """Per binding mechanism: recipients waiting, and seconds the oldest has waited."""
        now = self._clock()
        out = {m: (0, 0.0) for m in BINDING}
        for w in self.store.waiting() if self._shared else self._waiting.values():
            recipients, oldest = out.get(w.mechanism, (0, 0.0))
            out[w.mechanism] = (recipients + w.recipients, max(oldest, now - w.since))
        return out

    def _expire_stale(self, now: float) -> None:
        for key, w in list(self._waiting.items()):
            if w.last_at < now - self._stale_after:
                del self._waiting[key]
                self._changed[key] = None

    async def flush(self, *, prune: bool = False) -> None:
        """Write everything counted so far (in a worker thread); with `prune`, also drop
        the days past the retention. A failed write keeps its batch for the next flush."""
        async with self._flush_lock:
            if self._writing is not None:
                # A flush cancelled at shutdown left its write running: let it end first,
                # so that the store is not closed under it (close() flushes, then closes).
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._writing)
            now = self._clock()
            self._expire_stale(now)
            cells, self._pending = self._pending, {}
            changed, self._changed = self._changed, {}
            if cells or changed:
                write = asyncio.ensure_future(asyncio.to_thread(self.store.write, cells, changed))
                write.add_done_callback(_retrieve)
                self._writing = write
                try:
                    # Shielded: a flush cancelled at shutdown still lets its thread commit
                    # (nothing is counted twice: the batch is not put back).
                    await asyncio.shield(write)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self._restore(cells, changed)
                    raise
            if prune:
                before = first_kept_day(now, self.retention_days)
                await asyncio.to_thread(self.store.prune, before, now - self._stale_after)

    def _restore(
        self, cells: Mapping[Cell, Figures], changed: Mapping[str, Waiting | None]
    ) -> None:
        for cell, figures in cells.items():
            self._pending[cell] = self._pending.get(cell, Figures()) + figures
        for key, entry in changed.items():
            self._changed.setdefault(key, entry)  # a newer change made meanwhile wins


def _retrieve(future: asyncio.Future[None]) -> None:
    # A write whose flush was cancelled is awaited by no one: consume its outcome.
    if not future.cancelled():
        future.exception()
