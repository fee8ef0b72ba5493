"""Leasing reads small contents ahead: read_data then needs no second trip to SQLite.

Observed from outside: once leased, a small message's content is served even after
another process removed the row (exactly as if that delete came just after read_data),
a large one is still read from SQLite, and record/delete drop what was read ahead.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailqueue.model import NewMessage, RcptState, RecipientResult
from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite import PREFETCH_MAX_SIZE, SqliteStore
from mailqueue.store import MessageNotFound

SMALL = b"Subject: t\r\n\r\nhello\r\n"
BIG = b"Subject: big\r\n\r\n" + b"x" * (PREFETCH_MAX_SIZE + 1)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "relay.db"


@pytest.fixture
async def store(db: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(db, schedule=RetrySchedule((300.0,)), lifetime=86400.0)
    await opened.open()
    yield opened
    await opened.close()


def _message(data: bytes, *rcpts: str) -> NewMessage:
    return NewMessage(sender="app@src.test", recipients=rcpts, data=data, client="127.0.0.1")


def _delete_elsewhere(db: Path, queue_id: str) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("DELETE FROM queue_messages WHERE queue_id = ?", (queue_id,))
    finally:
        conn.close()


async def test_small_content_is_read_with_the_lease(store: SqliteStore, db: Path) -> None:
    qid = await store.put(_message(SMALL, "a@one.test"))
    (lease,) = await store.lease_due("w", 10, 60)
    _delete_elsewhere(db, qid)
    assert await store.read_data(lease.queue_id) == SMALL
    with pytest.raises(MessageNotFound):  # read ahead once per lease, then SQLite again
        await store.read_data(qid)


async def test_large_content_is_read_when_asked(store: SqliteStore, db: Path) -> None:
    qid = await store.put(_message(BIG, "a@one.test"))
    (lease,) = await store.lease_due("w", 10, 60)
    assert await store.read_data(lease.queue_id) == BIG
    _delete_elsewhere(db, qid)
    with pytest.raises(MessageNotFound):
        await store.read_data(qid)


async def test_each_domain_lease_gets_the_content(store: SqliteStore, db: Path) -> None:
    qid = await store.put(_message(SMALL, "a@one.test", "b@two.test"))
    leases = await store.lease_due("w", 10, 60)
    assert sorted(lease.domain for lease in leases) == ["one.test", "two.test"]
    _delete_elsewhere(db, qid)
    assert [await store.read_data(lease.queue_id) for lease in leases] == [SMALL, SMALL]


async def test_record_and_delete_drop_what_was_read_ahead(store: SqliteStore, db: Path) -> None:
    recorded = await store.put(_message(SMALL, "a@one.test", "b@two.test"))
    deleted = await store.put(_message(SMALL, "c@one.test"))
    leases = {(lease.queue_id, lease.domain): lease for lease in await store.lease_due("w", 10, 60)}
    result = RecipientResult("a@one.test", RcptState.DEFERRED, "4.0.0")
    assert (await store.record(leases[recorded, "one.test"], [result])).applied == ("a@one.test",)
    assert await store.delete(deleted)
    _delete_elsewhere(db, recorded)
    for qid in (recorded, deleted):
        with pytest.raises(MessageNotFound):
            await store.read_data(qid)
