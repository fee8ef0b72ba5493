"""The TLS posture report wired in: committed delivery outcomes become posture figures.

Owns the translation of one committed attempt (a lease and its `LeaseResult`) into the
`posture` package's values, the hook the scheduler calls once an attempt's outcomes are
committed (in memory only: no I/O on the delivery path), the flush loop, and the choice
of storage engine. The counting, storage and report live in `posture`.

Classification of each recipient:
- mechanism: what decided for the MX that decided the recipient (`TlsDecision.source_for`):
  `dane`, `sts` split by the published mode into `sts-enforce`/`sts-testing`, `override`,
  `tls-required-no`; `none` is `opportunistic` (`plaintext` when it went in the clear);
  `undecided` when the attempt ended before any decision (cut off, internal error);
- authenticated: TLS was up and the certificate validated (WebPKI or DANE);
- cause of a deferral or bounce: `policy` when it carries an RFC 8460 result type (a TLS
  or policy failure that the requirement in force did not let pass), else `other`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import assert_never

from mailqueue.model import Lease
from policy.model import Mode
from posture.model import Attempt, Cause, Mechanism, RecipientFigure, Status
from posture.store import PostureStore, SqlitePostureStore
from posture.tally import DEFAULT_STALE_AFTER_S, PostureTally
from relay.config import Config
from relay.delivery.decision import TlsDecision, TlsPolicySource
from relay.delivery.outcome import Bounced, Deferred, Delivered, Hop, Outcome
from relay.delivery.pipeline import LeaseResult
from relay.events import EventLog
from relay.metrics import Metrics

FLUSH_INTERVAL_S = 5.0  # how often counted attempts are written
PRUNE_INTERVAL_S = 3600.0  # how often days past the retention are dropped
_FIRST_RETRY_S = 1.0
_MAX_RETRY_S = 60.0


def mechanism_of(decision: TlsDecision | None, hop: Hop | None) -> Mechanism:
    """What decided the TLS requirement for the host that decided a recipient."""
    if decision is None:
        return Mechanism.UNDECIDED
    source = decision.source_for(hop.mx if hop is not None else None)
    match source:
        case TlsPolicySource.DANE:
            return Mechanism.DANE
        case TlsPolicySource.STS:
            policy = decision.published.policy
            testing = policy is not None and policy.mode is Mode.TESTING
            return Mechanism.STS_TESTING if testing else Mechanism.STS_ENFORCE
        case TlsPolicySource.OVERRIDE:
            return Mechanism.OVERRIDE
        case TlsPolicySource.TLS_REQUIRED_NO:
            return Mechanism.TLS_REQUIRED_NO
        case TlsPolicySource.NONE:
            return Mechanism.OPPORTUNISTIC
        case _:
            assert_never(source)


def figure_of(outcome: Outcome, decision: TlsDecision | None) -> RecipientFigure:
    """One recipient's outcome as the posture counts it (no address kept)."""
    reason = outcome.reason
    hop = reason.hop
    tls = hop.tls if hop is not None else None
    authenticated = hop is not None and tls is not None and hop.verified
    mechanism = mechanism_of(decision, hop)
    match outcome:
        case Delivered():
            return RecipientFigure(Status.DELIVERED, mechanism, tls, authenticated)
        case Deferred() | Bounced():
            status = Status.DEFERRED if isinstance(outcome, Deferred) else Status.BOUNCED
            failure = reason.tlsrpt
            cause = Cause.POLICY if failure is not None else Cause.OTHER
            result = failure.value if failure is not None else None
            return RecipientFigure(status, mechanism, tls, authenticated, cause, result)
        case _:
            assert_never(outcome)


def attempt_of(lease: Lease, result: LeaseResult, at: float) -> Attempt:
    figures = tuple(figure_of(o, result.decision) for o in result.outcomes.values())
    domain = lease.domain.lower().rstrip(".")
    return Attempt(key=f"{lease.queue_id} {domain}", domain=domain, at=at, recipients=figures)


class PostureFeed:
    """The scheduler's hook and the flush loop of one relay."""

    def __init__(
        self,
        tally: PostureTally,
        metrics: Metrics,
        events: EventLog,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tally = tally
        self._metrics = metrics
        self._events = events
        self._clock = clock

    def record(self, lease: Lease, result: LeaseResult) -> None:
        """Count one committed attempt: in memory, never raises (outcomes matter more)."""
        try:
            attempt = attempt_of(lease, result, self._clock())
            self.tally.add(attempt)
            self._metrics.observe_posture(attempt)
        except Exception as exc:  # noqa: BLE001 - counting must never lose outcomes
            self._events.worker_error(
                queue_id=lease.queue_id, domain=lease.domain, error=f"posture: {exc!r}"
            )

    def waiting_summary(self) -> dict[str, tuple[int, float]]:
        """Per binding mechanism: recipients waiting on their policy, oldest wait (s)."""
        return {m.value: v for m, v in self.tally.waiting_summary().items()}

    async def run(
        self,
        *,
        interval: float = FLUSH_INTERVAL_S,
        prune_every: float = PRUNE_INTERVAL_S,
        first_retry: float = _FIRST_RETRY_S,
        max_retry: float = _MAX_RETRY_S,
    ) -> None:
        """Until cancelled: write the counts every `interval` seconds, and drop what is past
        the retention every `prune_every` seconds. A failed write keeps its counts in
        memory; it is logged as store_error and tried again after `first_retry` s,
        doubling up to `max_retry`."""
        pause, retry = interval, first_retry
        pruned_at = 0.0
        while True:
            # A wait that begins is written at once when other processes report the
            # waiting gauges from the store; the rest keeps to the pace.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self.tally.wait_began.wait()
            self.tally.wait_began.clear()
            now = self._clock()
            try:
                await self.tally.flush(prune=now - pruned_at >= prune_every)
            except Exception as exc:  # noqa: BLE001 - counting must never stop the relay
                pause, retry = retry, min(retry * 2, max_retry)
                error = f"posture counters: {type(exc).__name__}: {exc} (retrying in {pause:g} s)"
                self._events.store_error(error=error)
            else:
                pruned_at = now if now - pruned_at >= prune_every else pruned_at
                pause, retry = interval, first_retry

    async def close(self) -> None:
        """Write the counts still in memory (a clean stop loses none), then close; a
        failure is logged, never raised (the rest of the shutdown must go on)."""
        try:
            await self.tally.flush()
        except Exception as exc:  # noqa: BLE001 - the queue store must still be closed
            lost = f"{self.tally.pending} aggregate(s) not written"
            self._events.store_error(error=f"posture counters: {exc!r} at stop; {lost}")
        finally:
            await asyncio.to_thread(self.tally.store.close)


def open_posture_store(cfg: Config, db_path: Path, *, readonly: bool = False) -> PostureStore:
    """The aggregates' engine: the embedded SQLite state database, or the PostgreSQL one of
    `state.url` (shared by every node)."""
    if cfg.state.url:
        from posture.store_postgres import PostgresPostureStore

        return PostgresPostureStore(cfg.state.url, readonly=readonly)
    return SqlitePostureStore(db_path, readonly=readonly)


def stale_after(cfg: Config) -> float:
    """How long a waiting entry lives without an attempt: longer than any retry step
    plus a lease, so that only mail that left the queue unseen is forgotten."""
    longest_step = max(cfg.queue.retry_schedule, default=0.0)
    return max(DEFAULT_STALE_AFTER_S, 2 * longest_step + cfg.delivery.lease_time)


def build_posture(
    cfg: Config,
    db_path: Path,
    *,
    metrics: Metrics,
    events: EventLog,
    processes: int = 1,
    gauges: bool = True,
) -> PostureFeed:
    """The posture parts of a running relay; reads the waiting entries a previous run left.
    With several `processes` the waiting figures are the store's, and only the process with
    `gauges` reports them (the supervisor adds the processes' figures up)."""
    # Other writers: the other processes, or the other nodes of a shared database.
    shared = processes > 1 or bool(cfg.state.url)
    tally = PostureTally(
        open_posture_store(cfg, db_path), stale_after=stale_after(cfg), shared=shared
    )
    tally.load()
    feed = PostureFeed(tally, metrics, events)
    if gauges:
        metrics.policy_waiting = feed.waiting_summary  # the gauges, read at each scrape
    return feed
