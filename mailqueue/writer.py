"""Group commit: one thread owns the SQLite write connection and batches transactions.

Knows SQLite transactions and threads only; nothing of messages, leases or schedules.
Callers submit write operations (functions of a connection) from the event loop; the
writer takes everything pending, runs it in ONE transaction, commits once (with
synchronous=FULL that is one fsync for the whole batch), then resolves every caller's
future. Durability per caller is the same as one commit each: no future is resolved
before the commit that contains its work returned.

If a batch fails, it is rolled back and each operation is retried alone, so one bad
operation (or a disk that filled up mid-batch) fails only the operations it must.

Several processes may each run a writer on one database file (serve.processes). SQLite
makes a writer that finds the file locked sleep in coarse steps (1, 2, 5, 10, ... 100 ms
of busy_timeout), so two busy writers would spend much of their time asleep while the file
is free. So every transaction of a writer given `write_lock` (a file beside the database)
runs under an exclusive flock of that file, taken blocking in the writer thread: a writer
waiting for another process wakes the moment that one's transaction ends. busy_timeout
still covers the writers that take no flock (the admin CLI, the policy cache). The lock is
held for one transaction only, and the kernel drops it if its process dies. Operations
submitted while the writer waited for the lock join the batch it then runs: waiting for
another process is when most work piles up, and one transaction for all of it is one
commit, one fsync and one reload of the pages the other process changed, instead of one
per batch.

Before committing a batch that changed anything, the writer checks (one os.stat per file)
that the database and WAL paths still name the files its connection opened: a file
deleted or replaced under the running process would take the commit with it at the next
restart, so the batch is rolled back and fails (StoreFileChanged) instead of being
acknowledged. `failure` says why a write failed, for readiness, until the store's probe
write succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
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


# Errors of one operation's own making: the store itself took writes.
_OPERATION_ERRORS = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.DataError)


class StoreFileChanged(StoreUnavailable):
    """The database or WAL file at the store's path is no longer the one the writer's
    connection has open (deleted or replaced under the running process)."""


class FileWatch:
    """Which files (st_dev, st_ino) a connection opened, and whether their paths still
    name them."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._paths = tuple(paths)
        self._opened: dict[Path, tuple[int, int]] = {}

    def remember(self) -> None:
        """Take the files now at the paths as the opened ones (right after opening)."""
        self._opened = {}
        for path in self._paths:
            with contextlib.suppress(OSError):  # not there (yet): nothing to compare
                st = os.stat(path)
                self._opened[path] = (st.st_dev, st.st_ino)

    def changed(self) -> tuple[Path, str] | None:
        """The first path that no longer names its opened file, and how; else None."""
        for path, opened in self._opened.items():
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return path, f"{path.name} was deleted under the running process"
            except OSError as exc:
                return path, f"{path.name}: {exc.strerror}"
            if (st.st_dev, st.st_ino) != opened:
                return path, f"{path.name} was replaced under the running process"
        return None


class GroupCommitWriter:
    """A dedicated thread running submitted write operations in batched transactions."""

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        *,
        watch: Sequence[Path] = (),
        write_lock: Path | None = None,
    ) -> None:
        """`watch`: the files behind the connection, the database first, then its WAL;
        checked before every commit that changes something. `write_lock`: a file whose
        flock every transaction holds (shared by every writer of the database)."""
        self._connect = connect
        self._write_lock = write_lock
        self._lock_fd: int | None = None  # opened by the writer thread (after any fork)
        self._conn: sqlite3.Connection | None = None
        self._jobs: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stopping = False  # the writer thread took _STOP from the queue
        self.commits = 0  # committed transactions: tests and metrics see batching here
        self.files = FileWatch(watch)
        # Why the last write failed for want of storage (None: it committed). Written by
        # the writer thread only; one reference assignment, read from the event loop.
        self.failure: str | None = None

    def start(self, conn: sqlite3.Connection) -> None:
        """Start the thread with an already configured connection (it takes ownership)."""
        self._conn = conn
        self.files.remember()
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
        try:
            self._serve()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _serve(self) -> None:
        self._stopping = False
        while not self._stopping:
            batch: list[_Job] = []
            item = self._jobs.get()
            if item is _STOP:
                self._stopping = True
            elif isinstance(item, _Job):
                batch.append(item)
            self._take_pending(batch)
            if batch:
                self._run_batch(batch, grow=True)

    def _take_pending(self, batch: list[_Job]) -> None:
        """Add the jobs waiting in the queue to `batch` (up to MAX_BATCH), without blocking;
        after _STOP nothing more is taken (it is the last item ever queued)."""
        while not self._stopping and len(batch) < MAX_BATCH:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return
            if item is _STOP:
                self._stopping = True
            elif isinstance(item, _Job):
                batch.append(item)

    def _run_batch(self, batch: list[_Job], *, grow: bool = False) -> None:
        """Run `batch` in one transaction; `grow`: jobs queued while the write lock was
        awaited join it (appended to `batch`) once the lock is held."""
        try:
            results = self._transaction(batch, grow=grow)
        except StoreFileChanged as exc:  # no use retrying each alone: fail them all
            self.failure = str(exc)
            self._settle(batch, [(None, exc)] * len(batch))
            return
        except Exception as exc:  # noqa: BLE001 (retried alone, then handed to the caller)
            if len(batch) == 1:
                error = as_unavailable(exc)
                if isinstance(exc, sqlite3.Error) and not isinstance(exc, _OPERATION_ERRORS):
                    self.failure = str(error)
                self._settle(batch, [(None, error)])
                return
            for job in batch:
                self._run_batch([job])
            return
        self._settle(batch, [(result, None) for result in results])

    def _transaction(self, batch: list[_Job], *, grow: bool = False) -> list[Any]:
        conn = self._connection()
        locked = self._lock()
        try:
            if grow and locked is not None:
                self._take_pending(batch)  # queued while another process held the lock
            return self._locked_transaction(conn, [job.op for job in batch])
        finally:
            if locked is not None:
                fcntl.flock(locked, fcntl.LOCK_UN)

    def _lock(self) -> int | None:
        """Take the write lock (blocking: the GIL is released while waiting); its fd, or
        None without one. A lock file that cannot be opened leaves busy_timeout alone to
        order the writers: slower, never wrong."""
        if self._write_lock is None:
            return None
        if self._lock_fd is None:
            try:
                self._lock_fd = os.open(self._write_lock, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                return None
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        return self._lock_fd

    def _locked_transaction(self, conn: sqlite3.Connection, ops: list[Op]) -> list[Any]:
        # A failure stays until the store's probe write succeeds (SqliteStore.writable):
        # an update in place (a lease, a result) can succeed on a full disk, and proves
        # nothing about room for the next message.
        try:
            self._begin(conn)
            before = conn.total_changes
            results = [op(conn) for op in ops]
            if conn.total_changes != before:
                self._check_files(conn)
            self._commit(conn)
        except BaseException:
            self._rollback(conn)
            raise
        self.commits += 1
        return results

    def _check_files(self, conn: sqlite3.Connection) -> None:
        """Raise StoreFileChanged when the database or WAL file is not the one opened.

        A WAL deleted or replaced under a database still in place holds commits no restart
        would find: they are copied into the database now (a checkpoint reads them through
        the file we still have open), so mail acknowledged before the damage survives.
        """
        change = self.files.changed()
        if change is None:
            return
        path, text = change
        if path.name.endswith("-wal"):  # the database comes first in `watch`: it is fine
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        raise StoreFileChanged(f"queue store: {text}; restore it, or restart")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._connect()
            self.files.remember()  # a fresh connection opens what the paths name now
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
