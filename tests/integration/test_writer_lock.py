"""Several processes writing one queue database: the writer lock (mailqueue/writer.py).

Real processes on one SQLite file, as `serve` runs with serve.processes > 1: every put a
process saw acknowledged is in the store afterwards, and a writer holds the flock beside
the database for each transaction (so waiting writers wake when it is released).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailqueue.model import NewMessage
from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite import SqliteStore
from mailqueue.store import StoreUnavailable
from tests.support.queue_store import Clock, Opener, store_opener

SCHEDULE = RetrySchedule((300.0,))
LIFETIME = 86400.0

# One writing process: `puts` concurrent puts (distinct recipients), then the acknowledged
# queue ids as JSON. Its store is the real SqliteStore with its writer thread.
_WRITER = """
import asyncio, json, sys
from mailqueue.model import NewMessage
from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite import SqliteStore
from mailqueue.store import StoreUnavailable

async def main(db, name, puts):
    store = SqliteStore(db, schedule=RetrySchedule((300.0,)), lifetime=86400.0)
    await store.open()
    data = b"Subject: t\\r\\n\\r\\n" + b"x" * 2000 + b"\\r\\n"
    try:
        ids = await asyncio.gather(*(
            store.put(NewMessage("app@src.test", (f"{name}-{i}@dest.test",), data, "127.0.0.1"))
            for i in range(puts)
        ))
    finally:
        await store.close()
    print(json.dumps(ids))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "relay.sqlite3"


@pytest.fixture
async def open_store(db: Path) -> AsyncIterator[Opener]:
    async with store_opener(db, Clock(), schedule=SCHEDULE, lifetime=LIFETIME) as opener:
        yield opener


async def test_every_acknowledged_put_of_two_processes_is_stored(
    db: Path, open_store: Opener
) -> None:
    await (await open_store()).close()  # the schema exists before the writers race
    puts = 300
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WRITER,
            str(db),
            name,
            str(puts),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        )
        for name in ("one", "two")
    ]
    acknowledged: list[str] = []
    for proc in procs:
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        acknowledged += json.loads(out)
    assert len(acknowledged) == len(set(acknowledged)) == 2 * puts

    store = await open_store()
    stored = {m.queue_id: m for m in await store.list_messages()}
    assert set(acknowledged) <= set(stored)
    rcpts = {r.address for m in stored.values() for r in m.recipients}
    assert rcpts == {f"{name}-{i}@dest.test" for name in ("one", "two") for i in range(puts)}


async def test_a_write_waits_for_the_lock_and_goes_on_when_it_is_released(
    db: Path, open_store: Opener
) -> None:
    store: SqliteStore = await open_store()
    fd = os.open(f"{db}.write-lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process's transaction, as far as it knows
        put = asyncio.ensure_future(
            store.put(NewMessage("app@src.test", ("u@dest.test",), b"Subject: t\r\n\r\nx\r\n"))
        )
        await asyncio.sleep(0.2)
        assert not put.done()  # held up by the lock, not failed
        fcntl.flock(fd, fcntl.LOCK_UN)
        async with asyncio.timeout(30):
            queue_id = await put
    finally:
        os.close(fd)
    assert [m.queue_id for m in await store.list_messages()] == [queue_id]


_DATA = b"Subject: t\r\n\r\nx\r\n"


def _put(store: SqliteStore, rcpt: str, queue_id: str | None = None) -> asyncio.Future[str]:
    return asyncio.ensure_future(
        store.put(NewMessage("app@src.test", (rcpt,), _DATA, queue_id=queue_id))
    )


@contextlib.asynccontextmanager
async def _lock_held_by_another(db: Path) -> AsyncIterator[None]:
    """The write lock held as another process's transaction would hold it, released on
    leaving; the body queues work meanwhile."""
    fd = os.open(f"{db}.write-lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


async def _behind_the_lock(
    store: SqliteStore, db: Path, rcpts: int, taken: str | None = None
) -> tuple[list[str], asyncio.Future[str] | None]:
    """`rcpts` puts (and, with `taken`, one that reuses that id) queued while the lock is
    held: the first alone while the writer waits for the lock, the rest after it."""
    async with _lock_held_by_another(db):
        first = _put(store, "u0@dest.test")
        await asyncio.sleep(0.2)  # the writer thread waits for the lock with `first` alone
        rest = [_put(store, f"u{i}@dest.test") for i in range(1, rcpts)]
        clash = None if taken is None else _put(store, "c@dest.test", taken)
        await asyncio.sleep(0.1)
        assert not first.done()
    async with asyncio.timeout(30):
        return list(await asyncio.gather(first, *rest)), clash


async def test_writes_queued_while_the_lock_is_awaited_join_its_transaction(
    db: Path, open_store: Opener
) -> None:
    """One commit (one fsync) for the work that piled up while another process wrote; an
    operation of that batch that fails, fails alone."""
    store: SqliteStore = await open_store()
    taken = await store.put(NewMessage("app@src.test", ("x@dest.test",), _DATA))
    before = store.commits
    ids, clash = await _behind_the_lock(store, db, 5, taken)
    assert clash is not None
    with pytest.raises(StoreUnavailable):
        await clash  # its id is taken: it fails, the others' commit goes on
    # The batch failed once (the clash), then each ran alone: the five puts, not the clash.
    assert store.commits - before == 5
    stored = {m.queue_id for m in await store.list_messages()}
    assert stored == {taken, *ids}


async def test_writes_queued_while_the_lock_is_awaited_share_one_commit(
    db: Path, open_store: Opener
) -> None:
    store: SqliteStore = await open_store()
    before = store.commits
    ids, _ = await _behind_the_lock(store, db, 10)
    assert store.commits - before == 1  # all ten in the transaction the lock was taken for
    assert {m.queue_id for m in await store.list_messages()} == set(ids)
