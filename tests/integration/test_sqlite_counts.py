"""SqliteStore at scale, on real SQLite files: the counters a metrics scrape reads (schema 6)
stay equal to a count of the rows through every kind of change, a schema 5 store is
migrated with its counts, and every statement the relay runs per lease poll, per record,
per scrape and at start-up finds its rows through an index, never by scanning the queue.

(Plans, not timings: without ANALYZE, SQLite plans a query the same way whatever the
table's size, so what these small stores show holds at a million recipients;
bench/queue_scale.py has the figures.)
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mailqueue.admin import AdminAction, Pick, Selection
from mailqueue.model import NewMessage, RcptState, RecipientResult
from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite import SqliteStore
from mailqueue.sqlite_schema import SCHEMA_VERSION
from tests.support.queue_store import Clock, Opener, store_opener

SCHEDULE = RetrySchedule((300.0, 600.0, 1200.0))
LIFETIME = 86400.0
# What counts() returned by scanning the rows before schema 6: the reference.
_SCANNED = (
    "SELECT COALESCE(SUM(held <> 2 AND state = 'queued'), 0),"
    " COALESCE(SUM(held <> 2 AND state = 'deferred'), 0),"
    " COALESCE(SUM(held <> 2 AND state = 'sent'), 0),"
    " COALESCE(SUM(held <> 2 AND state = 'bounced'), 0),"
    " COALESCE(SUM(held = 1), 0), COUNT(*),"
    " (SELECT COUNT(*) FROM queue_messages) FROM queue_recipients"
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "relay.db"


@pytest.fixture
async def open_store(db: Path, clock: Clock) -> AsyncIterator[Opener]:
    async with store_opener(db, clock, schedule=SCHEDULE, lifetime=LIFETIME) as opener:
        yield opener


def scanned(db: Path) -> dict[str, int]:
    """The counts by a full scan of the rows."""
    conn = sqlite3.connect(db)
    try:
        q, d, s, b, held, total, messages = conn.execute(_SCANNED).fetchone()
    finally:
        conn.close()
    out = {"queued": q, "deferred": d, "sent": s, "bounced": b, "held": held}
    return out | {"set_aside": total - q - d - s - b, "messages": messages}


def message(*rcpts: str) -> NewMessage:
    return NewMessage("app@src.test", rcpts, b"Subject: t\r\n\r\nhello\r\n")


async def assert_counted(store: SqliteStore, db: Path) -> dict[str, int]:
    counts = await store.counts()
    assert counts == scanned(db)
    return counts


async def test_counters_follow_every_change_to_the_queue(
    open_store: Opener, db: Path, clock: Clock
) -> None:
    store = await open_store()
    assert await assert_counted(store, db) == dict.fromkeys(
        ("queued", "deferred", "sent", "bounced", "held", "set_aside", "messages"), 0
    )
    ids = [
        await store.put(message(f"a{i}@one.test", f"b{i}@one.test", "c@two.test")) for i in range(6)
    ]
    assert (await assert_counted(store, db))["queued"] == 18

    leases = await store.lease_due("w", 20, 60)  # leasing changes no counter
    await assert_counted(store, db)
    by_key = {(ls.queue_id, ls.domain): ls for ls in leases}
    sent = by_key[ids[0], "one.test"]
    await store.record(sent, [RecipientResult(r.address, RcptState.SENT) for r in sent.recipients])
    bounced = by_key[ids[1], "two.test"]
    dsn = NewMessage("", ("app@src.test",), b"Subject: failed\r\n\r\nno\r\n")
    await store.record(bounced, [RecipientResult("c@two.test", RcptState.BOUNCED, "550")], dsn)
    deferred = by_key[ids[2], "one.test"]
    results = [RecipientResult(r.address, RcptState.DEFERRED, "451") for r in deferred.recipients]
    await store.record(deferred, results)
    renewed = await store.renew(by_key[ids[3], "one.test"], clock.now + 120)
    assert renewed is not None
    await store.release(renewed)
    counts = await assert_counted(store, db)
    assert (counts["sent"], counts["bounced"], counts["deferred"]) == (2, 1, 2)
    assert counts["messages"] == 7  # the DSN too

    assert await store.hold(ids[4])
    assert (await assert_counted(store, db))["held"] == 3
    assert await store.release_hold(ids[4])
    await store.flush()
    assert await store.delete(ids[5])
    await assert_counted(store, db)

    # Bulk administration: set-based statements over whole selections.
    everything = Selection(everything=True)
    await store.administer(AdminAction.HOLD, everything, operator="t")
    assert (await assert_counted(store, db))["held"] > 0
    await store.administer(AdminAction.RELEASE, Selection(state=Pick.HELD), operator="t")
    await store.administer(AdminAction.BOUNCE, Selection(domain="two.test"), operator="t")
    await assert_counted(store, db)

    # Another process's store on the same file, and writes by hand (the triggers see them).
    other = await open_store()
    await other.put(message("d@three.test"))
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("UPDATE queue_recipients SET state = 'garbage' WHERE address = 'a2@one.test'")
    conn.execute("DELETE FROM queue_messages WHERE queue_id = ?", (ids[3],))  # cascades
    conn.commit()
    conn.close()
    clock.now += 10_000
    await store.lease_due("w", 20, 60)  # sets the unreadable row aside
    assert await store.counts() == await assert_counted(other, db)
    assert (await store.counts())["set_aside"] == 1

    await store.administer(AdminAction.DELETE, everything, operator="t")
    assert await assert_counted(store, db) == dict.fromkeys(
        ("queued", "deferred", "sent", "bounced", "held", "set_aside", "messages"), 0
    )


# Schema 5 as that version of sqlite_schema.py created it (no counters, no triggers).
_V5_SCHEMA = (
    "CREATE TABLE queue_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "INSERT INTO queue_meta VALUES ('schema_version', '5')",
    "CREATE TABLE queue_messages (id INTEGER PRIMARY KEY, queue_id TEXT NOT NULL UNIQUE,"
    " sender TEXT NOT NULL, received_at REAL NOT NULL, size INTEGER NOT NULL,"
    " held INTEGER NOT NULL DEFAULT 0, client TEXT NOT NULL DEFAULT '', data BLOB NOT NULL,"
    " dsn TEXT, requiretls INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE queue_recipients (id INTEGER PRIMARY KEY, message_id INTEGER NOT NULL"
    " REFERENCES queue_messages(id) ON DELETE CASCADE, address TEXT NOT NULL,"
    " domain TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
    " next_attempt_at REAL, last_error TEXT, lease_owner TEXT, lease_until REAL,"
    " held INTEGER NOT NULL DEFAULT 0, delay_notified INTEGER NOT NULL DEFAULT 0,"
    " UNIQUE (message_id, address))",
    "CREATE INDEX queue_recipients_due ON queue_recipients(next_attempt_at)"
    " WHERE state IN ('queued', 'deferred') AND held = 0",
    "CREATE INDEX queue_recipients_leased ON queue_recipients(lease_owner)"
    " WHERE lease_owner IS NOT NULL",
    "CREATE TABLE queue_receipts (queue_id TEXT NOT NULL, domain TEXT NOT NULL,"
    " lease_owner TEXT NOT NULL, lease_until REAL NOT NULL, recorded_at REAL NOT NULL,"
    " applied TEXT NOT NULL, lost TEXT NOT NULL, dsn_queue_id TEXT,"
    " PRIMARY KEY (queue_id, domain, lease_owner, lease_until)) WITHOUT ROWID",
    "CREATE INDEX queue_receipts_age ON queue_receipts(recorded_at)",
    "CREATE TABLE queue_admin_journal (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,"
    " action TEXT NOT NULL, queue_id TEXT, selection TEXT NOT NULL, matched INTEGER NOT NULL,"
    " count INTEGER NOT NULL, operator TEXT NOT NULL)",
    "INSERT INTO queue_messages (id, queue_id, sender, received_at, size, held, data) VALUES"
    " (1, 'OLDMESSAGE01', 'old@src.test', 1700000000.0, 5, 0, x'6f6c640d0a'),"
    " (2, 'OLDMESSAGE02', 'old@src.test', 1700000000.0, 5, 1, x'6f6c640d0a')",
    "INSERT INTO queue_recipients (message_id, address, domain, state, attempts,"
    " next_attempt_at, lease_owner, lease_until, held) VALUES"
    " (1, 'a@one.test', 'one.test', 'deferred', 2, 1700000300.0, NULL, NULL, 0),"
    " (1, 'b@one.test', 'one.test', 'sent', 1, NULL, NULL, NULL, 0),"
    " (1, 'c@two.test', 'two.test', 'queued', 0, 1700000900.0, 'dead:1:x', 1700000900.0, 0),"
    " (1, 'd@two.test', 'two.test', 'queued', 0, 1700000000.0, NULL, NULL, 2),"
    " (1, 'e@two.test', 'two.test', 'unknown', 0, 1700000000.0, NULL, NULL, 0),"
    " (2, 'f@three.test', 'three.test', 'queued', 0, 1700000000.0, NULL, NULL, 1)",
)


async def test_version_5_store_is_migrated_with_its_counts(
    open_store: Opener, db: Path, clock: Clock
) -> None:
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db)
    for statement in _V5_SCHEMA:
        conn.execute(statement)
    conn.commit()
    conn.close()
    before = scanned(db)

    store = await open_store()
    assert store.migrated_from == 5
    assert store.recovered_leases == 1
    counts = await store.counts()
    assert counts == before
    assert counts == {
        "queued": 2,  # c (lease recovered), f (held)
        "deferred": 1,
        "sent": 1,
        "bounced": 0,
        "held": 1,
        "set_aside": 2,  # d, and e in a state this code does not know
        "messages": 2,
    }
    # The migrated counters go on following changes...
    clock.now += 1000
    leases = {ls.domain: ls for ls in await store.lease_due("w", 10, 60)}
    await store.record(leases["one.test"], [RecipientResult("a@one.test", RcptState.SENT)])
    await store.put(message("g@four.test"))
    await assert_counted(store, db)
    await store.close()
    # ... and a later open neither migrates nor counts again.
    reopened = await open_store()
    assert reopened.migrated_from == SCHEMA_VERSION
    assert await reopened.counts() == scanned(db)


async def test_stores_opening_a_version_5_file_together_migrate_it_once(
    open_store: Opener, db: Path
) -> None:
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db)
    for statement in _V5_SCHEMA:
        conn.execute(statement)
    conn.commit()
    conn.close()
    before = scanned(db)
    first, second = await asyncio.gather(open_store(), open_store())  # two relay processes
    assert {first.migrated_from, second.migrated_from} == {5, SCHEMA_VERSION}
    assert await first.counts() == await second.counts() == before


class _Traced(SqliteStore):
    """Notes every SQL statement its connections run."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.seen: list[str] = []

    def _connect(self, *, readonly: bool) -> sqlite3.Connection:
        conn = super()._connect(readonly=readonly)
        conn.set_trace_callback(self.seen.append)
        return conn


_QUEUE_SCAN = re.compile(r"^SCAN (queue_(?!meta\b|counts\b)\w+)")


async def test_what_the_relay_runs_uses_indexes_only(
    open_store: Opener, db: Path, clock: Clock
) -> None:
    crashed = await open_store()
    for i in range(5):
        await crashed.put(message(f"a{i}@one.test", f"b{i}@two.test"))
    await crashed.lease_due("dead", 2, 60)
    await crashed.close()  # its leases stay: the next sole opener recovers them

    store = await open_store(cls=_Traced)
    assert isinstance(store, _Traced)
    assert store.recovered_leases == 2
    await store.put(message("c@three.test"))
    leases = await store.lease_due("w", 5, 60)
    await store.next_due_at()
    results = [RecipientResult(r.address, RcptState.SENT) for r in leases[0].recipients]
    await store.record(leases[0], results)
    dsn = NewMessage("", ("app@src.test",), b"Subject: failed\r\n\r\nno\r\n")
    results = [RecipientResult(r.address, RcptState.BOUNCED, "550") for r in leases[1].recipients]
    await store.record(leases[1], results, dsn)
    results = [RecipientResult(r.address, RcptState.DEFERRED, "451") for r in leases[2].recipients]
    await store.record(leases[2], results)
    renewed = await store.renew(leases[3], clock.now + 120)
    assert renewed is not None
    await store.release(renewed)
    await store.read_data(leases[4].queue_id)
    await store.counts()
    await store.writable()
    await store.journal(await store.journal_logged())

    statements = {s for s in store.seen if re.match(r"\s*(SELECT|INSERT|UPDATE|DELETE)", s)}
    conn = sqlite3.connect(db)
    try:
        scans = {
            sql: detail
            for sql in statements
            for *_, detail in conn.execute(f"EXPLAIN QUERY PLAN {sql}")
            if _QUEUE_SCAN.match(str(detail))
        }
    finally:
        conn.close()
    assert scans == {}
    assert any("lease_owner IS NOT NULL" in s for s in statements)  # the recovery ran
    assert any("queue_counts" in s for s in statements)
