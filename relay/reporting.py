"""TLS reporting wired into the relay (RFC 8460): counts delivery sessions, and once a day
builds each domain's report and sends it (mailto: through the relay's own queue, https:
POSTed), retrying failed sends without ever holding up mail.

Owns the translation of an attempt's MX sessions into TLSRPT sessions, the daily job and the
report senders' I/O. The counters, the report format and the send decisions live in
`tlsrpt`; the queue is used only through its store interface.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dns.asyncresolver

from mailqueue.model import NewMessage
from mailqueue.store import QueueStore, StoreUnavailable
from policy.model import PolicyLookup, TlsRptResult
from relay.config import Config, ConfigError
from relay.delivery.attempt import MxTlsResult
from relay.delivery.tls import tls_required_no
from relay.events import EventLog
from tlsrpt import plan
from tlsrpt.counter import SessionCounter, applied_policy, utc_day
from tlsrpt.discover import LookupFailed, NoRecord, discover_record, host_addresses
from tlsrpt.mail import DkimError, DkimKey, ReportMail, build_mail, check_key
from tlsrpt.model import AppliedPolicy, Delivery, Failure, PolicyType, Session, TlsRptRecord
from tlsrpt.post import Posted, post_report
from tlsrpt.record import https_target, mailto_address
from tlsrpt.report import a_label, build_report, compress, report_filename, report_json
from tlsrpt.store import ReportStorage, ReportStore

_RETENTION_DAYS = 35
_MAX_SLEEP_S = 600.0
_FLUSH_INTERVAL_S = 5.0  # how often counted sessions are written
# After a failed pass (a store error, mostly) a loop pauses this long, doubling up to the
# maximum, and goes back to its normal pace after a success.
_FIRST_RETRY_S = 1.0
_MAX_RETRY_S = 60.0


@dataclass(frozen=True, slots=True)
class ReportSettings:
    enabled: bool
    submitter: str  # TLS-Report-Submitter: the domain of contact-info (RFC 8460 §5.3)
    organization: str
    contact: str
    sender: str  # From: and envelope sender of report mail
    send_delay: float
    dkim: DkimKey | None
    dns_timeout: float
    post_deadline: float = 30.0


def report_settings(cfg: Config) -> ReportSettings:
    """The reporting settings with computed defaults; ConfigError for a key that cannot sign."""
    t = cfg.tlsrpt
    contact_address = t.contact_info.removeprefix("mailto:") if "@" in t.contact_info else ""
    contact_domain = a_label(contact_address.rpartition("@")[2]) if contact_address else ""
    submitter = a_label(t.submitter or contact_domain or cfg.delivery.hostname)
    if contact_domain and contact_domain != submitter:
        raise ConfigError(f"tlsrpt.contact_info: its domain must be tlsrpt.submitter ({submitter})")
    sender = contact_address or f"tlsrpt-noreply@{submitter}"
    dkim_key = None
    if t.dkim_key_file is not None:
        try:
            private = Path(t.dkim_key_file).read_bytes()
            dkim_key = DkimKey(t.dkim_selector, a_label(t.dkim_domain or submitter), private)
            check_key(dkim_key)
        except (OSError, DkimError) as exc:
            raise ConfigError(f"tlsrpt.dkim_key_file: cannot sign with it: {exc}") from None
    return ReportSettings(
        enabled=t.enabled,
        submitter=submitter,
        organization=t.organization_name or submitter,
        contact=t.contact_info or sender,
        sender=sender,
        send_delay=t.send_delay,
        dkim=dkim_key,
        dns_timeout=cfg.dns.timeout,
    )


# --- counting sessions -------------------------------------------------------------------


def is_report_mail(data: bytes) -> bool:
    """True for a message whose header carries `TLS-Required: No`: report mail carries it
    (RFC 8460 §3, RFC 8689 §5), and its sessions are never counted."""
    return tls_required_no(data)


def sessions_of(
    domain: str, day: str, lookup: PolicyLookup, tried: Sequence[MxTlsResult]
) -> list[Session]:
    """The TLSRPT sessions of one attempt: one per MX session in `tried` (those that reached
    TLS or MTA-STS evaluation; RFC 8460 §4.3.4: transient failures need not be reported),
    so a failure on one MX before a success on the next is counted as well."""
    policy = applied_policy(lookup.policy)
    # RFC 8460 §4.3.2.3: the policy could not be had; the mail went out without it.
    fetch_failed = lookup.failure if lookup.policy is None else None
    sessions = []
    for tried_mx in tried:
        result = fetch_failed or tried_mx.result
        applied = policy
        if tried_mx.tlsa is not None:
            # Held to DANE (RFC 7672): counted against the MX host's TLSA records
            # (RFC 8460 §4.4 policy-type `tlsa`), not against the MTA-STS policy.
            mx_host = tried_mx.mx.lower().removesuffix(".")
            applied = AppliedPolicy(PolicyType.TLSA, tried_mx.tlsa, (mx_host,))
            result = tried_mx.result
        failure = None if result is None else _failure(result, tried_mx)
        sessions.append(Session(domain, day, applied, failure))
    return sessions


def _failure(result: TlsRptResult, tried: MxTlsResult) -> Failure:
    return Failure(result, receiving_mx=tried.mx.lower().removesuffix("."), receiving_ip=tried.ip)


class SessionRecorder:
    """The delivery worker's hook: one call after each attempt, no I/O on the way."""

    def __init__(self, counter: SessionCounter, clock: Callable[[], float] = time.time) -> None:
        self._counter = counter
        self._clock = clock

    def record(
        self, domain: str, lookup: PolicyLookup, tried: Sequence[MxTlsResult], data: bytes
    ) -> None:
        # RFC 8460 §3, §5.3: never report on the delivery of reports (RPT-11, RPT-14).
        if is_report_mail(data):
            return
        for session in sessions_of(a_label(domain), utc_day(self._clock()), lookup, tried):
            self._counter.add(session)


# --- building and sending reports -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedReport:
    """A domain's report for a day, and where it would go (or why it would not)."""

    domain: str
    day: str
    report_id: str
    report: dict[str, Any]
    record: TlsRptRecord | NoRecord | LookupFailed
    already_sent: bool = False
    deliveries: list[Delivery] = field(default_factory=list)


class Reporter:
    """Builds and sends reports. `queue` may be None for a reporter that only previews."""

    def __init__(
        self,
        settings: ReportSettings,
        store: ReportStorage,
        *,
        resolver: dns.asyncresolver.Resolver,
        ssl_context: ssl.SSLContext,
        events: EventLog,
        queue: QueueStore | None = None,
        on_queued: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._store = store
        self._resolver = resolver
        self._ssl = ssl_context
        self._events = events
        self._queue = queue
        self.on_queued = on_queued
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - send-time spread, not security
        self._delays: dict[str, float] = {}

    def attach_queue(self, queue: QueueStore) -> None:
        """Report mail goes into `queue` from now on."""
        self._queue = queue

    async def plan(self, day: str) -> list[PlannedReport]:
        """What the report of every domain with sessions on `day` is and where it goes."""
        counts = await asyncio.to_thread(self._store.counts, day)
        done = await asyncio.to_thread(self._store.reported_domains, day)
        sent = await asyncio.to_thread(self._store.deliveries, day)
        planned = []
        for domain in sorted({c.domain for c in counts}):
            report_id = plan.new_report_id(day, domain, self.settings.submitter)
            report = build_report(
                domain=domain,
                day=day,
                counts=counts,
                organization=self.settings.organization,
                contact=self.settings.contact,
                report_id=report_id,
            )
            record = await discover_record(domain, self._resolver, self.settings.dns_timeout)
            mine = [d for d in sent if d.domain == domain]
            planned.append(
                PlannedReport(domain, day, report_id, report, record, domain in done, mine)
            )
        return planned

    async def send_day(self, day: str, domains: set[str] | None = None) -> list[Delivery]:
        """Build and send `day`'s reports not sent yet (of `domains`, if given)."""
        results: list[Delivery] = []
        for planned in await self.plan(day):
            if planned.already_sent or (domains is not None and planned.domain not in domains):
                continue
            if isinstance(planned.record, LookupFailed):
                continue  # the next run tries again
            results.extend(await self._send_planned(planned))
        return results

    async def _send_planned(self, planned: PlannedReport) -> list[Delivery]:
        now = self._clock()
        if not isinstance(planned.record, TlsRptRecord):
            await asyncio.to_thread(
                self._store.save_report, planned.report_id, planned.day, planned.domain, None,
                [], now,
            )  # fmt: skip
            return []
        payload = compress(report_json(planned.report))
        deliveries = plan.initial_deliveries(
            planned.report_id, planned.domain, planned.day, planned.record.rua, now
        )
        saved = await asyncio.to_thread(
            self._store.save_report, planned.report_id, planned.day, planned.domain, payload,
            deliveries, now,
        )  # fmt: skip
        if not saved:
            return []
        return [await self._deliver(d, payload) for d in deliveries]

    async def retry_due(self) -> list[Delivery]:
        due = await asyncio.to_thread(self._store.due_deliveries, self._clock())
        return [await self._deliver(d, payload) for d, payload in due]

    async def _deliver(self, delivery: Delivery, payload: bytes) -> Delivery:
        address = mailto_address(delivery.uri)
        error: str | None
        if address is not None:
            error = await self._queue_mail(delivery, address, payload)
        else:
            error = await self._post(delivery.uri, payload)
        now = self._clock()
        if error is None:
            done = plan.after_success(delivery, queued=address is not None)
        else:
            done = plan.after_failure(delivery, error, now)
        await asyncio.to_thread(self._store.update_delivery, done)
        self._events.tlsrpt_report(
            domain=done.domain,
            day=done.day,
            report_id=done.report_id,
            uri=done.uri,
            state=done.state.value,
            attempts=done.attempts,
            error=done.last_error,
        )
        return done

    async def _queue_mail(self, delivery: Delivery, address: str, payload: bytes) -> str | None:
        if self._queue is None:
            return "no queue to send mail through"
        s = self.settings
        mail = ReportMail(
            sender=s.sender,
            recipient=address,
            domain=delivery.domain,
            submitter=s.submitter,
            report_id=delivery.report_id,
            filename=report_filename(
                s.submitter, delivery.domain, delivery.day, plan.report_token(delivery.report_id)
            ),
            payload=payload,
        )
        now = datetime.fromtimestamp(self._clock(), tz=UTC)
        data = build_mail(mail, now=now, dkim_key=s.dkim)
        try:
            await self._queue.put(NewMessage(sender=s.sender, recipients=(address,), data=data))
        except StoreUnavailable as exc:
            return f"queue: {exc}"
        self.on_queued()
        return None

    async def _post(self, uri: str, payload: bytes) -> str | None:
        target = https_target(uri)
        if target is None:
            return f"unusable URI {uri[:80]!r}"
        addresses = await host_addresses(target[0], self._resolver, self.settings.dns_timeout)
        outcome = await post_report(
            uri,
            payload,
            addresses=addresses,
            ssl_context=self._ssl,
            deadline=self.settings.post_deadline,
        )
        return None if isinstance(outcome, Posted) else outcome.detail

    # --- the daily job ---

    def _delay(self, day: str) -> float:
        if day not in self._delays:
            self._delays[day] = self._rng.uniform(0, self.settings.send_delay)
        return self._delays[day]

    async def run_due(self) -> None:
        """Send the reports whose time has come, then retry failed sends that are due."""
        now = self._clock()
        oldest, newest = plan.catch_up_range(now)
        pending = await asyncio.to_thread(self._store.unreported, oldest, newest)
        for day in sorted({day for day, _ in pending}):
            if now >= plan.due_at(day, self._delay(day)):
                await self.send_day(day, {domain for d, domain in pending if d == day})
        await self.retry_due()
        await asyncio.to_thread(self._store.prune, plan.prune_before(now, _RETENTION_DAYS))

    def _sleep_for(self) -> float:
        now = self._clock()
        today = utc_day(now)
        wake = plan.due_at(today, self._delay(today))
        retry = self._store.next_retry_at()
        if retry is not None:
            wake = min(wake, retry)
        return min(max(wake - now, 1.0), _MAX_SLEEP_S)

    async def run(
        self, *, first_retry: float = _FIRST_RETRY_S, max_retry: float = _MAX_RETRY_S
    ) -> None:
        """Until cancelled: one pass now, then whenever something falls due.

        A pass that fails (the store busy or broken, or anything else: reporting must never
        stop the relay) is logged as store_error and tried again after `first_retry`
        seconds, doubling up to `max_retry`; a pass that succeeds restores the schedule.
        """
        retry = first_retry
        while True:
            try:
                await self.run_due()
                # Reads the store too: inside the try, or a store error would end the task.
                sleep = await asyncio.to_thread(self._sleep_for)
            except Exception as exc:  # noqa: BLE001 - reporting must never stop the relay
                sleep, retry = retry, min(retry * 2, max_retry)
                error = f"tlsrpt: {type(exc).__name__}: {exc} (retrying in {sleep:g} s)"
                self._events.store_error(error=error)
            else:
                retry = first_retry
            await asyncio.sleep(sleep)


# --- assembly ---------------------------------------------------------------------------


@dataclass
class Reporting:
    """The reporting parts of a running relay: counters, the worker's hook, the daily job."""

    settings: ReportSettings
    store: ReportStorage
    counter: SessionCounter
    recorder: SessionRecorder
    reporter: Reporter

    @property
    def session_hook(
        self,
    ) -> Callable[[str, PolicyLookup, Sequence[MxTlsResult], bytes], None] | None:
        return self.recorder.record if self.settings.enabled else None

    async def run(
        self,
        *,
        flush_interval: float = _FLUSH_INTERVAL_S,
        first_retry: float = _FIRST_RETRY_S,
        max_retry: float = _MAX_RETRY_S,
        send: bool = True,
    ) -> None:
        """Flush counters and, when `send` (one process of a relay sends, every process
        counts: relay/processes/), run the daily job until cancelled; neither ends on an
        error."""
        if not self.settings.enabled:
            return
        events = self.reporter._events  # one log for both loops (module-private access)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(
                flush_counts(
                    self.counter,
                    events,
                    interval=flush_interval,
                    first_retry=first_retry,
                    max_retry=max_retry,
                )
            )
            if send:
                tasks.create_task(self.reporter.run(first_retry=first_retry, max_retry=max_retry))

    async def close(self) -> None:
        """Write the counts still in memory (a clean stop loses none), then close."""
        try:
            await self.counter.close()
        finally:
            await asyncio.to_thread(self.store.close)


async def flush_counts(
    counter: SessionCounter,
    events: EventLog,
    *,
    interval: float = _FLUSH_INTERVAL_S,
    first_retry: float = _FIRST_RETRY_S,
    max_retry: float = _MAX_RETRY_S,
) -> None:
    """Until cancelled: write the counted sessions every `interval` seconds.

    A write that fails keeps its counts in memory for the next one (SessionCounter.flush);
    it is logged as store_error and tried again after `first_retry` seconds, doubling up to
    `max_retry`. (SessionCounter.run would retry silently, at a fixed pace.)
    """
    pause, retry = interval, first_retry
    while True:
        await asyncio.sleep(pause)
        try:
            await counter.flush()
        except Exception as exc:  # noqa: BLE001 - counting must never stop the relay
            pause, retry = retry, min(retry * 2, max_retry)
            error = f"tlsrpt counters: {type(exc).__name__}: {exc} (retrying in {pause:g} s)"
            events.store_error(error=error)
        else:
            pause, retry = interval, first_retry


def build_reporting(
    cfg: Config,
    db_path: Path,
    *,
    queue: QueueStore | None,
    resolver: dns.asyncresolver.Resolver,
    ssl_context: ssl.SSLContext,
    events: EventLog,
) -> Reporting:
    """Raises ConfigError when the DKIM key cannot sign."""
    settings = report_settings(cfg)
    store: ReportStorage
    if cfg.state.url:  # shared by every node: one report per (day, domain) for them all
        from tlsrpt.store_postgres import PostgresReportStore

        store = PostgresReportStore(cfg.state.url)
    else:
        store = ReportStore(db_path)
    counter = SessionCounter(store)
    reporter = Reporter(
        settings, store, resolver=resolver, ssl_context=ssl_context, events=events, queue=queue
    )
    return Reporting(settings, store, counter, SessionRecorder(counter), reporter)
