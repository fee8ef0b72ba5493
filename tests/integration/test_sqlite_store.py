"""SqliteStore against real SQLite files: durability, group commit, leases, admin, failures."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from mailqueue import new_queue_id
from mailqueue.ids import is_queue_id
from mailqueue.model import (
    DsnRequest,
    Lease,
    NewMessage,
    RcptState,
    RecipientResult,
    Recorded,
)
from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite import SqliteStore
from mailqueue.sqlite_schema import SCHEMA_VERSION
from mailqueue.store import MessageNotFound, StoreUnavailable
from mailqueue.writer import GroupCommitWriter
from tests.support.queue_store import T0, Clock, Opener, store_opener

SCHEDULE = RetrySchedule((300.0, 600.0, 1200.0))
LIFETIME = 86400.0


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


@pytest.fixture
async def store(open_store: Opener) -> SqliteStore:
    return await open_store()


def message(*rcpts: str, data: bytes = b"Subject: t\r\n\r\nhello\r\n") -> NewMessage:
    return NewMessage(sender="app@src.test", recipients=rcpts, data=data, client="127.0.0.1")


def keys(leases: list[Lease]) -> list[tuple[str, str, str]]:
    return [(ls.queue_id, ls.domain, r.address) for ls in leases for r in ls.recipients]


async def test_requiretls_is_kept_with_the_message_across_reopening(
    open_store: Opener, clock: Clock
) -> None:
    # RTLS-08: the REQUIRETLS flag is durable; retries and restarts keep it.
    store = await open_store()
    flagged = await store.put(replace(message("a@one.test"), requiretls=True))
    plain = await store.put(message("b@two.test"))
    (first, second) = sorted(await store.lease_due("w", 10, 60), key=lambda ls: ls.domain)
    assert (first.queue_id, first.requiretls) == (flagged, True)
    assert (second.queue_id, second.requiretls) == (plain, False)
    await store.record(first, [RecipientResult("a@one.test", RcptState.DEFERRED, "4.7.30")])
    await store.close()
    clock.now += 3600
    reopened = await open_store()
    leases = {ls.queue_id: ls for ls in await reopened.lease_due("w", 10, 60)}
    assert leases[flagged].requiretls is True


async def test_record_sent_and_bounced_deletes_message(store: SqliteStore) -> None:
    qid = await store.put(message("a@one.test", "b@one.test"))
    (lease,) = await store.lease_due("w", 10, 60)
    assert lease.owner == "w"
    recorded = await store.record(
        lease,
        [
            RecipientResult("a@one.test", RcptState.SENT),
            RecipientResult("b@one.test", RcptState.BOUNCED, "550 5.1.1 no such user"),
        ],
    )
    assert recorded == Recorded(applied=("a@one.test", "b@one.test"), lost=(), dsn_queue_id=None)
    assert await store.get_message(qid) is None
    with pytest.raises(MessageNotFound):
        await store.read_data(qid)
    assert (await store.counts())["messages"] == 0


async def test_record_partial_keeps_final_rows_until_all_final(
    store: SqliteStore, clock: Clock
) -> None:
    qid = await store.put(message("a@one.test", "b@one.test"))
    (lease,) = await store.lease_due("w", 10, 60)
    clock.now += 5
    await store.record(
        lease,
        [
            RecipientResult("a@one.test", RcptState.SENT),
            RecipientResult("b@one.test", RcptState.DEFERRED, "451 4.3.0 try later"),
        ],
    )
    record = await store.get_message(qid)
    assert record is not None
    a, b = record.recipients
    assert (a.state, a.attempts, a.next_attempt_at) == (RcptState.SENT, 1, None)
    assert b.state is RcptState.DEFERRED
    assert b.attempts == 1
    assert b.last_error == "451 4.3.0 try later"
    assert b.next_attempt_at is not None
    assert 300 * 0.9 <= b.next_attempt_at - clock.now <= 300 * 1.1
    # Not due before the schedule says so, due after.
    assert await store.lease_due("w", 10, 60) == []
    clock.now = b.next_attempt_at
    (again,) = await store.lease_due("w", 10, 60)
    assert [(r.address, r.attempts) for r in again.recipients] == [("b@one.test", 1)]
    clock.now += 1
    recorded = await store.record(again, [RecipientResult("b@one.test", RcptState.DEFERRED, "451")])
    assert recorded.applied == ("b@one.test",)
    record = await store.get_message(qid)
    assert record is not None
    assert record.recipients[1].attempts == 2
    assert record.recipients[1].next_attempt_at is not None
    assert 600 * 0.9 <= record.recipients[1].next_attempt_at - clock.now <= 600 * 1.1


async def test_leases_are_exclusive_between_owners_and_stores(open_store: Opener) -> None:
    node_a = await open_store()
    node_b = await open_store()  # a second connection, as a second node would have
    rcpts = ("a@one.test", "b@two.test", "c@three.test")
    await asyncio.gather(*(node_a.put(message(*rcpts)) for _ in range(40)))
    results = await asyncio.gather(
        *(
            store.lease_due(owner, limit=7, lease_seconds=60)
            for _ in range(10)
            for store, owner in ((node_a, "a"), (node_b, "b"))
        )
    )
    leased = [k for leases in results for k in keys(leases)]
    assert len(leased) == len(set(leased)) == 120
    assert all(leases for leases in results[:2])


async def test_expired_lease_goes_to_another_owner(store: SqliteStore, clock: Clock) -> None:
    qid = await store.put(message("a@one.test"))
    (first,) = await store.lease_due("dead-worker", 10, 60)
    clock.now += 59
    assert await store.lease_due("w2", 10, 60) == []
    clock.now += 1
    (second,) = await store.lease_due("w2", 10, 60)
    assert second.queue_id == qid
    assert second.recipients[0].attempts == 0
    assert second.until == clock.now + 60
    # The dead worker's late release must not free the new owner's lease.
    await store.release(first)
    assert await store.lease_due("w3", 10, 60) == []


async def test_flush_hold_release_delete(store: SqliteStore, clock: Clock) -> None:
    qid = await store.put(message("a@one.test"))
    other = await store.put(message("b@two.test"))
    for lease in await store.lease_due("w", 10, 60):
        await store.record(
            lease, [RecipientResult(lease.recipients[0].address, RcptState.DEFERRED)]
        )
    assert await store.lease_due("w", 10, 60) == []
    assert await store.flush(qid) == 1
    (lease,) = await store.lease_due("w", 10, 60)
    assert lease.queue_id == qid
    await store.release(lease)

    assert await store.hold(qid) is True
    assert await store.flush() == 1  # only `other`: held messages stay put
    assert [ls.queue_id for ls in await store.lease_due("w", 10, 60)] == [other]
    record = await store.get_message(qid)
    assert record is not None
    assert record.held
    assert (await store.counts())["held"] == 1
    assert await store.release_hold(qid) is True
    (leased,) = await store.lease_due("w", 10, 60)
    assert leased.queue_id == qid

    assert await store.delete(qid) is True
    assert await store.delete(qid) is False
    assert await store.hold(qid) is False
    assert await store.release_hold(qid) is False
    # The worker's report for a message an operator deleted changes nothing: it is lost.
    recorded = await store.record(leased, [RecipientResult("a@one.test", RcptState.SENT)])
    assert recorded == Recorded(applied=(), lost=("a@one.test",))
    assert [m.queue_id for m in await store.list_messages()] == [other]


async def test_restart_keeps_everything(open_store: Opener, clock: Clock, db: Path) -> None:
    store = await open_store()
    qid = await store.put(message("a@one.test", "b@two.test", data=b"x" * 100_000))
    await store.lease_due("w", 1, 60)
    await store.close()

    reopened = await open_store()
    assert reopened.recovered_leases == 1  # left by the "previous process"
    assert await reopened.read_data(qid) == b"x" * 100_000
    leases = await reopened.lease_due("w", 10, 60)
    assert sorted(ls.domain for ls in leases) == ["one.test", "two.test"]


async def test_admin_beside_a_running_relay_steals_no_lease(open_store: Opener) -> None:
    relay = await open_store()
    qid = await relay.put(message("a@one.test"))
    await relay.lease_due("relay-worker", 10, 60)
    admin = await open_store()  # the CLI opening its own store while the relay runs
    assert admin.recovered_leases == 0
    assert await admin.lease_due("other", 10, 60) == []
    assert await admin.hold(qid) is True
    record = await relay.get_message(qid)
    assert record is not None
    assert record.held


async def test_due_work_is_found_through_the_partial_index(store: SqliteStore, db: Path) -> None:
    with sqlite3.connect(db) as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT message_id, domain FROM queue_recipients"
            " WHERE state IN ('queued', 'deferred') AND held = 0"
            " AND next_attempt_at <= ? ORDER BY next_attempt_at",
            (T0,),
        ).fetchall()
    conn.close()
    assert "queue_recipients_due" in " ".join(str(row[-1]) for row in plan)


async def test_shares_the_file_with_other_tables(open_store: Opener, db: Path) -> None:
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE sts_policies (domain TEXT PRIMARY KEY, body TEXT)")
    conn.execute("INSERT INTO sts_policies VALUES ('one.test', 'version: STSv1')")
    conn.execute("PRAGMA user_version = 7")
    conn.commit()
    conn.close()
    store = await open_store()
    await store.put(message("a@one.test"))
    await store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT * FROM sts_policies").fetchall() == [("one.test", "version: STSv1")]
    assert conn.execute("PRAGMA user_version").fetchone() == (7,)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


async def test_newer_schema_is_refused(open_store: Opener, db: Path) -> None:
    await (await open_store()).close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE queue_meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreUnavailable, match="schema version 99"):
        await open_store()


async def test_dsn_parameters_and_delay_flag_survive_until_delivery(
    open_store: Opener, clock: Clock
) -> None:
    dsn = DsnRequest(
        ret="HDRS",
        envid="env-1 ü",
        notify={"a@one.test": ("SUCCESS", "DELAY"), "b@one.test": ("NEVER",)},
        orcpt={"a@one.test": "rfc822;A@one.test"},
    )
    store = await open_store()
    qid = await store.put(
        NewMessage("app@src.test", ("a@one.test", "b@one.test"), b"x\r\n", dsn=dsn)
    )
    plain = await store.put(message("c@two.test"))
    await store.close()
    store = await open_store()  # from disk, not from memory
    leases = {ls.queue_id: ls for ls in await store.lease_due("w", 10, 60)}
    assert leases[qid].dsn == dsn
    assert leases[plain].dsn == DsnRequest()
    assert [r.delay_notified for r in leases[qid].recipients] == [False, False]
    await store.record(
        leases[qid],
        [
            RecipientResult("a@one.test", RcptState.DEFERRED, "451 later", delay_notified=True),
            RecipientResult("b@one.test", RcptState.DEFERRED, "451 later"),
        ],
    )
    clock.now += 10_000
    (again,) = [ls for ls in await store.lease_due("w", 10, 60) if ls.queue_id == qid]
    flags = {r.address: (r.attempts, r.delay_notified) for r in again.recipients}
    assert flags == {"a@one.test": (1, True), "b@one.test": (1, False)}
    # The flag stays set: a later result without it does not clear it.
    await store.record(again, [RecipientResult("a@one.test", RcptState.DEFERRED, "451 again")])
    clock.now += 10_000
    (third,) = [ls for ls in await store.lease_due("w", 10, 60) if ls.queue_id == qid]
    assert {r.address: r.delay_notified for r in third.recipients}["a@one.test"] is True


async def test_submitter_chosen_queue_id_is_used_and_never_reused(store: SqliteStore) -> None:
    chosen = new_queue_id()
    assert is_queue_id(chosen)
    msg = NewMessage("s@src.test", ("a@one.test",), b"hi\r\n", queue_id=chosen)
    assert await store.put(msg) == chosen
    assert (await store.get_message(chosen)) is not None
    with pytest.raises(StoreUnavailable):
        await store.put(msg)  # a clash stores nothing
    assert [m.queue_id for m in await store.list_messages()] == [chosen]
    ids = {new_queue_id() for _ in range(5000)}
    assert len(ids) == 5000
    assert all(is_queue_id(i) for i in ids)


_V1_SCHEMA = (
    "CREATE TABLE queue_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "INSERT INTO queue_meta VALUES ('schema_version', '1')",
    "CREATE TABLE queue_messages (id INTEGER PRIMARY KEY, queue_id TEXT NOT NULL UNIQUE,"
    " sender TEXT NOT NULL, received_at REAL NOT NULL, size INTEGER NOT NULL,"
    " held INTEGER NOT NULL DEFAULT 0, client TEXT NOT NULL DEFAULT '', data BLOB NOT NULL)",
    "CREATE TABLE queue_recipients (id INTEGER PRIMARY KEY, message_id INTEGER NOT NULL"
    " REFERENCES queue_messages(id) ON DELETE CASCADE, address TEXT NOT NULL,"
    " domain TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
    " next_attempt_at REAL, last_error TEXT, lease_owner TEXT, lease_until REAL,"
    " held INTEGER NOT NULL DEFAULT 0, UNIQUE (message_id, address))",
    "CREATE INDEX queue_recipients_due ON queue_recipients(next_attempt_at)"
    " WHERE state IN ('queued', 'deferred') AND held = 0",
    "CREATE INDEX queue_recipients_leased ON queue_recipients(lease_owner)"
    " WHERE lease_owner IS NOT NULL",
    "INSERT INTO queue_messages VALUES (1, 'OLDMESSAGE01', 'old@src.test', 1700000000.0, 5, 0,"
    " '127.0.0.1', x'6f6c640d0a')",
    "INSERT INTO queue_recipients (message_id, address, domain, state, attempts,"
    " next_attempt_at, last_error) VALUES (1, 'a@one.test', 'one.test', 'deferred', 2,"
    " 1700000000.0,"
    " '451 busy')",
)


async def test_version_1_store_is_migrated_and_keeps_its_mail(open_store: Opener, db: Path) -> None:
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db)
    for statement in _V1_SCHEMA:
        conn.execute(statement)
    conn.commit()
    conn.close()
    store = await open_store()
    assert store.migrated_from == 1
    counts = await store.counts()  # schema 6: counted once while migrating
    assert (counts["deferred"], counts["messages"]) == (1, 1)
    (lease,) = await store.lease_due("w", 10, 60)
    assert (lease.queue_id, lease.sender, lease.dsn) == (
        "OLDMESSAGE01",
        "old@src.test",
        DsnRequest(),
    )
    assert lease.recipients[0].attempts == 2
    assert lease.recipients[0].delay_notified is False
    assert lease.requiretls is False  # schema 5: older mail was not sent with REQUIRETLS
    assert await store.read_data("OLDMESSAGE01") == b"old\r\n"
    await store.record(
        lease,
        [RecipientResult("a@one.test", RcptState.DEFERRED, "451", delay_notified=True)],
    )
    await store.close()
    reopened = await open_store()
    assert reopened.migrated_from == SCHEMA_VERSION
    with sqlite3.connect(db) as check:
        version = check.execute("SELECT value FROM queue_meta WHERE key = 'schema_version'")
        assert version.fetchone() == (str(SCHEMA_VERSION),)
    check.close()


async def test_corrupt_rows_are_set_aside(store: SqliteStore, db: Path) -> None:
    good = await store.put(message("a@one.test"))
    bad_rcpt = await store.put(message("b@one.test"))
    bad_msg = await store.put(message("c@one.test"))
    conn = sqlite3.connect(db)
    conn.execute("UPDATE queue_recipients SET attempts = 'many' WHERE address = 'b@one.test'")
    conn.execute("UPDATE queue_messages SET data = 'not a blob' WHERE queue_id = ?", (bad_msg,))
    conn.execute("UPDATE queue_recipients SET state = 'garbage' WHERE address = 'a@one.test'")
    conn.commit()
    conn.close()
    assert await store.lease_due("w", 10, 60) == []
    counts = await store.counts()
    assert counts["set_aside"] == 3
    assert await store.next_due_at() is None
    listed = {m.queue_id: m for m in await store.list_messages()}
    assert listed[good].recipients == ()  # the undecodable row is skipped, not fatal
    assert listed[bad_rcpt].recipients == ()
    conn = sqlite3.connect(db)
    aside = conn.execute(
        "SELECT address, held, last_error FROM queue_recipients WHERE held = 2 ORDER BY id"
    ).fetchall()
    conn.close()
    assert aside == [
        ("b@one.test", 2, "set aside: recipient row unreadable"),
        ("c@one.test", 2, "set aside: message row missing or unreadable"),
    ]
    with pytest.raises(MessageNotFound):
        await store.read_data(bad_msg)


class Disk:
    full = False


def disk_full_store(disk: Disk) -> type[SqliteStore]:
    class FullDiskWriter(GroupCommitWriter):
        def _begin(self, conn: sqlite3.Connection) -> None:
            # A real SQLITE_FULL: the file may not grow past its current size.
            pages = conn.execute("PRAGMA page_count").fetchone()[0] if disk.full else 1 << 30
            conn.execute(f"PRAGMA max_page_count = {pages}")
            super()._begin(conn)

    class FullDiskStore(SqliteStore):
        writer_class = FullDiskWriter

    return FullDiskStore


async def test_disk_full_raises_store_unavailable_then_recovers(open_store: Opener) -> None:
    disk = Disk()
    store = await open_store(disk_full_store(disk))
    kept = await store.put(message("a@one.test"))
    disk.full = True
    big = message("b@one.test", "c@two.test", data=b"x" * 500_000)
    results = await asyncio.gather(*(store.put(big) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert [m.queue_id for m in await store.list_messages()] == [kept]
    assert (await store.counts())["queued"] == 1  # no half-stored message
    disk.full = False
    qid = await store.put(big)
    assert await store.read_data(qid) == big.data


_CHILD = """
import asyncio, sys
from mailqueue.model import NewMessage
from mailqueue.schedule import DEFAULT_RETRY_SCHEDULE
from mailqueue.sqlite import SqliteStore

async def main() -> None:
    store = SqliteStore(sys.argv[1], schedule=DEFAULT_RETRY_SCHEDULE, lifetime=3600)
    await store.open()
    msg = NewMessage("s@a.test", ("r1@b.test", "r2@c.test", "r3@b.test"), b"x" * 4000)

    async def worker() -> None:
        while True:
            print(await store.put(msg), flush=True)

    await asyncio.gather(*(worker() for _ in range(20)))

asyncio.run(main())
"""


async def test_kill_after_put_returns_loses_nothing_and_halves_nothing(
    open_store: Opener, db: Path
) -> None:
    db.parent.mkdir(parents=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, str(db), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    acked: list[str] = []
    async with asyncio.timeout(60):
        while len(acked) < 300:
            line = await proc.stdout.readline()
            assert line, "the child died early"
            acked.append(line.decode().strip())
    proc.kill()  # SIGKILL while puts are in flight
    await proc.wait()

    store = await open_store()
    listed = {m.queue_id: m for m in await store.list_messages()}
    assert set(acked) <= set(listed)
    assert all(len(m.recipients) == 3 for m in listed.values())
