"""TLSRPT state on PostgreSQL (tlsrpt/store_postgres.py, issue 15): the store's behaviour
beside the SQLite one, and one RFC 8460 report per policy domain per day for the whole
cluster: counters of several nodes added in the database, reporters of several nodes
running the daily job at once against the lab's DNS and a real HTTPS endpoint (one POST,
one mail per report), retries sent by one node at a time, taken over when a node dies.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from policy.model import TlsRptResult
from policy.webpki import client_context
from relay.app import make_resolver
from relay.events import EventLog
from relay.reporting import Reporter, ReportSettings
from tests.integration.test_tlsrpt_report_delivery import (
    AFTER_DAY,
    DAY,
    Clock,
    Endpoint,
    MemoryQueue,
)
from tests.support.postgres import PostgresServer
from tests.support.world import World
from tlsrpt.counter import SessionCounter
from tlsrpt.model import AppliedPolicy, Delivery, DeliveryState, Failure, PolicyType, Session
from tlsrpt.store import ReportStorage, ReportStore
from tlsrpt.store_postgres import CLAIM_SECONDS, PostgresReportStore, ReportStoreError

STS = AppliedPolicy(PolicyType.STS, ("version: STSv1", "mode: enforce"), ("mx1.d.test",))
BAD = Failure(TlsRptResult.CERTIFICATE_EXPIRED, "mx1.d.test", "127.0.0.5")


def session(domain: str = "d.test", failure: Failure | None = None) -> Session:
    return Session(domain, DAY, STS, failure)


def delivery(report_id: str, uri: str = "https://rpt.d.test/", at: float = 0.0) -> Delivery:
    return Delivery(report_id, "d.test", DAY, uri, DeliveryState.PENDING, 0, at, at, None)


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], ReportStorage]]:
    opened: list[ReportStorage] = []
    if request.param == "sqlite":
        path = tmp_path / "relay.sqlite3"
        make: Callable[[], ReportStorage] = lambda: ReportStore(path)  # noqa: E731
    else:
        url = request.getfixturevalue("pg_url")
        make = lambda: PostgresReportStore(url)  # noqa: E731

    def open_one() -> ReportStorage:
        opened.append(make())
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def open_pg(pg_url: str) -> Iterator[Callable[..., PostgresReportStore]]:
    opened: list[PostgresReportStore] = []

    def open_one(**options: Any) -> PostgresReportStore:
        opened.append(PostgresReportStore(pg_url, **options))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


async def count(store: ReportStorage, domain: str, ok: int, failed: int) -> None:
    counter = SessionCounter(store)
    for _ in range(ok):
        counter.add(session(domain))
    for _ in range(failed):
        counter.add(session(domain, BAD))
    await counter.close()


def totals(store: ReportStorage, domain: str = "d.test") -> dict[bool, int]:
    return {(c.failure is None): c.count for c in store.counts(DAY, domain)}


# --- the same behaviour on both engines ------------------------------------------------------


async def test_counts_accumulate_and_a_report_is_made_once(
    open_store: Callable[[], ReportStorage],
) -> None:
    store = open_store()
    await count(store, "d.test", ok=2, failed=1)
    await count(store, "d.test", ok=1, failed=1)
    await count(store, "e.test", ok=1, failed=0)
    store.close()
    store = open_store()  # survives reopening
    assert totals(store) == {True: 3, False: 2}
    assert [c.domain for c in store.counts(DAY)] == ["d.test", "d.test", "e.test"]
    assert store.unreported("2026-03-01", DAY) == [(DAY, "d.test"), (DAY, "e.test")]
    assert store.save_report("id1", DAY, "d.test", b"gz", [delivery("id1")], 0.0)
    assert not store.save_report("id2", DAY, "d.test", b"other", [delivery("id2")], 0.0)
    assert store.unreported("2026-03-01", DAY) == [(DAY, "e.test")]
    assert store.reported_domains(DAY) == {"d.test"}
    assert [d.report_id for d in store.deliveries(DAY)] == ["id1"]
    store.prune("2026-03-05")
    assert store.counts(DAY) == []
    assert store.deliveries(DAY) == []


def test_a_failed_send_is_due_again_at_its_retry_time(
    open_store: Callable[[], ReportStorage],
) -> None:
    store = open_store()
    new = delivery("id1", at=10.0)
    assert store.save_report("id1", DAY, "d.test", b"gz", [new], 10.0)
    failed = Delivery("id1", "d.test", DAY, new.uri, DeliveryState.PENDING, 1, 10.0, 500.0, "500")
    store.update_delivery(failed)
    assert store.next_retry_at() == 500.0
    assert store.due_deliveries(499.0) == []
    assert store.due_deliveries(500.0) == [(failed, b"gz")]


# --- several nodes on one PostgreSQL database ------------------------------------------------


def test_counters_of_several_nodes_add_up(open_pg: Callable[..., PostgresReportStore]) -> None:
    nodes = [open_pg() for _ in range(4)]
    barrier = threading.Barrier(len(nodes))
    errors: list[BaseException] = []

    def flushes(store: PostgresReportStore) -> None:
        barrier.wait()
        try:
            for _ in range(10):
                store.add_counts({session(): 2, session(failure=BAD): 1, session("e.test"): 1})
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=flushes, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert totals(nodes[0]) == {True: 80, False: 40}
    assert totals(nodes[1], "e.test") == {True: 40}


def test_a_long_policy_is_counted(open_pg: Callable[..., PostgresReportStore]) -> None:
    # Session fields longer than a B-tree entry may be (policy strings, TLSA records).
    mx = tuple(f"mx{n}.{'x' * 50}.d.test" for n in range(200))
    long_policy = AppliedPolicy(PolicyType.STS, tuple(f"mx: {m}" for m in mx), mx)
    store = open_pg()
    store.add_counts({Session("d.test", DAY, long_policy): 1})
    store.add_counts({Session("d.test", DAY, long_policy): 1})
    ((counted,),) = [[c.count for c in store.counts(DAY)]]
    assert counted == 2


def test_a_retry_is_claimed_by_one_node_and_taken_over_when_it_dies(
    open_pg: Callable[..., PostgresReportStore],
) -> None:
    one, two = open_pg(), open_pg()
    assert one.save_report("id1", DAY, "d.test", b"gz", [delivery("id1", at=10.0)], 10.0)
    # The maker's new deliveries are its own: no other node sends them meanwhile.
    assert two.due_deliveries(10.0) == []
    assert two.next_retry_at() == 10.0 + CLAIM_SECONDS
    # ... and its claim ended when it recorded the result.
    failed = Delivery("id1", "d.test", DAY, "https://rpt.d.test/", DeliveryState.PENDING, 1, 10.0,
                      500.0, "HTTP 500")  # fmt: skip
    one.update_delivery(failed)
    assert two.next_retry_at() == 500.0
    ((claimed, _),) = one.due_deliveries(500.0)  # then node one dies
    assert claimed == failed
    assert two.due_deliveries(500.0) == []
    assert two.due_deliveries(500.0 + CLAIM_SECONDS - 1) == []
    ((taken, payload),) = two.due_deliveries(500.0 + CLAIM_SECONDS)
    assert (taken, payload) == (failed, b"gz")
    sent = Delivery("id1", "d.test", DAY, failed.uri, DeliveryState.SENT, 2, 10.0, None, None)
    late = Delivery("id1", "d.test", DAY, failed.uri, DeliveryState.FAILED, 9, 10.0, None, "x")
    one.update_delivery(late)  # the late result of a claim that ran out: the row is two's
    two.update_delivery(sent)
    assert one.deliveries(DAY) == [sent]


def test_nodes_claiming_due_retries_at_once_share_none(
    open_pg: Callable[..., PostgresReportStore],
) -> None:
    maker = open_pg(claim_seconds=0.0)  # its claims end at once: every row is due
    rows = [delivery(f"id{n}", uri=f"https://rpt.d.test/{n}") for n in range(12)]
    for n, row in enumerate(rows):
        assert maker.save_report(f"id{n}", f"2026-02-{n + 1:02d}", "d.test", b"gz", [row], 0.0)
    nodes = [open_pg() for _ in range(4)]
    barrier = threading.Barrier(len(nodes))
    claimed: list[str] = []
    lock = threading.Lock()

    def claim(store: PostgresReportStore) -> None:
        barrier.wait()
        got = store.due_deliveries(1.0)
        with lock:
            claimed.extend(d.uri for d, _ in got)

    threads = [threading.Thread(target=claim, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(r.uri for r in rows)  # each once


# --- reporters of several nodes against the lab ------------------------------------------------


@dataclass
class Node:
    reporter: Reporter
    store: PostgresReportStore


@pytest.fixture
async def endpoint(world: World) -> AsyncIterator[Endpoint]:
    ep = Endpoint(statuses=[])
    await ep.start("127.0.0.11", world.pki.server_context(["rpt.d.test"]))
    world.dns.add("rpt.d.test", "A", "127.0.0.11")
    yield ep
    await ep.stop()


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


@pytest.fixture
def make_node(
    world: World, open_pg: Callable[..., PostgresReportStore]
) -> Callable[[Clock, MemoryQueue], Node]:
    def make(clock: Clock, queue: MemoryQueue) -> Node:
        store = open_pg()
        reporter = Reporter(
            _settings(),
            store,
            resolver=make_resolver((world.dns.nameserver,), 2.0),
            ssl_context=client_context(str(world.pki.ca_file)),
            events=EventLog(io.StringIO()),
            queue=queue,  # type: ignore[arg-type]  # our own interface's put, in memory
            clock=clock,
        )
        return Node(reporter, store)

    return make


def _posted(endpoint: Endpoint) -> dict[str, dict[str, int]]:
    """The summary of each POSTed report, by policy domain."""
    out = {}
    for _line, _headers, body in endpoint.requests:
        report = json.loads(gzip.decompress(body))
        (entry,) = report["policies"]
        out[entry["policy"]["policy-domain"]] = entry["summary"]
    return out


async def test_nodes_running_the_daily_job_at_once_send_one_report_per_domain(
    world: World, endpoint: Endpoint, make_node: Callable[[Clock, MemoryQueue], Node]
) -> None:
    uri = f"https://rpt.d.test:{endpoint.port}/v1"
    world.dns.txt("_smtp._tls.d.test", f"v=TLSRPTv1; rua=mailto:reports@d.test,{uri}")
    world.dns.txt("_smtp._tls.e.test", f"v=TLSRPTv1; rua={uri}")
    clock, queue = Clock(AFTER_DAY), MemoryQueue()
    nodes = [make_node(clock, queue) for _ in range(3)]
    # Every node delivered to d.test: its counters add up in one report.
    await count(nodes[0].store, "d.test", ok=2, failed=1)
    await count(nodes[1].store, "d.test", ok=3, failed=0)
    await count(nodes[2].store, "e.test", ok=1, failed=0)

    await asyncio.gather(*(node.reporter.run_due() for node in nodes))

    assert len(endpoint.requests) == 2
    assert _posted(endpoint) == {
        "d.test": {"total-successful-session-count": 5, "total-failure-session-count": 1},
        "e.test": {"total-successful-session-count": 1, "total-failure-session-count": 0},
    }
    assert [m.recipients for m in queue.messages] == [("reports@d.test",)]
    states = {(d.domain, d.uri): d.state for d in nodes[1].store.deliveries(DAY)}
    assert states == {
        ("d.test", "mailto:reports@d.test"): DeliveryState.QUEUED,
        ("d.test", uri): DeliveryState.SENT,
        ("e.test", uri): DeliveryState.SENT,
    }
    await asyncio.gather(*(node.reporter.run_due() for node in nodes))  # the next runs
    assert len(endpoint.requests) == 2
    assert len(queue.messages) == 1


async def test_nodes_retrying_at_once_send_once(
    world: World, endpoint: Endpoint, make_node: Callable[[Clock, MemoryQueue], Node]
) -> None:
    endpoint.statuses = [500]
    world.dns.txt("_smtp._tls.d.test", f"v=TLSRPTv1; rua=https://rpt.d.test:{endpoint.port}/")
    clock, queue = Clock(AFTER_DAY), MemoryQueue()
    one, two = make_node(clock, queue), make_node(clock, queue)
    await count(one.store, "d.test", ok=1, failed=0)
    (first,) = await one.reporter.send_day(DAY)
    assert first.state is DeliveryState.PENDING
    retry_at = two.store.next_retry_at()
    assert retry_at is not None
    clock.now = retry_at
    retried = await asyncio.gather(one.reporter.retry_due(), two.reporter.retry_due())
    assert sorted(len(done) for done in retried) == [0, 1]
    assert len(endpoint.requests) == 2
    ((stored,),) = [one.store.deliveries(DAY)]
    assert (stored.state, stored.attempts) == (DeliveryState.SENT, 2)


# --- the server stopped, then started --------------------------------------------------------


async def test_counts_written_while_the_server_is_down_wait_in_memory(
    postgres: PostgresServer, open_pg: Callable[..., PostgresReportStore]
) -> None:
    store = open_pg(reconnect_pause=0.0)
    counter = SessionCounter(store)
    counter.add(session())
    await counter.flush()
    counter.add(session())
    counter.add(session(failure=BAD))
    postgres.stop()
    try:
        with pytest.raises(ReportStoreError, match=r"PostgreSQL 127\.0\.0\.1"):
            await counter.flush()
        assert counter.pending == 2  # kept for the next flush
        with pytest.raises(ReportStoreError):
            store.unreported("2026-03-01", DAY)
    finally:
        postgres.start()
    await counter.flush()
    assert totals(store) == {True: 2, False: 1}
