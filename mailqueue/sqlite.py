"""SqliteStore: the embedded queue store (one relay node, one SQLite file).

Owns the `queue_*` tables of the shared state database (the policy cache keeps its
`sts_*` tables in the same file; this module never touches them, nor `PRAGMA
user_version`: the queue's schema version lives in `queue_meta`). Knows durability,
leases and the retry schedule; nothing of TLS, SMTP or MTA-STS.

Durability: WAL + synchronous=FULL; every write runs in the group-commit writer thread
(writer.py), reads in worker threads: no SQLite call or fsync on the event loop.

Leases: while a recipient is leased, its `next_attempt_at` holds the lease's end, so one
partial index on `next_attempt_at` finds due work and expired leases alike. Its
`lease_owner` and `lease_until` name the lease; only the holder of both records, renews
or releases it (sqlite_leases.py). Leasing runs in a write transaction (BEGIN
IMMEDIATE), so two stores on one file, in one process or two, never hand out the same
(message, domain) while a lease is live.

One relay process per file: `open()` returns to the queue the leases a dead previous
process left, but only when no other SqliteStore has the file open (an flock on
`<path>.queue-lock`), so an admin command run beside a live relay never steals its leases.

Leasing reads the content of small messages in the same transaction and keeps it until
`read_data` asks for it: a delivery costs one trip to the database threads instead of two.
(A message another process deletes after it was leased may still be attempted once, as
when the delete comes just after `read_data`; `record` then reports its results lost.
`record` and `delete` drop what was read ahead for their message, whatever the outcome;
`renew` keeps it as long as the renewed lease.)

Counts (every metrics scrape and readiness probe) come from counters that triggers keep
in the transaction of every change, whoever makes it (sqlite_schema.py), not from the rows.

Rows that cannot be decoded are set aside (`held = 2`, reason in `last_error`): never
leased again, counted as "set_aside", never fatal.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, TypeVar

from mailqueue import sqlite_admin as admin_sql
from mailqueue import sqlite_leases as leasing
from mailqueue import sqlite_ops as ops
from mailqueue import sqlite_schema as schema
from mailqueue.admin import (
    AdminAction,
    AdminResult,
    BounceCandidate,
    BounceReport,
    JournalEntry,
    Selection,
)
from mailqueue.ids import QueueIds
from mailqueue.model import (
    FINAL_STATES,
    Lease,
    MessageRecord,
    NewMessage,
    RcptState,
    RecipientResult,
    Recorded,
)
from mailqueue.rows import check_envelope as _check_envelope
from mailqueue.schedule import RetrySchedule
from mailqueue.store import MessageNotFound, StoreUnavailable
from mailqueue.writer import GroupCommitWriter, as_unavailable

T = TypeVar("T")
PREFETCH_MAX_SIZE = 64 * 1024  # contents up to this size are read while leasing
PREFETCH_MAX_BYTES = 16 * 1024 * 1024  # at most this much read ahead at any time


@dataclass(slots=True)
class _Prefetched:
    data: bytes
    reads: int  # leases of this message not yet read
    until: float  # the end of the lease: kept no longer


class SqliteStore:
    """The embedded QueueStore. Async methods; construct, then `await open()`."""

    writer_class: ClassVar[type[GroupCommitWriter]] = GroupCommitWriter

    def __init__(
        self,
        path: str | Path,
        *,
        schedule: RetrySchedule,
        lifetime: float,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self.path = Path(path)
        self.schedule = schedule
        self.lifetime = lifetime
        self._clock = clock
        self._busy_ms = int(busy_timeout * 1000)
        self._rng = rng or random.Random()  # noqa: S311 (jitter and id spread, not secrets)
        self._ids = QueueIds(self._rng)
        self._writer = self._new_writer()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._open = False
        self._prefetched: dict[str, _Prefetched] = {}  # event-loop side only
        self.recovered_leases = 0  # leases of a dead previous process returned by open()
        self.migrated_from: int | None = None  # schema version open() found (None: new store)

    @property
    def commits(self) -> int:
        """Write transactions committed so far (group commit batches many puts into one)."""
        return self._writer.commits

    async def writable(self) -> str | None:
        """None when the store takes writes, else why not (one safe line): the last write
        failed for want of storage (a probe write that needs fresh space is tried then,
        so this turns None again as soon as the store can write), or the database or WAL
        file is no longer the one opened (writer.py: nothing is committed then)."""
        if not self._open:
            return "queue store is not open"
        change = await asyncio.to_thread(self._writer.files.changed)
        if change is None and self._writer.failure is None:
            return None
        try:
            await self._write(_probe_write)
        except StoreUnavailable as exc:
            return str(exc)
        self._writer.failure = None  # room for a typical message again
        return None

    def _new_writer(self) -> GroupCommitWriter:
        # The write lock hands the file over promptly between processes (writer.py).
        lock = Path(f"{self.path}.write-lock")
        return self.writer_class(self._write_connection, watch=self._files(), write_lock=lock)

    def _files(self) -> tuple[Path, Path]:
        return self.path, Path(f"{self.path}-wal")  # the database first (writer.FileWatch)

    def _write_connection(self) -> sqlite3.Connection:
        return self._connect(readonly=False)

    # -- lifecycle -------------------------------------------------------------------

    def _connect(self, *, readonly: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=self._busy_ms / 1e3
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            # RFC 5321 §6.1: once we said 250 the message must survive a crash, so every
            # commit is fsync'd (FULL also syncs the WAL on each commit).
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            if readonly:
                conn.execute("PRAGMA query_only = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        """Create or check the queue tables; recover a dead previous process's leases."""
        conn = await asyncio.to_thread(self._open_sync)
        self._writer = self._new_writer()  # reopenable
        self._writer.start(conn)
        self._open = True

    def _open_sync(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            sole = self._lock()
            conn = self._connect(readonly=False)
        except (OSError, sqlite3.Error) as exc:
            self._unlock()
            raise StoreUnavailable(f"queue store {self.path}: {exc}") from exc
        try:
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
                raise StoreUnavailable(f"queue store {self.path}: WAL mode unavailable")
            conn.execute("BEGIN IMMEDIATE")
            try:
                self.migrated_from = schema.prepare(conn)
            except schema.SchemaMismatch as exc:
                raise StoreUnavailable(f"queue store {self.path}: {exc}") from exc
            if sole:
                self.recovered_leases = conn.execute(
                    "UPDATE queue_recipients SET lease_owner = NULL, lease_until = NULL,"
                    " next_attempt_at = ? WHERE lease_owner IS NOT NULL",
                    (self._clock(),),
                ).rowcount
            conn.execute("COMMIT")
            if sole and self._lock_fd is not None:
                # Only now share: an opener that got the exclusive lock while we converted
                # recovers before our open() returns, so before we hold any lease.
                fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        except BaseException as exc:
            conn.close()
            self._unlock()
            if isinstance(exc, sqlite3.Error):
                raise as_unavailable(exc) from exc
            raise
        return conn

    def _lock(self) -> bool:
        """Take the lock file: exclusive (returns True: we are alone, leases are stale) or
        shared (False). Every open store keeps a shared lock until close()."""
        try:
            fd = os.open(f"{self.path}.queue-lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return False  # cannot tell: leave leases to expire on their own
        self._lock_fd = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits at most for another opener's recovery
            return False
        return True

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def close(self) -> None:
        """Finish pending writes, close connections, drop the lock."""
        if not self._open:
            return
        self._open = False
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        self._writer.stop()
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        self._unlock()

    # -- plumbing ----------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if not self._open:
            raise StoreUnavailable("queue store is not open")
        return await asyncio.to_thread(self._read_sync, fn)

    def _read_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._readers_lock:
            conn = self._readers.pop() if self._readers else None
        try:
            conn = conn or self._connect(readonly=True)
            conn.execute("BEGIN")  # one snapshot for all the statements of `fn`
            result = fn(conn)
            conn.execute("ROLLBACK")
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreUnavailable(f"queue store: {exc}") from exc
            raise
        with self._readers_lock:
            self._readers.append(conn)
        return result

    async def _write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if not self._open:
            raise StoreUnavailable("queue store is not open")
        return await self._writer.submit(op)

    # -- the queue ---------------------------------------------------------------------

    async def put(self, msg: NewMessage) -> str:
        """Store a message; returns its queue id only after the commit is fsync'd.

        Raises StoreUnavailable (nothing stored) and ValueError for an envelope with no
        recipient or a recipient without '@'. Duplicate recipients are stored once.
        """
        _check_envelope(msg)
        return await self._write(
            lambda conn: ops.insert_message(conn, self._ids, msg, self._clock())
        )

    async def lease_due(self, owner: str, limit: int, lease_seconds: float) -> list[Lease]:
        """Lease up to `limit` (message, domain) groups of due, non-held recipients."""
        if not owner:
            raise ValueError("a lease needs an owner")  # "" names the leases made by hand
        if limit <= 0:
            return []

        room = PREFETCH_MAX_BYTES - sum(len(p.data) for p in self._prefetched.values())
        max_size = min(PREFETCH_MAX_SIZE, room // limit)

        def op(conn: sqlite3.Connection) -> tuple[list[Lease], dict[str, bytes]]:
            now = self._clock()
            until = now + lease_seconds
            contents: dict[str, bytes] = {}
            leases = leasing.lease_due(
                conn, owner, limit, until, now, self.lifetime, max_size=max_size, contents=contents
            )
            return leases, contents

        leases, contents = await self._write(op)
        self._keep_prefetched(leases, contents)
        return leases

    def _keep_prefetched(self, leases: list[Lease], contents: dict[str, bytes]) -> None:
        now = self._clock()
        for queue_id in [q for q, p in self._prefetched.items() if p.until <= now]:
            del self._prefetched[queue_id]  # its lease ran out unread (a worker gave up)
        for lease in leases:
            data = contents.get(lease.queue_id)
            if data is None:
                continue
            held = self._prefetched.get(lease.queue_id)
            if held is None:
                self._prefetched[lease.queue_id] = _Prefetched(data, 1, lease.until)
            else:
                held.reads += 1
                held.until = max(held.until, lease.until)

    def _take_prefetched(self, queue_id: str) -> bytes | None:
        held = self._prefetched.get(queue_id)
        if held is None:
            return None
        held.reads -= 1
        if held.reads <= 0:
            del self._prefetched[queue_id]
        return held.data

    async def read_data(self, queue_id: str) -> bytes:
        """The stored message; raises MessageNotFound (gone, or set aside as unreadable)."""
        prefetched = self._take_prefetched(queue_id)
        if prefetched is not None:
            return prefetched
        data = await self._read(lambda conn: ops.read_data(conn, queue_id))
        if data is None:
            raise MessageNotFound(queue_id)
        return data

    async def record(
        self, lease: Lease, results: Sequence[RecipientResult], dsn: NewMessage | None = None
    ) -> Recorded:
        """Apply outcomes to the rows still under `lease` and queue `dsn` (only if some
        outcome was applied), in one commit: see QueueStore.record.

        SENT/BOUNCED are final; DEFERRED counts an attempt and follows the schedule. A
        message whose recipients are all final is deleted. Raises StoreUnavailable
        (nothing stored: retry the same call) and ValueError (nothing stored).
        """
        if any(r.state not in (*FINAL_STATES, RcptState.DEFERRED) for r in results):
            raise ValueError("a result is SENT, BOUNCED or DEFERRED")
        if len({r.address for r in results}) != len(results):
            raise ValueError("one result per address")
        if dsn is not None:
            _check_envelope(dsn)
        self._prefetched.pop(lease.queue_id, None)  # the message may be gone after this

        def op(conn: sqlite3.Connection) -> Recorded:
            return leasing.record_lease(
                conn,
                self._ids,
                lease,
                results,
                dsn,
                now=self._clock(),
                schedule=self.schedule,
                rng=self._rng,
                lifetime=self.lifetime,
            )

        return await self._write(op)

    async def renew(self, lease: Lease, until: float) -> Lease | None:
        """Extend a lease we still hold to `until`; the returned Lease replaces `lease`
        (its recipients: those still under it). None when it is no longer ours."""
        renewed = await self._write(lambda conn: leasing.renew_lease(conn, lease, until))
        if not renewed:
            return None
        held = self._prefetched.get(lease.queue_id)
        if held is not None:
            held.until = max(held.until, until)
        kept = set(renewed)
        recipients = tuple(r for r in lease.recipients if r.address in kept)
        return replace(lease, until=until, recipients=recipients)

    async def release(self, lease: Lease) -> None:
        """Give a lease back without an attempt: due again now, attempts unchanged. Only
        rows still under it (same owner and until) are touched."""
        self._take_prefetched(lease.queue_id)
        await self._write(lambda conn: leasing.release_lease(conn, lease, self._clock()))

    async def next_due_at(self) -> float | None:
        """Earliest next_attempt_at of leasable rows (a live lease counts as its end)."""
        return await self._read(ops.next_due_at)

    # -- admin (safe from another process while the relay runs) -----------------------

    async def list_messages(self, limit: int | None = None) -> list[MessageRecord]:
        return await self._read(lambda conn: ops.list_messages(conn, limit))

    async def get_message(self, queue_id: str) -> MessageRecord | None:
        return await self._read(lambda conn: ops.get_message(conn, queue_id))

    async def delete(self, queue_id: str) -> bool:
        self._prefetched.pop(queue_id, None)
        return await self._write(lambda conn: ops.delete_message(conn, queue_id))

    async def hold(self, queue_id: str) -> bool:
        return await self._write(lambda conn: ops.set_held(conn, queue_id, True))

    async def release_hold(self, queue_id: str) -> bool:
        return await self._write(lambda conn: ops.set_held(conn, queue_id, False))

    async def flush(self, queue_id: str | None = None) -> int:
        return await self._write(lambda conn: ops.flush(conn, queue_id, self._clock()))

    async def counts(self) -> dict[str, int]:
        return await self._read(ops.counts)

    # -- bulk administration and its journal (sqlite_admin.py) ------------------------

    async def select(self, selection: Selection) -> list[MessageRecord]:
        """The messages of `selection`, oldest first."""
        return await self._read(
            lambda conn: admin_sql.list_selected(conn, selection, self._clock())
        )

    async def administer(
        self,
        action: AdminAction,
        selection: Selection,
        *,
        operator: str,
        reason: str = "",
        report: BounceReport | None = None,
    ) -> AdminResult:
        """Apply `action` to `selection` and journal it, in one transaction."""

        def checked(candidate: BounceCandidate) -> NewMessage | None:
            message = report(candidate) if report is not None else None
            if message is not None:
                _check_envelope(message)
            return message

        prepared = None
        if action is AdminAction.BOUNCE and report is not None:
            # The reports are built before the write transaction: the relay keeps writing.
            prepared = await self._read(
                lambda conn: admin_sql.prepare_bounce(conn, selection, self._clock(), checked)
            )

        def op(conn: sqlite3.Connection) -> AdminResult:
            return admin_sql.apply_admin(
                conn,
                self._ids,
                action,
                selection,
                now=self._clock(),
                operator=operator,
                reason=reason,
                report=checked if report is not None else None,
                prepared=prepared,
            )

        for queue_id in selection.queue_ids:
            self._prefetched.pop(queue_id, None)
        return await self._write(op)

    async def journal(self, after: int, limit: int = 500) -> list[JournalEntry]:
        """Journal entries above id `after`, oldest first."""
        return await self._read(lambda conn: admin_sql.read_journal(conn, after, limit))

    async def journal_head(self) -> int:
        return await self._read(admin_sql.journal_head)

    async def journal_logged(self) -> int:
        """The id of the last journal entry a relay logged."""
        return await self._read(admin_sql.journal_logged)

    async def mark_journal_logged(self, upto: int) -> None:
        await self._write(lambda conn: admin_sql.mark_journal_logged(conn, upto, self._clock()))


_PROBE_BYTES = 64 * 1024  # a typical message: a probe write needs this much fresh space


def _probe_write(conn: sqlite3.Connection) -> None:
    """A write that needs fresh pages (as storing a message does), undone before commit."""
    conn.execute(
        "INSERT INTO queue_meta (key, value) VALUES ('write_probe', zeroblob(?))", (_PROBE_BYTES,)
    )
    conn.execute("DELETE FROM queue_meta WHERE key = 'write_probe'")
