"""Background loops survive transient store errors (issue 10, item 5): the policy refresh
loop of `serve`, and TLSRPT's counter flush and daily report job. Each loop is driven
directly, with short intervals, against a real SQLite store made to fail for a while (a
table renamed away through a second connection, then back) or a small fake of our own
interface; each must log `store_error`, back off (the pause is in the message), keep
running, and resume its work once the store recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import dns.asyncresolver
import pytest

from mailqueue.store import StoreUnavailable
from policy.cache import CachedPolicy, PolicyCache
from policy.parse import parse_policy
from policy.resolver import PolicyResolver
from policy.webpki import client_context
from relay.app import _refresh_policies
from relay.events import EventLog
from relay.reporting import Reporter, Reporting, ReportSettings, SessionRecorder, flush_counts
from tests.support.waiting import eventually
from tests.support.world import World, policy_body
from tlsrpt.counter import SessionCounter
from tlsrpt.model import AppliedPolicy, PolicyType, Session
from tlsrpt.store import ReportStore

DOMAIN = "refresh-me.test"
REPORTED = "rpt-store.test"  # no _smtp._tls record: its report is recorded as "nowhere to send"
DAY = "2026-03-04"
AFTER_DAY = 1772668800.0 + 7200  # 2026-03-05 02:00Z: DAY's report is due
FIRST, CAP = 0.01, 0.04  # back-off of the loops under test: 0.01, 0.02, 0.04, 0.04, ...
RETRYING = re.compile(r" \(retrying in ([0-9.]+) s\)$")


class Recorder:
    """Every event the EventLog emits, by name (its subscribe hook)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        self.events.append((name, dict(fields)))

    def errors(self, prefix: str = "") -> list[str]:
        return [
            str(fields["error"])
            for name, fields in self.events
            if name == "store_error" and str(fields["error"]).startswith(prefix)
        ]


def event_log() -> tuple[EventLog, Recorder]:
    log = EventLog(io.StringIO())
    recorder = Recorder()
    log.subscribe(recorder)
    return log, recorder


def pauses(errors: list[str]) -> list[float]:
    """The back-off each store_error announced."""
    found = [RETRYING.search(error) for error in errors]
    assert all(found), errors
    return [float(match.group(1)) for match in found if match]


def assert_running(task: asyncio.Task[None]) -> None:
    if task.done():
        raise AssertionError(f"the loop ended: {task.exception()!r}")


@contextlib.asynccontextmanager
async def running(loop: Coroutine[Any, Any, None]) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(loop)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def alter(db_path: Path, statement: str) -> None:
    # A second connection, as another process (or a damaged disk) would change the file.
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute(statement)
    finally:
        other.close()


def hide(db_path: Path, table: str) -> None:
    alter(db_path, f"ALTER TABLE {table} RENAME TO {table}_hidden")


def restore(db_path: Path, table: str) -> None:
    alter(db_path, f"ALTER TABLE {table}_hidden RENAME TO {table}")


def lab_dns(world: World) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [world.dns.address[0]]
    resolver.port = world.dns.address[1]
    resolver.timeout = resolver.lifetime = 2.0
    return resolver


# -- the policy refresh loop (relay/app.py) -------------------------------------------------


async def test_refresh_loop_survives_unreadable_cache_and_resumes(
    world: World, tmp_path: Path
) -> None:
    db_path = tmp_path / "state.sqlite3"
    cache = PolicyCache(db_path, revalidate_after=0.0)
    resolver = PolicyResolver(
        cache,
        lab_dns(world),
        client_context(str(world.pki.ca_file)),
        https_port=world.policy_server.port,
        fetch_deadline=3.0,
        dns_timeout=2.0,
    )
    # A policy in use and past its proactive-refresh point (50-75% of its max_age).
    world.publish_policy(DOMAIN, mode="enforce", policy_id="1")
    policy = parse_policy(policy_body("enforce", [f"mx1.{DOMAIN}"], 86400).encode())
    now = time.time()
    stale = now - 80_000
    cache.put(CachedPolicy(DOMAIN, "1", policy, stale, stale + 86_400, now))
    events, recorder = event_log()
    hide(db_path, "sts_policies")
    try:
        loop = _refresh_policies(resolver, 0.01, events, first_retry=FIRST, max_retry=CAP)
        async with running(loop) as task:
            errors = await eventually(lambda: recorder.errors()[4:] and recorder.errors())
            assert_running(task)
            assert pauses(errors)[:5] == [0.01, 0.02, 0.04, 0.04, 0.04]
            assert errors[0].startswith(
                "policy refresh: policy cache unreadable: OperationalError: no such table"
            ), errors[0]
            assert world.policy_server.requests_for(DOMAIN) == []

            restore(db_path, "sts_policies")

            def refreshed() -> bool:
                entry = cache.get(DOMAIN)
                return entry is not None and entry.fetched_at > stale

            await eventually(refreshed)
            assert len(world.policy_server.requests_for(DOMAIN)) == 1
            assert_running(task)

            # A success resets the back-off: the next failure waits FIRST again.
            before = len(recorder.errors())
            hide(db_path, "sts_policies")
            await eventually(lambda: len(recorder.errors()) > before)
            assert pauses(recorder.errors()[before:])[0] == FIRST
            assert_running(task)
    finally:
        cache.close()


class FlakyResolver(PolicyResolver):
    """Our own resolver interface, whose refresh_due fails with `errors`, then works."""

    def __init__(self, cache: PolicyCache, errors: list[Exception]) -> None:
        super().__init__(cache, dns.asyncresolver.Resolver(configure=False), client_context(None))
        self.errors = errors
        self.calls = 0
        self.successes = 0

    async def refresh_due(self, now: float, recently_used: float) -> int:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        self.successes += 1
        return 0


async def test_refresh_loop_survives_store_and_state_directory_errors(tmp_path: Path) -> None:
    cache = PolicyCache(tmp_path / "state.sqlite3")
    failures: list[Exception] = [
        StoreUnavailable("queue store: database is locked"),
        sqlite3.OperationalError("disk I/O error"),
        OSError(errno.ENOSPC, "No space left on device"),
    ]
    resolver = FlakyResolver(cache, list(failures))
    events, recorder = event_log()
    try:
        loop = _refresh_policies(resolver, 0.01, events, first_retry=FIRST, max_retry=CAP)
        async with running(loop) as task:
            await eventually(lambda: resolver.successes >= 2)
            assert_running(task)
    finally:
        cache.close()
    errors = recorder.errors("policy refresh: ")
    assert [error.split(":")[1].strip() for error in errors] == [
        "StoreUnavailable",
        "OperationalError",
        "OSError",
    ]
    assert pauses(errors) == [0.01, 0.02, 0.04]


# -- TLSRPT: the counter flush and the daily report job (relay/reporting.py) ---------------


def _settings() -> ReportSettings:
    return ReportSettings(
        enabled=True,
        submitter="relay.test",
        organization="Relay Org",
        contact="tlsrpt@relay.test",
        sender="tlsrpt@relay.test",
        send_delay=0.0,
        dkim=None,
        dns_timeout=2.0,
        post_deadline=5.0,
    )


def _session(domain: str = REPORTED) -> Session:
    return Session(domain, DAY, AppliedPolicy(PolicyType.STS, ("mode: enforce",), ("mx1.x",)))


def _stored(store: ReportStore) -> int:
    return sum(count.count for count in store.counts(DAY))


@pytest.fixture
def report_store(tmp_path: Path) -> tuple[ReportStore, Path]:
    db_path = tmp_path / "relay.sqlite3"
    return ReportStore(db_path), db_path


async def test_flush_loop_keeps_counts_through_store_errors(
    report_store: tuple[ReportStore, Path],
) -> None:
    store, db_path = report_store
    counter = SessionCounter(store)
    events, recorder = event_log()
    for _ in range(3):
        counter.add(_session())
    hide(db_path, "tlsrpt_sessions")
    try:
        loop = flush_counts(counter, events, interval=0.01, first_retry=FIRST, max_retry=CAP)
        async with running(loop) as task:
            errors = await eventually(lambda: recorder.errors()[3:] and recorder.errors())
            assert_running(task)
            assert errors[0].startswith("tlsrpt counters: OperationalError: no such table")
            assert pauses(errors)[:4] == [0.01, 0.02, 0.04, 0.04]
            assert counter.pending == 3  # a failed write keeps its counts

            restore(db_path, "tlsrpt_sessions")
            await eventually(lambda: _stored(store) == 3)
            assert counter.pending == 0
            counter.add(_session())
            await eventually(lambda: _stored(store) == 4)
            assert_running(task)
    finally:
        store.close()


@pytest.mark.parametrize("table", ["tlsrpt_sessions", "tlsrpt_reports", "tlsrpt_deliveries"])
async def test_report_job_survives_store_errors_and_resumes(
    world: World, report_store: tuple[ReportStore, Path], table: str
) -> None:
    store, db_path = report_store
    store.add_counts({_session(): 2})
    events, recorder = event_log()
    reporter = Reporter(
        _settings(),
        store,
        resolver=lab_dns(world),
        ssl_context=client_context(str(world.pki.ca_file)),
        events=events,
        clock=lambda: AFTER_DAY,
    )
    hide(db_path, table)
    try:
        async with running(reporter.run(first_retry=FIRST, max_retry=CAP)) as task:
            errors = await eventually(lambda: recorder.errors()[3:] and recorder.errors())
            assert_running(task)
            assert errors[0].startswith("tlsrpt: OperationalError: no such table"), errors[0]
            assert pauses(errors)[:4] == [0.01, 0.02, 0.04, 0.04]

            restore(db_path, table)
            await eventually(lambda: store.reported_domains(DAY) == {REPORTED})
            assert_running(task)
    finally:
        store.close()


async def test_reporting_run_survives_a_failing_store(
    world: World, report_store: tuple[ReportStore, Path]
) -> None:
    # Both loops under Reporting.run's TaskGroup: neither error ends it (nor, through it,
    # the TaskGroup of `serve`).
    store, db_path = report_store
    events, recorder = event_log()
    counter = SessionCounter(store)
    reporter = Reporter(
        _settings(),
        store,
        resolver=lab_dns(world),
        ssl_context=client_context(str(world.pki.ca_file)),
        events=events,
        clock=lambda: AFTER_DAY,
    )
    reporting = Reporting(_settings(), store, counter, SessionRecorder(counter), reporter)
    # Sessions already stored (the report job's work) and one still in memory (the flush's);
    # after recovery either loop may go first.
    store.add_counts({_session(): 2})
    counter.add(_session())
    hide(db_path, "tlsrpt_sessions")
    try:
        loop = reporting.run(flush_interval=0.01, first_retry=FIRST, max_retry=CAP)
        async with running(loop) as task:
            await eventually(
                lambda: recorder.errors("tlsrpt counters: ")[1:] and recorder.errors("tlsrpt: ")
            )
            assert_running(task)
            restore(db_path, "tlsrpt_sessions")
            await eventually(lambda: _stored(store) == 3)
            await eventually(lambda: store.reported_domains(DAY) == {REPORTED})
            assert_running(task)
    finally:
        store.close()
