"""The scheduler: owns in-flight delivery work, from lease to recorded outcome.

Like Postfix's qmgr, it decides what is attempted when and records what came of it; the
attempt itself is the pipeline's (`pipeline.Pipeline`), the sender's report `bounce`'s.

The guarantees it keeps (DESIGN "The shape of a delivery"):
- One attempt of a given (message, domain) at a time: the store's lease keeps other
  workers, processes and nodes off it, and every attempt ends (cut off by
  `delivery.attempt_deadline`, a deferral) before its lease (`delivery.lease_time`) does.
  A large message gets more time (its time on the wire at 32 KiB/s): an attempt that
  needs it renews its lease before the lease's own deadline, or is cut off there.
  In this process, a lease handed out again for work still running is joined to it.
- A result is recorded only by the lease's owner: the store applies a result only to rows
  still held by that very lease (`QueueStore.record`).
- After an MX's 250 nothing makes the relay send the message to that recipient again:
  outcomes and the DSN they owe are committed in one transaction; when the store fails,
  they are kept in memory and committed later (a lease handed out again for such work is
  used to record it, never to attempt it). Only a crash between the MX's reply and that
  commit can still repeat a delivery, which SMTP cannot prevent (README, "Duplicates").

Like qmgr's dead destinations, it remembers a domain found unreachable (relay/delivery/
holds.py, `delivery.unreachable_hold`) and defers its leases without any attempt while the
hold lasts; an operator's flush, read from the queue's journal, ends every hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, assert_never

from mailqueue.admin import AdminAction
from mailqueue.model import Lease, RcptState, RecipientResult
from mailqueue.store import MessageNotFound, QueueStore, StoreUnavailable
from relay.delivery.bounce import Bounce, BounceSettings, bounce_for
from relay.delivery.client import transfer_allowance
from relay.delivery.holds import Hold, Holds, held_reason
from relay.delivery.outcome import Bounced, Deferred, Delivered, Outcome, Reason
from relay.delivery.pipeline import LeaseResult, Pipeline
from relay.delivery.pool import ConnectionPool
from relay.events import EventLog, timestamp_field

# How long an idle scheduler waits before looking at the store again; this bounds how soon
# `sts-relay queue flush`, run from another process, takes effect.
_IDLE_POLL_S = 0.5
# Back-off of recording retries while the store fails (doubling up to the maximum).
_RECORD_RETRY_S = (0.5, 30.0)
# A message whose time on the wire (client.transfer_allowance) is under this gets no more
# than delivery.attempt_deadline: not worth a lease renewal. A renewal is made this long
# before the lease's own deadline at most (half the recording margin when that is less).
_MIN_ALLOWANCE_S = 1.0
_RENEW_HEADROOM_S = 30.0

# Queue journal entries read at once when looking for an operator's flush.
_JOURNAL_PAGE = 500

_Key = tuple[str, str]  # (queue_id, domain): the unit of work a lease covers


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    concurrency: int
    owner: str  # lease owner: this process's identity
    bounce: BounceSettings
    lease_time: float = 1200.0  # delivery.lease_time
    attempt_deadline: float = 900.0  # delivery.attempt_deadline
    unreachable_hold: float = 0.0  # holds.hold_seconds(delivery.unreachable_hold, ...); 0 off


@dataclass(frozen=True, slots=True)
class _Unrecorded:
    """Outcomes of a finished attempt whose commit is still owed."""

    lease: Lease
    results: tuple[RecipientResult, ...]
    bounce: Bounce | None
    log: Callable[[], None]  # the attempt's `delivery` events, logged once committed


class Scheduler:
    # Told of every committed attempt, after its `delivery` events (the TLS posture
    # tally, relay/posture.py); in memory only, and it never raises.
    on_recorded: Callable[[Lease, LeaseResult], None] = staticmethod(lambda _lease, _result: None)

    def __init__(
        self,
        *,
        store: QueueStore,
        pipeline: Pipeline,
        pool: ConnectionPool,
        settings: SchedulerSettings,
        events: EventLog,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.pipeline = pipeline
        self.pool = pool
        self._settings = settings
        self._events = events
        self._clock = clock
        self._wakeup = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._running: dict[_Key, Lease] = {}  # the newest lease of each running attempt
        self._unrecorded: dict[_Key, _Unrecorded] = {}
        self._unrecorded_added = asyncio.Event()
        self.holds = Holds(settings.unreachable_hold)
        self._journal_seen: int | None = None  # the last queue journal entry looked at
        self._journal_look: _JournalLook | None = None  # the latest look for a flush

    def wake(self) -> None:
        """Look at the queue now (new mail was accepted)."""
        self._wakeup.set()

    @property
    def owner(self) -> str:
        """The lease owner this scheduler writes: its process's identity."""
        return self._settings.owner

    @property
    def in_flight(self) -> int:
        """Attempts running, plus finished attempts whose outcomes are not committed yet."""
        return len(self._running) + len(self._unrecorded)

    async def run(self) -> None:
        """Deliver until cancelled; every attempt is a task of this one TaskGroup."""
        await self._note_journal_head()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.pool.run_sweeper())
            tasks.create_task(self._retry_unrecorded())
            while True:
                free = self._settings.concurrency - len(self._running)
                if free <= 0:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                    continue
                leases = await self._lease(limit=free)
                if not leases:
                    await self._idle()
                    continue
                taken = asyncio.get_running_loop().time()  # the leases are ours since then
                for lease in leases:
                    key = (lease.queue_id, lease.domain)
                    if key in self._running:
                        self._running[key] = lease  # our own work, leased again: join it
                    elif key in self._unrecorded:
                        tasks.create_task(self._commit(self._rebind(key, lease)))
                    else:
                        self._running[key] = lease
                        tasks.create_task(self._handle(lease, taken))

    async def _lease(self, limit: int) -> list[Lease]:
        try:
            return await self._store.lease_due(
                self._settings.owner, limit, self._settings.lease_time
            )
        except StoreUnavailable as exc:
            self._events.store_error(error=f"lease: {exc}")
            await asyncio.sleep(_IDLE_POLL_S)
            return []

    async def _hold(self, lease: Lease, taken: float) -> Hold | None:
        """The hold that keeps `lease` from being attempted now, if any (holds.hold_for).

        `sts-relay queue flush` asks for delivery now: no hold may defer mail it made due.
        Before a lease taken at `taken` (loop time) that was tried before is held, the
        queue's journal is looked at from then on: a flush that made the lease due
        committed its journal entry with it, so that look sees it and ends every hold.
        Held leases taken together share one look; nothing is read while nothing is held,
        nor for mail never tried (a flush cannot have made it due)."""
        hold = self.holds.holding(lease, self._clock())
        if hold is None:
            return None
        if all(r.attempts == 0 for r in lease.recipients):
            # First attempts are due on arrival, never made due by a flush: there is no
            # journal to read for them (while a destination is down, most held mail).
            return hold
        look = self._journal_look
        if look is None or look.started < taken:
            look = _JournalLook(asyncio.get_running_loop().time(), self._look_for_flush())
            self._journal_look = look
        await asyncio.shield(look.done)  # shared: one waiter cut off must not end it
        return self.holds.holding(lease, self._clock())

    async def _look_for_flush(self) -> None:
        """End every hold when the journal has a flush past the last entry looked at, or
        cannot be read (an attempt too many is safe, a hold too many is not). Never
        raises: held leases wait for it."""
        try:
            flushed = await self._journal_flushed()
        except Exception as exc:  # noqa: BLE001 - unknown means "attempt": holds end
            self._events.store_error(error=f"queue journal: {exc}; holds ended")
            flushed = True
        if flushed:
            self.holds.clear()

    async def _note_journal_head(self) -> None:
        """Flushes are looked for from the journal's head at start: every hold begins later,
        and a flush after it must end it even when another process has logged it already."""
        try:
            self._journal_seen = await self._store.journal_head()
        except Exception as exc:  # noqa: BLE001 - the first look falls back on the logged cursor
            self._events.store_error(error=f"queue journal: {exc}")

    async def _journal_flushed(self) -> bool:
        """Whether the queue's journal has a flush past the last entry looked at (without a
        head noted at start: past the entries the relay has logged)."""
        seen = self._journal_seen
        if seen is None:
            seen = await self._store.journal_logged()
        flushed = False
        while True:
            entries = await self._store.journal(seen, _JOURNAL_PAGE)
            flushed = flushed or any(e.action == AdminAction.FLUSH for e in entries)
            if entries:
                seen = entries[-1].id
            if len(entries) < _JOURNAL_PAGE:
                break
        self._journal_seen = max(seen, self._journal_seen or 0)
        return flushed

    async def _idle(self) -> None:
        self._wakeup.clear()
        wait = _IDLE_POLL_S
        try:
            due = await self._store.next_due_at()
        except StoreUnavailable as exc:
            self._events.store_error(error=f"next due: {exc}")
            due = None
        if due is not None:
            wait = min(wait, max(0.0, due - self._clock()))
        try:
            async with asyncio.timeout(wait):
                await self._wakeup.wait()
        except TimeoutError:
            pass

    async def _handle(self, lease: Lease, taken: float) -> None:
        key = (lease.queue_id, lease.domain)
        try:
            attempted = await self._attempt(lease, taken)
            if attempted is not None:
                data, result = attempted
                await self._finish(self._running.get(key, lease), data, result)
        finally:
            self._running.pop(key, None)
            self._slot_freed.set()

    async def _attempt(self, lease: Lease, taken: float) -> tuple[bytes, LeaseResult] | None:
        """The attempt of `lease` (taken at loop time `taken`) as a value, within the
        attempt deadline; None when the message is gone (deleted by an operator while
        leased). While its domain is held, it is deferred without any attempt."""
        try:
            data = await self._store.read_data(lease.queue_id)
        except MessageNotFound:
            return None
        except StoreUnavailable as exc:
            # Nothing attempted: give the lease back, or let it run out if that fails too.
            self._events.store_error(error=f"read {lease.queue_id}: {exc}")
            with contextlib.suppress(StoreUnavailable):
                await self._store.release(lease)
            return None
        hold = await self._hold(lease, taken)
        if hold is not None:  # no DNS, no policy, no connection: deferred as it stands
            outcome = Deferred(held_reason(hold))
            return data, LeaseResult({r.address: outcome for r in lease.recipients}, None, True)
        expired = self._clock() >= lease.expires_at
        granted = _Granted(self._settings.attempt_deadline)
        try:
            result = await self._run_in_time(lease, data, expired, granted)
        except TimeoutError:
            return data, _everyone(lease, granted.cut_off_text(len(data)), "4.4.7")
        except Exception as exc:  # noqa: BLE001 - one bad lease must not stop the others
            self._events.worker_error(queue_id=lease.queue_id, domain=lease.domain, error=repr(exc))
            return data, _everyone(lease, f"internal error: {type(exc).__name__}", "4.3.0")
        began = self.holds.learn(lease.domain, result.outcomes, self._clock())
        if began is not None:
            self._events.destination_held(
                domain=began.domain, until=timestamp_field(began.until), reason=began.failure.text
            )
        return data, result

    async def _run_in_time(
        self, lease: Lease, data: bytes, expired: bool, granted: _Granted
    ) -> LeaseResult:
        """The pipeline's attempt of `lease`, cut off (TimeoutError) at its deadline.

        The lease was taken lease_time ago at `until`; the attempt must end
        attempt_deadline after that, leaving the rest of the lease to record it. A large
        message is given more: its time on the wire at the slowest rate allowed
        (`client.transfer_allowance`). An attempt still running shortly before the lease's
        own deadline renews the lease first, so no other worker or process can take the
        work while it runs; if renewing fails, the lease's deadline stands.
        """
        margin = self._settings.lease_time - self._settings.attempt_deadline
        in_lease = lease.until - margin
        allowance = transfer_allowance(len(data))
        async with asyncio.timeout(max(in_lease - self._clock(), 0.0)) as cutoff:
            if allowance < _MIN_ALLOWANCE_S:  # not worth a lease renewal
                return await self.pipeline.run(lease, data, expired=expired)
            keeper = asyncio.create_task(
                self._keep_leased(lease, cutoff, allowance, margin, granted)
            )
            try:
                return await self.pipeline.run(lease, data, expired=expired)
            finally:
                keeper.cancel()
                await asyncio.wait({keeper})

    async def _keep_leased(
        self,
        lease: Lease,
        cutoff: asyncio.Timeout,
        allowance: float,
        margin: float,
        granted: _Granted,
    ) -> None:
        """Shortly before `cutoff` (the lease's deadline), renew the lease to cover
        `allowance` seconds more of the attempt plus the margin to record it, then move
        the cutoff by as much."""
        in_lease = lease.until - margin
        ends = in_lease + allowance
        headroom = min(margin / 2, _RENEW_HEADROOM_S)
        await asyncio.sleep(max(in_lease - headroom - self._clock(), 0.0))
        key = (lease.queue_id, lease.domain)
        renewal = asyncio.ensure_future(self._renew(self._running.get(key, lease), ends + margin))
        try:
            await asyncio.shield(renewal)
        finally:
            # Even when the attempt ended meanwhile: the store may have renewed, and the
            # result must be recorded through the lease the store now holds.
            await asyncio.wait({renewal})
            renewed = renewal.result()
            if renewed is not None and key in self._running:
                self._running[key] = renewed
        if renewed is not None and not cutoff.expired():
            granted.extend(allowance)
            later = max(ends - self._clock(), 0.0)
            cutoff.reschedule(asyncio.get_running_loop().time() + later)

    async def _renew(self, lease: Lease, until: float) -> Lease | None:
        """The lease renewed to `until`; None when it is no longer ours or the store fails."""
        try:
            return await self._store.renew(lease, until)
        except StoreUnavailable as exc:
            self._events.store_error(error=f"renew {lease.queue_id}: {exc}")
            return None

    async def _finish(self, lease: Lease, data: bytes, result: LeaseResult) -> None:
        """Commit the attempt's outcomes and the DSN they owe, then log them: a `delivery`
        event says what is recorded (a crash before the commit logs nothing)."""
        outcomes = result.outcomes
        bounce, delay_notified = bounce_for(
            lease, data, outcomes, now=self._clock(), settings=self._settings.bounce
        )
        notified = delay_notified | {r.address for r in lease.recipients if r.delay_notified}
        results = tuple(_result(a, o, a in notified) for a, o in outcomes.items())
        delay = round(self._clock() - lease.received_at, 3)
        attempts = {r.address: r.attempts + 1 for r in lease.recipients}

        def log() -> None:
            for address, outcome in outcomes.items():
                self._log(lease, address, outcome, result, attempts.get(address, 1), delay)
            self.on_recorded(lease, result)

        await self._commit(_Unrecorded(lease, results, bounce, log))

    async def _commit(self, pending: _Unrecorded) -> bool:
        """Commit `pending`; on a store failure keep it for `_retry_unrecorded`."""
        lease = pending.lease
        key = (lease.queue_id, lease.domain)
        dsn = pending.bounce.message if pending.bounce is not None else None
        try:
            recorded = await self._store.record(lease, pending.results, dsn)
        except StoreUnavailable as exc:
            if key not in self._unrecorded:
                self._events.store_error(
                    error=f"record {lease.queue_id}: {exc}; outcomes kept, retried"
                )
            self._unrecorded[key] = pending
            self._unrecorded_added.set()
            return False
        retried = self._unrecorded.pop(key, None) is not None
        if pending.bounce is not None and recorded.dsn_queue_id is not None:
            self._events.bounce_queued(
                queue_id=lease.queue_id,
                dsn_queue_id=recorded.dsn_queue_id,
                sender=lease.sender,
                rcpts=pending.bounce.rcpts,
            )
            self.wake()
        pending.log()
        if recorded.lost:
            why = "lease taken over before recording"
            if retried:  # the failed commit may have happened after all
                why = "already recorded by an earlier commit, or lease taken over"
            self._events.worker_error(
                queue_id=lease.queue_id,
                domain=lease.domain,
                error=f"{len(recorded.lost)} outcome(s) not applied: {why}",
            )
        return True

    def _rebind(self, key: _Key, lease: Lease) -> _Unrecorded:
        """Unrecorded outcomes moved onto the lease now holding their recipients."""
        pending = self._unrecorded[key]
        leased = {r.address for r in lease.recipients}
        results = tuple(r for r in pending.results if r.address in leased)
        rebound = _Unrecorded(lease, results, pending.bounce, pending.log)
        self._unrecorded[key] = rebound
        return rebound

    async def _retry_unrecorded(self) -> None:
        """Commit kept outcomes as soon as the store takes them again."""
        low, high = _RECORD_RETRY_S
        wait = low
        while True:
            if not self._unrecorded:
                self._unrecorded_added.clear()
                await self._unrecorded_added.wait()
                wait = low
            await asyncio.sleep(wait)
            results = [await self._commit(p) for p in list(self._unrecorded.values())]
            wait = low if all(results) else min(wait * 2, high)

    def _log(
        self,
        lease: Lease,
        address: str,
        outcome: Outcome,
        result: LeaseResult,
        attempt: int,
        delay: float,
    ) -> None:
        reason = outcome.reason
        hop = reason.hop
        decision = result.decision
        published = decision.published if decision is not None else None
        policy = published.policy if published is not None else None
        tlsrpt = reason.tlsrpt
        if tlsrpt is None and published is not None and policy is None:
            tlsrpt = published.failure
        self._events.delivery(
            queue_id=lease.queue_id,
            rcpt=address,
            domain=lease.domain,
            status=_status(outcome).value,
            mx=hop.mx if hop else None,
            ip=hop.ip if hop else None,
            tls=hop.tls if hop else None,
            verified=hop.verified if hop else False,
            tls_resumed=hop.tls_resumed if hop and hop.tls else None,
            sts_mode=policy.mode.value if policy else None,
            policy_id=published.policy_id if published and policy else None,
            tls_policy=decision.source_for(hop.mx if hop else None).value
            if decision is not None
            else None,
            dane_record=hop.dane if hop else None,
            requiretls=lease.requiretls,
            reason=reason.reply or reason.text,
            tlsrpt_result=tlsrpt.value if tlsrpt else None,
            attempt=attempt,
            delay_s=delay,
            held=result.held,
        )


class _JournalLook:
    """A look at the queue's journal for a flush, begun at loop time `started`."""

    def __init__(self, started: float, look: Coroutine[Any, Any, None]) -> None:
        self.started = started
        self.done = asyncio.ensure_future(look)


@dataclass(slots=True)
class _Granted:
    """The time an attempt was given: delivery.attempt_deadline, plus the time on the
    wire of a large message once the lease was renewed for it."""

    deadline: float
    allowance: float = 0.0

    def extend(self, allowance: float) -> None:
        self.allowance = allowance

    def cut_off_text(self, size: int) -> str:
        if not self.allowance:
            return f"attempt cut off after {self.deadline:g} s (delivery.attempt_deadline)"
        total = self.deadline + self.allowance
        return (
            f"attempt cut off after {total:.0f} s (delivery.attempt_deadline, plus"
            f" {self.allowance:.0f} s for a message of {size} bytes)"
        )


def _everyone(lease: Lease, text: str, status: str) -> LeaseResult:
    outcome = Deferred(Reason(text, status))
    return LeaseResult({r.address: outcome for r in lease.recipients}, None)


def _status(outcome: Outcome) -> RcptState:
    match outcome:
        case Delivered():
            return RcptState.SENT
        case Deferred():
            return RcptState.DEFERRED
        case Bounced():
            return RcptState.BOUNCED
        case _:
            assert_never(outcome)


def _result(address: str, outcome: Outcome, delay_notified: bool = False) -> RecipientResult:
    reason: Reason = outcome.reason
    error = None if isinstance(outcome, Delivered) else (reason.reply or reason.text)
    return RecipientResult(
        address=address, state=_status(outcome), error=error, delay_notified=delay_notified
    )
