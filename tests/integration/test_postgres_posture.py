"""The posture aggregates on PostgreSQL (posture/store_postgres.py, issue 15) beside the
SQLite engine: the same PostureStore behaviour on both (mirroring tests/unit/test_posture.py),
and what several nodes on one database need: their counts added up, a waiting entry
keeping the earliest `since` any node saw, the report command reading without writing, and
the server stopped then started again. A real server, never a mock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from posture.model import (
    Attempt,
    Cause,
    Cell,
    Figures,
    Mechanism,
    RecipientFigure,
    Status,
    Waiting,
    utc_day,
)
from posture.store import PostureStore, SqlitePostureStore
from posture.store_postgres import PostgresPostureStore, PostureStoreError
from posture.tally import PostureTally
from tests.support.postgres import PostgresServer

DAY = 86400.0
NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
TODAY = utc_day(NOW)
DELIVERED_TLS = RecipientFigure(Status.DELIVERED, Mechanism.STS_ENFORCE, "TLSv1.3", True)
STUCK = RecipientFigure(
    Status.DEFERRED, Mechanism.STS_ENFORCE, "TLSv1.3", False, Cause.POLICY, "certificate-expired"
)
SENT = Cell(TODAY, "d.test", Status.DELIVERED, Mechanism.STS_ENFORCE, "TLSv1.3", True)


def attempt(*figures: RecipientFigure, key: str = "q1 d.test", at: float = NOW) -> Attempt:
    return Attempt(key, key.split()[1], at, figures)


def waiting(key: str, since: float, last_at: float) -> Waiting:
    return Waiting(key, "e.test", 1, since, last_at, Mechanism.DANE, "dane-required")


Opener = Callable[..., PostureStore]


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    opened: list[PostureStore] = []
    if request.param == "sqlite":
        path = tmp_path / "relay.sqlite3"

        def make(**options: Any) -> PostureStore:
            return SqlitePostureStore(path, **options)
    else:
        url = request.getfixturevalue("pg_url")

        def make(**options: Any) -> PostureStore:
            return PostgresPostureStore(url, **options)

    def open_one(**options: Any) -> PostureStore:
        opened.append(make(**options))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


# --- the same behaviour on both engines ------------------------------------------------------


async def test_the_tally_writes_in_batches_and_a_new_run_knows_what_waits(
    open_store: Opener,
) -> None:
    clock = [NOW]
    tally = PostureTally(open_store(), clock=lambda: clock[0])
    tally.add(attempt(DELIVERED_TLS))
    tally.add(attempt(DELIVERED_TLS, key="q2 d.test"))
    tally.add(attempt(STUCK, key="q3 e.test"))
    store = open_store()
    assert store.cells(TODAY, TODAY) == []  # nothing written yet
    await tally.flush()
    assert dict(store.cells(TODAY, TODAY))[SENT] == Figures(2, 2)
    assert [w.domain for w in store.waiting()] == ["e.test"]

    again = PostureTally(store, clock=lambda: clock[0])
    again.load()
    assert [w.key for w in again.waiting()] == ["q3 e.test"]
    clock[0] = NOW + 3600
    again.add(attempt(DELIVERED_TLS, key="q3 e.test", at=clock[0]))
    await again.flush()
    assert store.waiting() == []


async def test_stale_waiting_entries_and_old_days_are_pruned(open_store: Opener) -> None:
    clock = [NOW - 100 * DAY]
    store = open_store()
    tally = PostureTally(store, retention_days=92, stale_after=2 * DAY, clock=lambda: clock[0])
    tally.add(attempt(DELIVERED_TLS, at=clock[0]))
    tally.add(attempt(STUCK, key="q9 e.test", at=clock[0]))
    await tally.flush()
    clock[0] = NOW
    await tally.flush(prune=True)
    assert store.cells("2000-01-01", TODAY) == []
    assert store.waiting() == []


def test_two_writers_add_up_and_keep_the_earliest_wait(open_store: Opener) -> None:
    one, two = open_store(), open_store()
    one.write({SENT: Figures(1, 2)}, {"q1 e.test": waiting("q1 e.test", NOW, NOW)})
    # The other node saw the wait begin earlier, and attempted it later.
    two.write({SENT: Figures(2, 3)}, {"q1 e.test": waiting("q1 e.test", NOW - 600, NOW + 60)})
    one.write({}, {"q1 e.test": waiting("q1 e.test", NOW + 120, NOW + 120)})
    assert one.cells(TODAY, TODAY) == [(SENT, Figures(3, 5))]
    ((entry,),) = [two.waiting()]
    assert (entry.since, entry.last_at) == (NOW - 600, NOW + 120)
    two.write({}, {"q1 e.test": None})
    assert one.waiting() == []


# --- PostgreSQL --------------------------------------------------------------------------------


def test_nodes_flushing_at_once_add_up(pg_url: str) -> None:
    nodes = [PostgresPostureStore(pg_url) for _ in range(4)]
    barrier = threading.Barrier(len(nodes))
    errors: list[BaseException] = []
    other = Cell(TODAY, "e.test", Status.DEFERRED, Mechanism.DANE, "", False, "policy")

    def flushes(n: int, store: PostureStore) -> None:
        barrier.wait()
        try:
            for i in range(10):
                keys = {f"q{j} e.test": waiting(f"q{j} e.test", NOW + n, NOW + i) for j in range(5)}
                store.write({SENT: Figures(1, 1), other: Figures(1, 2)}, keys)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=flushes, args=item) for item in enumerate(nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        assert dict(nodes[0].cells(TODAY, TODAY)) == {SENT: Figures(40, 40), other: Figures(40, 80)}
        assert {w.since for w in nodes[1].waiting()} == {NOW}
    finally:
        for store in nodes:
            store.close()


def test_corrupt_rows_are_skipped(pg_url: str) -> None:
    store = PostgresPostureStore(pg_url)
    try:
        with psycopg.connect(pg_url, autocommit=True) as raw:
            raw.execute(
                "INSERT INTO posture_daily VALUES (%s, 'x.test', 'delivered', 'carrier-pigeon',"
                " '', false, '', 1, 1)",
                (TODAY,),
            )
            raw.execute(
                "INSERT INTO posture_waiting VALUES ('k', 'x.test', 1, 1.0, 2.0, 'owl', NULL)"
            )
        assert store.cells(TODAY, TODAY) == []
        assert store.waiting() == []
    finally:
        store.close()


def test_the_report_reads_without_writing(pg_url: str) -> None:
    reader = PostgresPostureStore(pg_url, readonly=True)  # a relay that never counted
    try:
        assert reader.cells("2000-01-01", TODAY) == []
        assert reader.waiting() == []
        with pytest.raises(PostureStoreError):
            reader.write({SENT: Figures(1, 1)}, {})
    finally:
        reader.close()
    with psycopg.connect(pg_url, autocommit=True) as raw:
        assert raw.execute("SELECT to_regclass('posture_daily')").fetchone() == (None,)
    writer = PostgresPostureStore(pg_url)
    writer.write({SENT: Figures(1, 1)}, {})
    writer.close()
    reader = PostgresPostureStore(pg_url, readonly=True)
    try:
        assert reader.cells(TODAY, TODAY) == [(SENT, Figures(1, 1))]
        with pytest.raises(PostureStoreError, match="read-only"):
            reader.write({SENT: Figures(1, 1)}, {})
    finally:
        reader.close()


async def test_the_server_stopped_then_started(postgres: PostgresServer, pg_url: str) -> None:
    store = PostgresPostureStore(pg_url, reconnect_pause=0.0)
    tally = PostureTally(store, clock=lambda: NOW)
    try:
        tally.add(attempt(DELIVERED_TLS))
        await tally.flush()
        tally.add(attempt(DELIVERED_TLS, key="q2 d.test"))
        postgres.stop()
        try:
            with pytest.raises(PostureStoreError):
                await tally.flush()
            assert tally.pending == 1  # kept for the next flush
            with pytest.raises(PostureStoreError):
                store.waiting()
        finally:
            postgres.start()
        await tally.flush()
        assert store.cells(TODAY, TODAY) == [(SENT, Figures(2, 2))]
    finally:
        store.close()
