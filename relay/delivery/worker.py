"""The delivery worker: leases due work from the queue, attempts it, records the outcome.

One lease is one message for one recipient domain. For each, the worker asks `policy`
which MTA-STS policy applies, lets `attempt` talk to the domain's MX hosts, turns a
deferral past the message's lifetime into a bounce (after a fresh policy check, RFC 8461
§5.1), queues DSNs, records every recipient's outcome in `mailqueue` and logs one
`delivery` event per recipient. It owns no state of its own beyond what is in flight.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import assert_never

import dns.asyncresolver

from mailqueue.model import Lease, NewMessage, RcptState, RecipientResult
from mailqueue.store import MessageNotFound, QueueStore, StoreUnavailable
from policy.model import Mode, PolicyLookup
from policy.resolver import PolicyResolver
from relay.delivery.attempt import AttemptSettings, MxTlsResult, attempt_domain
from relay.delivery.dsn import DsnEntry, build_dsn
from relay.delivery.envelope import Envelope
from relay.delivery.mx import DnsTempFail, MxList, NoSuchDomain, NullMx, resolve_mx
from relay.delivery.notify import notices
from relay.delivery.outcome import Bounced, Deferred, Delivered, Outcome, Reason
from relay.delivery.pool import ConnectionPool
from relay.delivery.tls import tls_required_no
from relay.events import EventLog

# How long an idle worker waits before looking at the store again; this bounds how soon
# `sts-relay queue flush`, run from another process, takes effect.
_IDLE_POLL_S = 0.5
# A lease outlives any single attempt (connect + command timeouts); a crashed node's
# leases are released when the store is opened again.
_LEASE_S = 3600.0


# The `override` of the tls_override event (and the lookup's source) for RFC 8689 §5.
TLS_REQUIRED_NO = "tls-required-no"

# (queue_id, domain, lookup) -> the lookup an attempt should use (operator overrides).
LookupAdjuster = Callable[[str, str, PolicyLookup], Awaitable[PolicyLookup]]
# (domain, lookup, MX sessions, message) after each attempt: TLSRPT counting
# (relay/reporting.py). `lookup` is the domain's own, before overrides.
TlsResultHook = Callable[[str, PolicyLookup, Sequence[MxTlsResult], bytes], None]


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    hostname: str  # Reporting-MTA of DSNs
    concurrency: int
    owner: str  # lease owner: this node's identity
    delay_notice_after: float = 14_400.0  # queue.delay_notice_after; 0 = no delay notices


class Worker:
    def __init__(
        self,
        *,
        store: QueueStore,
        policies: PolicyResolver,
        resolver: dns.asyncresolver.Resolver,
        attempt_settings: AttemptSettings,
        settings: WorkerSettings,
        events: EventLog,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        adjust_lookup: LookupAdjuster | None = None,
        session_hook: TlsResultHook | None = None,
    ) -> None:
        self._session_hook = session_hook
        self._store = store
        self._adjust_lookup = adjust_lookup
        self._policies = policies
        self._resolver = resolver
        self._attempt = attempt_settings
        self._settings = settings
        self._events = events
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - MX shuffling, not security
        self._wakeup = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._in_flight = 0
        # Connections reused across leases for the same MX (relay/delivery/pool.py).
        limits = replace(attempt_settings.pool_limits(), max_idle=settings.concurrency)
        self.pool = ConnectionPool(limits)

    def wake(self) -> None:
        """Look at the queue now (new mail was accepted)."""
        self._wakeup.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def run(self) -> None:
        """Deliver until cancelled; every attempt is a task of this one TaskGroup."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.pool.run_sweeper())
            while True:
                free = self._settings.concurrency - self._in_flight
                if free <= 0:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                    continue
                leases = await self._lease(limit=free)
                if not leases:
                    await self._idle()
                    continue
                for lease in leases:
                    self._in_flight += 1
                    tasks.create_task(self._deliver_and_release(lease))

    async def _lease(self, limit: int) -> list[Lease]:
        try:
            return await self._store.lease_due(self._settings.owner, limit, _LEASE_S)
        except StoreUnavailable as exc:
            self._events.store_error(error=f"lease: {exc}")
            return []

    async def _idle(self) -> None:
        self._wakeup.clear()
        wait = _IDLE_POLL_S
        due = await self._store.next_due_at()
        if due is not None:
            wait = min(wait, max(0.0, due - self._clock()))
        try:
            async with asyncio.timeout(wait):
                await self._wakeup.wait()
        except TimeoutError:
            pass

    async def _deliver_and_release(self, lease: Lease) -> None:
        try:
            await self.deliver(lease)
        except Exception as exc:  # noqa: BLE001 - one bad lease must not stop the worker
            self._events.worker_error(queue_id=lease.queue_id, domain=lease.domain, error=repr(exc))
            await self._defer_after_error(lease, exc)
        finally:
            self._in_flight -= 1
            self._slot_freed.set()

    async def _defer_after_error(self, lease: Lease, exc: Exception) -> None:
        """Defer (never drop) what an unexpected error interrupted; the schedule paces retries."""
        error = f"internal error: {type(exc).__name__}"
        results = [RecipientResult(r.address, RcptState.DEFERRED, error) for r in lease.recipients]
        try:
            await self._store.record(lease.queue_id, results)
        except Exception as store_exc:  # noqa: BLE001 - the lease expires and is retried
            self._events.store_error(error=f"record: {store_exc!r}")

    async def deliver(self, lease: Lease) -> None:
        """Attempt one lease and record the result of every recipient in it."""
        try:
            data = await self._store.read_data(lease.queue_id)
        except MessageNotFound:
            return  # deleted by an operator while leased: nothing left to deliver
        addresses = [r.address for r in lease.recipients]
        mx = await resolve_mx(
            lease.domain, self._resolver, timeout=self._attempt.dns_timeout, rng=self._rng
        )
        lookup = await self._policy_for(lease.domain, mx)
        outcomes = await self._attempt_once(lease, data, addresses, lookup, mx)
        if self._clock() >= lease.expires_at and _any_deferred(outcomes):
            lookup, outcomes = await self._last_chance(lease, data, lookup, outcomes)
        await self._finish(lease, data, lookup, outcomes)

    async def _policy_for(
        self, domain: str, mx: MxList | NullMx | NoSuchDomain | DnsTempFail
    ) -> PolicyLookup:
        """The MTA-STS policy, looked up only when DNS has not already settled the fate of
        the domain: a null MX (RFC 7505 §3, NMX-01) or a domain that does not exist bounces
        without any policy work (no TXT query, no fetch, no TLS)."""
        if isinstance(mx, NullMx | NoSuchDomain):
            return PolicyLookup(domain=domain, policy=None, policy_id=None, source="none")
        return await self._policies.resolve(domain)

    async def _attempt_once(
        self,
        lease: Lease,
        data: bytes,
        addresses: list[str],
        lookup: PolicyLookup,
        mx: MxList | NullMx | NoSuchDomain | DnsTempFail | None = None,
    ) -> dict[str, Outcome]:
        applied = self._honour_tls_required(lease, data, lookup)
        if self._adjust_lookup is not None:  # operator TLS overrides (relay/delivery/overrides.py)
            applied = await self._adjust_lookup(lease.queue_id, lease.domain, applied)
        tried: list[MxTlsResult] = []
        outcomes = await attempt_domain(
            lease.domain,
            Envelope(lease.sender, addresses, data, lease.dsn),
            lookup=applied,
            settings=self._attempt,
            resolver=self._resolver,
            rng=self._rng,
            pool=self.pool,
            mx=mx,
            sessions=tried,
        )
        if self._session_hook is not None:  # RFC 8460: every MX session; in memory, no I/O
            self._session_hook(lease.domain, lookup, tried, data)
        return outcomes

    def _honour_tls_required(self, lease: Lease, data: bytes, lookup: PolicyLookup) -> PolicyLookup:
        """RFC 8689 §5: a message with `TLS-Required: No` asks us to ignore the recipient
        domain's policy: STARTTLS is still tried, but validation failures and plaintext
        no longer stop it (RTLS-05). Only an enforce policy changes a decision; operator
        overrides (`tls.overrides`) apply after this and still bind."""
        policy = lookup.policy
        if policy is None or policy.mode is not Mode.ENFORCE or not tls_required_no(data):
            return lookup
        self._events.tls_override(
            queue_id=lease.queue_id,
            domain=lease.domain,
            mx=None,
            override=TLS_REQUIRED_NO,
            decision="opportunistic",
            reason="policy mode enforce ignored: the message carries TLS-Required: No",
        )
        return replace(lookup, policy=None, policy_id=None, source=TLS_REQUIRED_NO)

    async def _last_chance(
        self,
        lease: Lease,
        data: bytes,
        lookup: PolicyLookup,
        outcomes: dict[str, Outcome],
    ) -> tuple[PolicyLookup, dict[str, Outcome]]:
        """The lifetime is over: before bouncing, look for a newer policy (RFC 8461 §5.1)."""
        fresh = await self._policies.recheck(lease.domain)
        if fresh.policy_id != lookup.policy_id or fresh.policy != lookup.policy:
            deferred = [a for a, o in outcomes.items() if isinstance(o, Deferred)]
            retried = await self._attempt_once(lease, data, deferred, fresh)
            outcomes = {**outcomes, **retried}
            lookup = fresh
        expired = {a: _expire(o) for a, o in outcomes.items()}
        return lookup, expired

    async def _finish(
        self, lease: Lease, data: bytes, lookup: PolicyLookup, outcomes: dict[str, Outcome]
    ) -> None:
        attempts = {r.address: r.attempts + 1 for r in lease.recipients}
        owed = notices(
            lease,
            outcomes,
            now=self._clock(),
            delay_notice_after=self._settings.delay_notice_after,
        )
        if owed.entries:
            await self._queue_dsn(lease, data, owed.entries)
        notified = owed.delay_notified | {r.address for r in lease.recipients if r.delay_notified}
        results = [_result(a, o, a in notified) for a, o in outcomes.items()]
        await self._store.record(lease.queue_id, results)
        delay = self._clock() - lease.received_at
        for address, outcome in outcomes.items():
            self._log(lease, address, outcome, lookup, attempts.get(address, 1), delay)

    async def _queue_dsn(self, lease: Lease, data: bytes, entries: Sequence[DsnEntry]) -> None:
        """Queue one report (failed, delayed and relayed entries) to the envelope sender,
        with the null reverse-path (RFC 5321 §4.5.5; never for a null-sender message:
        `notices` returns nothing for one)."""
        now = datetime.fromtimestamp(self._clock(), tz=UTC)
        dsn = build_dsn(
            reporting_mta=self._settings.hostname,
            original_sender=lease.sender,
            original=data,
            entries=entries,
            arrival=datetime.fromtimestamp(lease.received_at, tz=UTC),
            now=now,
            envid=lease.dsn.envid,
            ret=lease.dsn.ret,
        )
        dsn_id = await self._store.put(NewMessage(sender="", recipients=(lease.sender,), data=dsn))
        self._events.bounce_queued(
            queue_id=lease.queue_id,
            dsn_queue_id=dsn_id,
            sender=lease.sender,
            rcpts=[e.address for e in entries],
        )
        self.wake()

    def _log(
        self,
        lease: Lease,
        address: str,
        outcome: Outcome,
        lookup: PolicyLookup,
        attempt: int,
        delay: float,
    ) -> None:
        reason = outcome.reason
        hop = reason.hop
        tlsrpt = reason.tlsrpt or (lookup.failure if lookup.policy is None else None)
        self._events.delivery(
            queue_id=lease.queue_id,
            rcpt=address,
            domain=lease.domain,
            status=_status(outcome).value,
            mx=hop.mx if hop else None,
            ip=hop.ip if hop else None,
            tls=hop.tls if hop else None,
            verified=hop.verified if hop else False,
            sts_mode=lookup.policy.mode.value if lookup.policy else None,
            policy_id=lookup.policy_id if lookup.policy else None,
            reason=reason.reply or reason.text,
            tlsrpt_result=tlsrpt.value if tlsrpt else None,
            attempt=attempt,
            delay_s=round(delay, 3),
        )


def _any_deferred(outcomes: dict[str, Outcome]) -> bool:
    return any(isinstance(o, Deferred) for o in outcomes.values())


def _expire(outcome: Outcome) -> Outcome:
    """A deferral at the end of the lifetime becomes a bounce (RFC 3463 4.4.7)."""
    if not isinstance(outcome, Deferred):
        return outcome
    last = outcome.reason
    text = f"delivery time expired; last error: {last.text}"
    return Bounced(replace(last, text=text, status="4.4.7"))


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
