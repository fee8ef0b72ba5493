"""Group commit: one thread owns the SQLite write connection and batches transactions.

Knows SQLite transactions and threads only; nothing of messages, leases or schedules.
Callers submit write operations (functions of a connection) from the event loop; the
writer takes everything pending, runs it in ONE transaction, commits once (with
synchronous=FULL that is one fsync for the whole batch), then resolves every caller's
future. Durability per caller is the same as one commit each: no future is resolved
before the commit that contains its work returned.

If a batch fails, it is rolled back and each operation is retried alone, so one bad
operation (or a disk that filled up mid-batch) fails only the operations it must.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from mailqueue.store import StoreUnavailable

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]
MAX_BATCH = 1000  # bounds one transaction's size and the latency of its first caller


@dataclass(slots=True)
class _Job:
    op: Op
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


_STOP = object()


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _resolve_all(settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, error in settled:
        _resolve(future, result, error)


def as_unavailable(exc: BaseException) -> BaseException:
    """Driver errors become the store's one documented failure; bugs stay what they are."""
    if isinstance(exc, sqlite3.Error):
        unavailable = StoreUnavailable(f"queue store: {exc}")
        unavailable.__cause__ = exc
        return unavailable
    return exc


class GroupCommitWriter:
    """A dedicated thread running submitted write operations in batched transactions."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._conn: sqlite3.Connection | None = None
        self._jobs: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.commits = 0  # committed transactions: tests and metrics see batching here

    def start(self, conn: sqlite3.Connection) -> None:
        """Start the thread with an already configured connection (it takes ownership)."""
        self._conn = conn
        self._thread = threading.Thread(target=self._run, name="mailqueue-writer", daemon=True)
        self._thread.start()

    async def submit(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run `op` inside a write transaction; returns its result once committed."""
        if self._closed:
            raise StoreUnavailable("queue store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(op, future, loop))
        return await future

    def stop(self) -> None:
        """Blocking: finish pending jobs, stop the thread, close the connection."""
        self._closed = True
        if self._thread is not None:
            self._jobs.put(_STOP)
            self._thread.join()
            self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # The hooks below run in the writer thread; tests subclass them to inject failures.

    def _begin(self, conn: sqlite3.Connection) -> None:
        # IMMEDIATE takes the write lock now, so another process (the admin CLI) waits
        # on busy_timeout here instead of failing at COMMIT.
        conn.execute("BEGIN IMMEDIATE")

    def _commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[_Job] = []
            item = self._jobs.get()
            while True:
                if item is _STOP:
                    stopping = True
                elif isinstance(item, _Job):
                    batch.append(item)
                if stopping or len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._jobs.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list[_Job]) -> None:
        try:
            results = self._transaction([job.op for job in batch])
        except Exception as exc:  # noqa: BLE001 (retried alone, then handed to the caller)
            if len(batch) == 1:
                self._settle(batch, [(None, as_unavailable(exc))])
                return
            for job in batch:
                self._run_batch([job])
            return
        self._settle(batch, [(result, None) for result in results])

    def _transaction(self, ops: list[Op]) -> list[Any]:
        conn = self._connection()
        try:
            self._begin(conn)
            results = [op(conn) for op in ops]
            self._commit(conn)
        except BaseException:
            self._rollback(conn)
            raise
        self.commits += 1
        return results

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _rollback(self, conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            # The connection is in an unknown state (I/O error): start a fresh one next time.
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            self._conn = None

    @staticmethod
    def _settle(jobs: list[_Job], outcomes: list[tuple[Any, BaseException | None]]) -> None:
        # One wake-up per event loop for the whole batch, not one per caller: each
        # call_soon_threadsafe costs the loop a self-pipe write and read.
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, Any]]] = {}
        for job, (result, error) in zip(jobs, outcomes, strict=True):
            per_loop.setdefault(job.loop, []).append((job.future, result, error))
        for loop, settled in per_loop.items():
            with contextlib.suppress(RuntimeError):  # the caller's loop is already closed
                loop.call_soon_threadsafe(_resolve_all, settled)
