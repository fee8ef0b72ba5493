"""Lease ownership in SqliteStore, on real SQLite files: who may record, renew, release.

Issue 10: a (message, domain) is never attempted twice at the same time, in this process
or another one on the same store; a result is recorded only by the lease's current
owner; after an MX's 250 nothing (a store failure, a DSN that cannot be queued) makes
the relay send it again: record is one commit, and retrying it is safe.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from mailqueue.model import Lease, NewMessage, RcptState, RecipientResult, Recorded
from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite import SqliteStore
from mailqueue.store import StoreUnavailable
from mailqueue.writer import GroupCommitWriter
from tests.support.queue_store import Clock, Opener, store_opener

SCHEDULE = RetrySchedule((300.0, 600.0))
LIFETIME = 86400.0
SENDER = "app@src.test"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "relay.db"


@pytest.fixture
async def open_store(db: Path, clock: Clock) -> AsyncIterator[Opener]:
    async with store_opener(db, clock, schedule=SCHEDULE, lifetime=LIFETIME) as opener:
        yield opener


@pytest.fixture
async def store(open_store: Opener) -> SqliteStore:
    return await open_store()


def message(*rcpts: str, data: bytes = b"Subject: t\r\n\r\nhello\r\n") -> NewMessage:
    return NewMessage(sender=SENDER, recipients=rcpts, data=data, client="127.0.0.1")


def report(size: int = 200) -> NewMessage:
    """A DSN as the scheduler hands it over: null reverse-path, to the original sender."""
    return NewMessage(sender="", recipients=(SENDER,), data=b"Subject: dsn\r\n\r\n" + b"r" * size)


def rows(db: Path) -> list[tuple[str, str, int, str | None]]:
    """(address, state, attempts, lease_owner) of every recipient, read from the file."""
    conn = sqlite3.connect(db)
    try:
        found = conn.execute(
            "SELECT address, state, attempts, lease_owner FROM queue_recipients ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    return [tuple(r) for r in found]


def dsn_count(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(
            conn.execute("SELECT COUNT(*) FROM queue_messages WHERE sender = ''").fetchone()[0]
        )
    finally:
        conn.close()


SENT = RecipientResult("a@one.test", RcptState.SENT, "250 2.0.0 ok")
BOUNCED = RecipientResult("a@one.test", RcptState.BOUNCED, "550 5.1.1 no such user")
DEFERRED = RecipientResult("a@one.test", RcptState.DEFERRED, "451 4.3.0 later")


# --- who may record -----------------------------------------------------------------------


async def test_a_taken_over_lease_records_nothing_and_the_new_owner_does(
    store: SqliteStore, clock: Clock, db: Path
) -> None:
    await store.put(message("a@one.test"))
    (old,) = await store.lease_due("node-a", 10, 60)
    clock.now += 60  # node-a's attempt outlived its lease
    (new,) = await store.lease_due("node-b", 10, 60)
    assert (new.owner, new.queue_id, new.domain) == ("node-b", old.queue_id, old.domain)

    late = await store.record(old, [SENT], report())
    assert late == Recorded(applied=(), lost=("a@one.test",), dsn_queue_id=None)
    assert rows(db) == [("a@one.test", "queued", 0, "node-b")]  # untouched, still node-b's
    assert dsn_count(db) == 0  # the report of unapplied outcomes is not queued
    # Only node-b's view of it counts: node-a cannot renew or release it either.
    assert await store.renew(old, clock.now + 600) is None
    await store.release(old)
    assert await store.lease_due("node-c", 10, 60) == []

    current = await store.record(new, [DEFERRED])
    assert current == Recorded(applied=("a@one.test",), lost=())
    assert rows(db) == [("a@one.test", "deferred", 1, None)]


async def test_a_lease_with_another_owner_or_until_names_other_rows(
    store: SqliteStore, db: Path
) -> None:
    await store.put(message("a@one.test"))
    (lease,) = await store.lease_due("node-a", 10, 60)
    for impostor in (replace(lease, owner="node-b"), replace(lease, until=lease.until + 1)):
        assert await store.record(impostor, [SENT]) == Recorded((), ("a@one.test",))
        assert await store.renew(impostor, lease.until + 60) is None
        await store.release(impostor)
    assert rows(db) == [("a@one.test", "queued", 0, "node-a")]
    assert await store.lease_due("node-b", 10, 60) == []


async def test_one_lease_does_not_record_its_sibling_domain(store: SqliteStore, db: Path) -> None:
    """Two domains of one message leased in one call share owner and until; the domain
    keeps them apart."""
    await store.put(message("a@one.test", "b@two.test"))
    one, two = sorted(await store.lease_due("node-a", 10, 60), key=lambda ls: ls.domain)
    assert (one.owner, one.until) == (two.owner, two.until)
    stray = RecipientResult("b@two.test", RcptState.SENT)
    assert await store.record(one, [SENT, stray]) == Recorded(("a@one.test",), ("b@two.test",))
    assert rows(db) == [("a@one.test", "sent", 1, None), ("b@two.test", "queued", 0, "node-a")]
    assert (await store.record(two, [stray])).applied == ("b@two.test",)


async def test_invalid_calls_store_nothing(store: SqliteStore, db: Path) -> None:
    await store.put(message("a@one.test"))
    (lease,) = await store.lease_due("w", 10, 60)
    with pytest.raises(ValueError, match="one result per address"):
        await store.record(lease, [SENT, DEFERRED])
    with pytest.raises(ValueError, match="recipient"):
        await store.record(lease, [SENT], replace(report(), recipients=()))
    with pytest.raises(ValueError, match="SENT, BOUNCED or DEFERRED"):
        await store.record(lease, [replace(SENT, state=RcptState.QUEUED)])
    assert rows(db) == [("a@one.test", "queued", 0, "w")]
    assert (await store.record(lease, [SENT])).applied == ("a@one.test",)


# --- renew and release ------------------------------------------------------------------


async def test_renew_keeps_what_was_read_ahead(store: SqliteStore, clock: Clock, db: Path) -> None:
    qid = await store.put(message("a@one.test"))
    await store.put(message("z@other.test"))
    (lease, _) = sorted(await store.lease_due("w", 10, 60), key=lambda ls: ls.domain)
    assert lease.queue_id == qid
    renewed = await store.renew(lease, clock.now + 600)
    assert renewed is not None
    clock.now += 120  # past the first end: leasing again drops what ran out unread
    assert await store.lease_due("w", 10, 60) != []
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("DELETE FROM queue_messages WHERE queue_id = ?", (qid,))
    conn.close()
    assert await store.read_data(qid) == b"Subject: t\r\n\r\nhello\r\n"


# --- one commit, safe to retry ----------------------------------------------------------


class Disk:
    full = False


def failing_store(disk: Disk, statements: list[str]) -> type[SqliteStore]:
    class FullDiskWriter(GroupCommitWriter):
        def _begin(self, conn: sqlite3.Connection) -> None:
            # A real SQLITE_FULL: the file may not grow past its current size, so updating
            # rows in place works and the DSN's new pages fail, inside the transaction.
            pages = conn.execute("PRAGMA page_count").fetchone()[0] if disk.full else 1 << 30
            conn.execute(f"PRAGMA max_page_count = {pages}")
            conn.set_trace_callback(statements.append)
            super()._begin(conn)

    class FullDiskStore(SqliteStore):
        writer_class = FullDiskWriter

    return FullDiskStore


async def test_results_and_dsn_are_one_commit(open_store: Opener, db: Path) -> None:
    disk, statements = Disk(), list[str]()
    store = await open_store(failing_store(disk, statements))
    qid = await store.put(message("a@one.test", "b@one.test"))
    (lease,) = await store.lease_due("w", 10, 60)
    results = [BOUNCED, replace(SENT, address="b@one.test")]
    dsn = report(size=400_000)  # needs pages the full disk does not have

    disk.full = True
    statements.clear()
    with pytest.raises(StoreUnavailable):
        await store.record(lease, results, dsn)
    # The failure came after the results were applied inside the transaction (both final:
    # the message deleted, its rows with it)...
    assert any(s.startswith("DELETE FROM queue_messages WHERE") for s in statements)
    assert any(s.startswith("INSERT INTO queue_messages") for s in statements)
    # ...and nothing of the call was kept: no result, no DSN, the lease still ours.
    assert rows(db) == [("a@one.test", "queued", 0, "w"), ("b@one.test", "queued", 0, "w")]
    assert dsn_count(db) == 0
    assert await store.get_message(qid) is not None

    disk.full = False  # the caller retries the very same call
    recorded = await store.record(lease, results, dsn)
    assert recorded.applied == ("a@one.test", "b@one.test")
    assert recorded.dsn_queue_id is not None
    assert await store.read_data(recorded.dsn_queue_id) == dsn.data
    assert await store.get_message(qid) is None


async def test_a_dsn_that_cannot_be_inserted_stores_no_result(store: SqliteStore, db: Path) -> None:
    other = await store.put(message("x@two.test"))
    await store.put(message("a@one.test"))
    lease = next(ls for ls in await store.lease_due("w", 10, 60) if ls.domain == "one.test")
    clashing = replace(report(), queue_id=other)  # a real UNIQUE constraint fails
    with pytest.raises(StoreUnavailable):
        await store.record(lease, [BOUNCED], clashing)
    assert rows(db)[1] == ("a@one.test", "queued", 0, "w")
    assert dsn_count(db) == 0
    recorded = await store.record(lease, [BOUNCED], report())  # store-chosen id: no clash
    assert recorded.applied == ("a@one.test",)
    assert recorded.dsn_queue_id not in (None, other)


async def test_retrying_a_committed_record_changes_nothing(
    store: SqliteStore, clock: Clock, db: Path
) -> None:
    await store.put(message("a@one.test", "b@one.test"))
    (lease,) = await store.lease_due("w", 10, 60)
    results = [replace(DEFERRED, delay_notified=True), replace(SENT, address="b@one.test")]
    dsn = report()

    # The caller stops waiting (its reply is lost) while the commit goes ahead.
    before = store.commits
    task = asyncio.create_task(store.record(lease, results, dsn))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.hold("NOSUCHQUEUE0") is False  # a later write: the writer is FIFO
    assert store.commits > before
    assert rows(db)[1] == ("b@one.test", "sent", 1, None)  # it did commit
    clock.now += 5
    first = await store.record(lease, results, dsn)  # the retry: the same call
    assert first.applied == ("a@one.test", "b@one.test")
    assert first.dsn_queue_id is not None
    again = await store.record(lease, results, dsn)
    assert again == first
    assert dsn_count(db) == 1
    assert rows(db)[:2] == [("a@one.test", "deferred", 1, None), ("b@one.test", "sent", 1, None)]


async def test_a_retry_without_its_receipt_still_applies_nothing(
    open_store: Opener, clock: Clock, db: Path
) -> None:
    store = await open_store(schedule=RetrySchedule((86400.0,)))  # a@ stays unleased
    await store.put(message("a@one.test"))
    (lease,) = await store.lease_due("w", 10, 60)
    first = await store.record(lease, [DEFERRED], report())
    assert first.applied == ("a@one.test",)
    clock.now += 3601  # receipts are kept an hour: the next one kept prunes this one
    await store.put(message("c@three.test"))
    leases = await store.lease_due("w", 10, 60)  # c@three.test, and the DSN to app@src.test
    other = next(ls for ls in leases if ls.domain == "three.test")
    await store.record(other, [replace(DEFERRED, address="c@three.test")])
    conn = sqlite3.connect(db)
    # a@'s receipt was pruned; c@'s record (its message stays) keeps its own.
    assert conn.execute("SELECT queue_id FROM queue_receipts").fetchall() == [(other.queue_id,)]
    conn.close()
    late = await store.record(lease, [DEFERRED], report())
    assert late == Recorded(applied=(), lost=("a@one.test",))
    assert rows(db)[0] == ("a@one.test", "deferred", 1, None)  # one attempt, not two
    assert dsn_count(db) == 1


async def test_a_record_that_finishes_the_message_keeps_no_receipt_and_a_retry_is_harmless(
    store: SqliteStore, db: Path
) -> None:
    """Receipts stay bounded by the queue: none for a message the record deleted. A retry of
    that call (its reply lost) then applies nothing and queues no second DSN."""
    await store.put(message("a@one.test"))
    (lease,) = await store.lease_due("w", 10, 60)
    first = await store.record(lease, [replace(SENT, address="a@one.test")], report())
    assert first.applied == ("a@one.test",)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM queue_receipts").fetchone() == (0,)
    conn.close()
    again = await store.record(lease, [replace(SENT, address="a@one.test")], report())
    assert again == Recorded(applied=(), lost=("a@one.test",))
    assert dsn_count(db) == 1


async def test_the_record_that_finishes_a_message_deletes_it_without_writing_its_outcomes(
    open_store: Opener, db: Path
) -> None:
    """The common path costs as little as it can: the last final outcome of a message is
    not written to rows deleted in the same commit, and a record whose outcomes are all
    still under the lease (so not a retry) reads no receipt. Counts stay exact."""
    disk, statements = Disk(), list[str]()
    store = await open_store(failing_store(disk, statements))
    qid = await store.put(message("a@one.test", "b@two.test"))
    first, second = sorted(await store.lease_due("w", 10, 60), key=lambda ls: ls.domain)

    statements.clear()
    done = await store.record(first, [replace(SENT, address="a@one.test")])
    assert done == Recorded(applied=("a@one.test",), lost=())
    # b@two.test still waits: a@'s outcome is written, the message stays.
    assert any(s.startswith("UPDATE queue_recipients SET state") for s in statements)
    assert not any("queue_receipts WHERE queue_id" in s for s in statements)
    counts = await store.counts()
    assert (counts["sent"], counts["queued"], counts["messages"]) == (1, 1, 1)

    statements.clear()
    done = await store.record(second, [replace(BOUNCED, address="b@two.test")], report())
    assert done.applied == ("b@two.test",)
    assert done.dsn_queue_id is not None
    assert not any(s.startswith("UPDATE queue_recipients") for s in statements)
    assert not any(s.startswith("SELECT applied") for s in statements)
    assert await store.get_message(qid) is None
    assert [r[0] for r in rows(db)] == ["app@src.test"]  # only the DSN's recipient is left
    counts = await store.counts()
    assert (counts["sent"], counts["bounced"], counts["queued"], counts["messages"]) == (
        0,
        0,
        1,
        1,
    )

    # A retry of that call (its reply lost): the message is gone, so it applies nothing
    # and queues no second report.
    again = await store.record(second, [replace(BOUNCED, address="b@two.test")], report())
    assert again == Recorded(applied=(), lost=("b@two.test",))
    assert dsn_count(db) == 1


async def test_a_lease_again_with_the_same_owner_and_until_is_not_answered_by_an_old_receipt(
    store: SqliteStore, db: Path
) -> None:
    """Leasing drops the receipts of the groups it leases (one statement per lease call):
    with a frozen clock the new lease has the old one's (owner, until), and its record
    must apply its own outcomes, even the ones it cannot."""
    await store.put(message("a@one.test", "b@one.test"))
    await store.put(message("c@two.test"))
    leases = await store.lease_due("w", 10, 60)
    one = next(ls for ls in leases if ls.domain == "one.test")
    assert await store.record(one, [DEFERRED]) == Recorded(applied=("a@one.test",), lost=())
    await store.release(one)  # b@ back, without an attempt
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM queue_receipts").fetchone() == (1,)
    conn.close()
    (again,) = await store.lease_due("w", 10, 60)  # b@ only (a@ waits for its retry)
    assert (again.queue_id, again.owner, again.until) == (one.queue_id, one.owner, one.until)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM queue_receipts").fetchone() == (0,)
    conn.close()
    results = [replace(SENT, address="b@one.test"), replace(SENT, address="x@one.test")]
    recorded = await store.record(again, results)
    assert recorded == Recorded(applied=("b@one.test",), lost=("x@one.test",))


# --- two stores, two processes ----------------------------------------------------------


async def test_two_stores_never_hand_out_a_live_lease(open_store: Opener, clock: Clock) -> None:
    node_a = await open_store()
    node_b = await open_store()  # a second opener: shares the file, recovers nothing
    assert node_b.recovered_leases == 0
    for i in range(30):
        await node_a.put(message(f"u{i}@one.test", f"v{i}@two.test", "w@three.test"))
    rng = random.Random(7)
    live: dict[tuple[str, str], Lease] = {}
    superseded: list[Lease] = []
    for _ in range(40):
        calls = [(s, o) for s, o in ((node_a, "a"), (node_b, "b")) for _ in range(3)]
        batches = await asyncio.gather(*(s.lease_due(o, 4, 60) for s, o in calls))
        for lease in (ls for batch in batches for ls in batch):
            key = (lease.queue_id, lease.domain)
            held = live.get(key)
            assert held is None or held.until <= clock.now, f"{key} handed out twice"
            if held is not None:
                superseded.append(held)
            live[key] = lease
        for key, lease in list(live.items()):
            if rng.random() < 0.3:
                state = rng.choice([RcptState.SENT, RcptState.DEFERRED])
                store = node_a if lease.owner == "a" else node_b
                results = [RecipientResult(r.address, state) for r in lease.recipients]
                assert (await store.record(lease, results)).lost == ()
                del live[key]
        clock.now += 25  # some leases run out and are taken over
    assert superseded, "no lease was taken over: the test proves nothing"
    for lease in superseded:  # a taken-over lease records nothing
        results = [RecipientResult(r.address, RcptState.SENT) for r in lease.recipients]
        assert (await node_a.record(lease, results)).applied == ()


_CHILD = """
import asyncio, json, sys
from mailqueue.schedule import DEFAULT_RETRY_SCHEDULE
from mailqueue.sqlite import SqliteStore

async def main() -> None:
    store = SqliteStore(sys.argv[1], schedule=DEFAULT_RETRY_SCHEDULE, lifetime=3600)
    await store.open()
    leases = await store.lease_due("child", 1000, 600)
    print(json.dumps({
        "recovered": store.recovered_leases,
        "keys": [[ls.queue_id, ls.domain] for ls in leases],
    }))
    await store.close()

asyncio.run(main())
"""


async def test_another_process_never_takes_a_live_lease(db: Path) -> None:
    # Real time in both processes: the child's clock decides what is still live.
    store = SqliteStore(db, schedule=SCHEDULE, lifetime=LIFETIME)
    await store.open()
    try:
        for i in range(20):
            await store.put(message(f"u{i}@one.test", f"v{i}@two.test"))
        mine = await store.lease_due("parent", 25, 600)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CHILD, str(db), stdout=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(60):
            out, _ = await proc.communicate()
        assert proc.returncode == 0
        child = json.loads(out)
        assert child["recovered"] == 0  # a second opener leaves live leases alone
        theirs = {(q, d) for q, d in child["keys"]}
        ours = {(ls.queue_id, ls.domain) for ls in mine}
        assert len(ours) == 25
        assert not ours & theirs
        assert len(ours | theirs) == 40
        for lease in mine:  # still ours to record
            results = [RecipientResult(r.address, RcptState.SENT) for r in lease.recipients]
            assert (await store.record(lease, results)).lost == ()
    finally:
        await store.close()


def due_times(db: Path) -> list[float]:
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute("SELECT next_attempt_at FROM queue_recipients")]
    finally:
        conn.close()


async def test_a_deferred_group_falls_due_together(
    store: SqliteStore, db: Path, clock: Clock
) -> None:
    """One jitter draw per group: drawn per recipient, one recipient fell due (and was
    leased) while its sibling's lease was still live — two attempts of one (message,
    domain) at once, and the scheduler took the second lease for its own work."""
    await store.put(message("a@x.test", "b@x.test", "c@x.test", "d@x.test"))
    for _ in range(3):
        (lease,) = await store.lease_due("w1", 10, 60)
        deferred = [RecipientResult(r.address, RcptState.DEFERRED, "451") for r in lease.recipients]
        await store.record(lease, deferred, None)
        times = due_times(db)
        assert len(set(times)) == 1, times
        clock.now = times[0]


async def test_no_second_lease_of_a_group_while_part_of_it_is_leased(
    store: SqliteStore, db: Path, clock: Clock
) -> None:
    await store.put(message("a@x.test", "b@x.test"))
    (first,) = await store.lease_due("w1", 10, 60)
    # A sibling that falls due while the group is in delivery (rows as an older relay or an
    # operator's edit may leave them): it is not leased to anyone until that lease ends.
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "UPDATE queue_recipients SET lease_owner = NULL, lease_until = NULL,"
            " next_attempt_at = ? WHERE address = 'b@x.test'",
            (clock.now,),
        )
    conn.close()
    assert await store.lease_due("w2", 10, 60) == []
    assert await store.lease_due("w1", 10, 60) == []
    # Once the first lease is recorded and over, the waiting sibling is leased.
    await store.record(first, [RecipientResult("a@x.test", RcptState.SENT, "250")], None)
    clock.now = first.until + 1
    (second,) = await store.lease_due("w2", 10, 60)
    assert [r.address for r in second.recipients] == ["b@x.test"]
