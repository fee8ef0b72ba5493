"""PostgresStore: the queue store of several relay nodes sharing one PostgreSQL database.

Owns the `queue_*` tables, functions and triggers of that database (postgres_schema.py);
other tenants (the policy cache, the TLS-report counters) keep their own tables beside
them. Same contract as the embedded SqliteStore (mailqueue/store.py): same methods, same
values, same exceptions; the pure rules are shared with it (mailqueue/rows.py, admin.py,
schedule.py, model.py), only the SQL differs. Knows durability, leases and the retry
schedule; nothing of TLS, SMTP or MTA-STS.

- Durability: `put` returns only after the COMMIT that holds the message, with
  synchronous_commit set on in every session; concurrent puts share one transaction
  (group commit, postgres_writer.py).
- Leases across nodes: due work is found through the partial index `queue_recipients_due`
  and leased under `FOR NO KEY UPDATE SKIP LOCKED` message locks (postgres_leases.py), so
  no (message, domain) is leased twice while a lease is live, on any node. An expired
  lease is due again for every node: a dead node's mail is delivered by the others after
  its `lease_until`, or at once once someone calls `release_owner` for it. There is no
  recovery at `open()` (a node cannot know that it is alone).
- Admin changes write their journal entry and NOTIFY `channel` in their transaction;
  `notifications()` wakes a node when any node changed the queue, and `claim_journal()`
  hands each journal entry to exactly one node for its log.
- Database away: every call fails promptly with StoreUnavailable (connect, statement and
  lock timeouts), never with a psycopg exception, and works again once the database is
  back, without a restart (postgres_connections.py). Nodes' clocks decide when a lease
  ends: keep them synchronised (NTP), as lease_time is far larger than their drift.

Counts come from counters kept by triggers (postgres_schema.py), folded together now and
then by `maintain()`, which the store runs every `maintenance_every` seconds (one node at
a time); it also drops receipts older than RECEIPT_KEEP.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from mailqueue import postgres_admin as admin_sql
from mailqueue import postgres_leases as leasing
from mailqueue import postgres_ops as ops
from mailqueue import postgres_schema as schema
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
    RECEIPT_KEEP,
    Lease,
    MessageRecord,
    NewMessage,
    RcptState,
    RecipientResult,
    Recorded,
)
from mailqueue.postgres_connections import Connections, StatementFailed, redacted
from mailqueue.postgres_notify import Listener
from mailqueue.postgres_writer import GroupCommit, Outcome
from mailqueue.rows import check_envelope
from mailqueue.schedule import RetrySchedule
from mailqueue.store import MessageNotFound, StoreUnavailable

T = TypeVar("T")
DEFAULT_CHANNEL = "sts_relay_queue"
_PROBE_BYTES = 64 * 1024  # a typical message: a probe write stores this much


class PostgresStore:
    """The shared QueueStore. Async methods; construct, then `await open()`."""

    def __init__(
        self,
        url: str,
        *,
        schedule: RetrySchedule,
        lifetime: float,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        pool_size: int = 10,
        connect_timeout: float = 5.0,
        statement_timeout: float = 30.0,
        lock_timeout: float = 10.0,
        admin_timeout: float = 600.0,
        channel: str = DEFAULT_CHANNEL,
        maintenance_every: float | None = 5.0,
    ) -> None:
        """`url`: postgresql://user:password@host:port/database (libpq's URL; its query
        may add libpq parameters such as sslmode). `pool_size`: sessions this store opens
        at most (plus one to LISTEN). `connect_timeout`, `statement_timeout`,
        `lock_timeout`: how long any call may wait on the database; `admin_timeout`: the
        same for `administer` over a large selection. `maintenance_every`: seconds between
        two `maintain()` runs (None: never, for tests and one-off commands)."""
        self.url = url
        self.where = redacted(url)  # for messages: never the password
        self.schedule = schedule
        self.lifetime = lifetime
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 (jitter and id spread, not secrets)
        self._ids = QueueIds(self._rng)
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._statement_timeout = statement_timeout
        self._lock_timeout = lock_timeout
        self._admin_timeout = admin_timeout
        self.channel = channel
        self._maintenance_every = maintenance_every
        self._conns = self._new_connections()
        self._writer = GroupCommit(self._commit_puts)
        self._listener: Listener | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._open = False
        self.recovered_leases = 0  # SqliteStore's attribute: leases expire here instead
        self.migrated_from: int | None = None  # schema version open() found (None: new)

    def _new_connections(self) -> Connections:
        return Connections(
            self.url,
            size=self._pool_size,
            connect_timeout=self._connect_timeout,
            statement_timeout=self._statement_timeout,
            lock_timeout=self._lock_timeout,
        )

    @property
    def commits(self) -> int:
        """Write transactions committed so far by this store."""
        return self._conns.commits

    @property
    def put_batches(self) -> int:
        """Transactions that stored puts (group commit makes them far fewer than puts)."""
        return self._writer.batches

    @property
    def listening(self) -> bool:
        """Whether the LISTEN session of `notifications()` is up."""
        return self._listener is not None and self._listener.listening

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, and create or upgrade the queue's schema (once, whichever node starts
        first). Raises StoreUnavailable: unreachable database, refused login, bad URL,
        or a schema of a newer version."""
        if self._open:
            return
        self._conns = self._new_connections()  # reopenable after close()
        try:
            self.migrated_from = await self._conns.run(schema.prepare, deadline=self._admin_timeout)
        except schema.SchemaMismatch as exc:
            await self._conns.close()
            raise StoreUnavailable(f"queue store {self.where}: {exc}") from exc
        except StoreUnavailable as exc:
            await self._conns.close()
            raise StoreUnavailable(f"queue store {self.where}: {exc}") from exc
        self._writer = GroupCommit(self._commit_puts)
        self._writer.start()
        self._listener = Listener(self._listen_connection, self.channel)
        if self._maintenance_every is not None:
            self._maintenance = asyncio.create_task(
                self._maintain_every(self._maintenance_every), name="mailqueue-maintenance"
            )
        self._open = True

    async def close(self) -> None:
        """Store the puts still waiting, let calls in progress finish, close the sessions."""
        if not self._open:
            return
        self._open = False
        await self._writer.stop()
        if self._maintenance is not None:
            self._maintenance.cancel()
            await asyncio.wait({self._maintenance})
            self._maintenance = None
        if self._listener is not None:
            await self._listener.close()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight))
        await self._conns.close()

    async def writable(self) -> str | None:
        """None when the database takes writes, else why not (one safe line): it cannot be
        reached, it is a read-only standby, or the last write failed for a reason of the
        database's and a probe write fails too (so this turns None as soon as it works)."""
        if not self._open:
            return "queue store is not open"
        try:
            row = await self._run(_read_only_state, write=False)
            if row[0]:
                return f"queue store {self.where}: the database is a standby (read-only)"
            if row[1] == "on":
                return f"queue store {self.where}: the session is read-only"
            if self._conns.failure is not None:
                await self._run(_probe_write)
        except StoreUnavailable as exc:
            return str(exc)
        return None

    # -- plumbing ----------------------------------------------------------------------

    async def _run(
        self,
        op: Callable[[ops.Conn], Awaitable[T]],
        *,
        write: bool = True,
        deadline: float | None = None,
    ) -> T:
        """One transaction; it goes on to its end even when its caller stops waiting (a
        record whose reply is lost has still been committed: the caller's retry says)."""
        if not self._open:
            raise StoreUnavailable("queue store is not open")
        task = asyncio.ensure_future(self._conns.run(op, write=write, deadline=deadline))
        self._in_flight.add(task)
        task.add_done_callback(_settled)
        task.add_done_callback(self._in_flight.discard)
        return await asyncio.shield(task)

    async def _commit_puts(self, msgs: Sequence[NewMessage]) -> list[Outcome]:
        """One transaction for the batch; each message alone when the database refused
        the batch for one message's data (so only that one fails)."""
        now = self._clock()
        try:
            outcomes = await self._conns.run(
                lambda conn: ops.insert_messages(conn, self._ids, msgs, now)
            )
        except StatementFailed as exc:
            if len(msgs) == 1:
                return [exc]
            alone: list[Outcome] = []
            for msg in msgs:
                alone += await self._commit_puts([msg])
            return alone
        except StoreUnavailable as exc:
            return [_copy(exc) for _ in msgs]
        return list(outcomes)

    async def _listen_connection(self) -> ops.Conn:
        return await self._conns.connect(autocommit=True)

    async def _maintain_every(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(StoreUnavailable):
                await self.maintain()

    # -- the queue ---------------------------------------------------------------------

    async def put(self, msg: NewMessage) -> str:
        """Store a message; returns its queue id only after its COMMIT returned.

        Raises StoreUnavailable (nothing stored; also for a submitter-chosen queue id
        already in the queue) and ValueError for an envelope with no recipient or a
        recipient without '@'. Duplicate recipients are stored once.
        """
        check_envelope(msg)
        if not self._open:
            raise StoreUnavailable("queue store is not open")
        return await self._writer.put(msg)

    async def lease_due(self, owner: str, limit: int, lease_seconds: float) -> list[Lease]:
        """Lease up to `limit` (message, domain) groups of due, non-held recipients."""
        if not owner:
            raise ValueError("a lease needs an owner")  # "" names the leases made by hand
        if limit <= 0:
            return []
        now = self._clock()
        until = now + lease_seconds
        return await self._run(
            lambda conn: leasing.lease_due(conn, owner, limit, until, now, self.lifetime)
        )

    async def read_data(self, queue_id: str) -> bytes:
        """The stored message; raises MessageNotFound."""
        data = await self._run(lambda conn: ops.read_data(conn, queue_id), write=False)
        if data is None:
            raise MessageNotFound(queue_id)
        return data

    async def record(
        self, lease: Lease, results: Sequence[RecipientResult], dsn: NewMessage | None = None
    ) -> Recorded:
        """Apply outcomes to the rows still under `lease` and queue `dsn` (only if some
        outcome was applied), in one commit: see QueueStore.record."""
        if any(r.state not in (*FINAL_STATES, RcptState.DEFERRED) for r in results):
            raise ValueError("a result is SENT, BOUNCED or DEFERRED")
        if len({r.address for r in results}) != len(results):
            raise ValueError("one result per address")
        if dsn is not None:
            check_envelope(dsn)
        now = self._clock()
        return await self._run(
            lambda conn: leasing.record_lease(
                conn,
                self._ids,
                lease,
                results,
                dsn,
                now=now,
                schedule=self.schedule,
                rng=self._rng,
                lifetime=self.lifetime,
            )
        )

    async def renew(self, lease: Lease, until: float) -> Lease | None:
        """Extend a lease we still hold to `until`; the returned Lease replaces `lease`
        (its recipients: those still under it). None when it is no longer ours."""
        renewed = await self._run(lambda conn: leasing.renew_lease(conn, lease, until))
        if not renewed:
            return None
        kept = set(renewed)
        recipients = tuple(r for r in lease.recipients if r.address in kept)
        return replace(lease, until=until, recipients=recipients)

    async def release(self, lease: Lease) -> None:
        """Give a lease back without an attempt: due again now, attempts unchanged. Only
        rows still under it (same owner and until) are touched."""
        now = self._clock()
        await self._run(lambda conn: leasing.release_lease(conn, lease, now))

    async def release_owner(self, owner: str) -> int:
        """Every lease `owner` holds due again now (its process or node is known to be
        dead, so nothing of it is in delivery); how many recipients. Other nodes are
        told, so they may take the work at once."""
        now = self._clock()

        async def op(conn: ops.Conn) -> int:
            released = await leasing.release_owner(conn, owner, now)
            if released:
                await ops.notify(conn, self.channel, "release_owner")
            return released

        return await self._run(op)

    async def next_due_at(self) -> float | None:
        """Earliest next_attempt_at of leasable rows (a live lease counts as its end)."""
        return await self._run(ops.next_due_at, write=False)

    # -- admin -----------------------------------------------------------------------

    async def list_messages(self, limit: int | None = None) -> list[MessageRecord]:
        return await self._run(lambda conn: ops.list_messages(conn, limit), write=False)

    async def get_message(self, queue_id: str) -> MessageRecord | None:
        return await self._run(lambda conn: ops.get_message(conn, queue_id), write=False)

    async def delete(self, queue_id: str) -> bool:
        return await self._changed(lambda conn: ops.delete_message(conn, queue_id), "delete")

    async def hold(self, queue_id: str) -> bool:
        return await self._changed(lambda conn: ops.set_held(conn, queue_id, True), "hold")

    async def release_hold(self, queue_id: str) -> bool:
        return await self._changed(lambda conn: ops.set_held(conn, queue_id, False), "release")

    async def flush(self, queue_id: str | None = None) -> int:
        now = self._clock()
        return await self._changed(lambda conn: ops.flush(conn, queue_id, now), "flush")

    async def _changed(self, change: Callable[[ops.Conn], Awaitable[T]], what: str) -> T:
        """Run `change`; when it changed something, NOTIFY the other nodes at its commit."""

        async def op(conn: ops.Conn) -> T:
            done = await change(conn)
            if done:
                await ops.notify(conn, self.channel, what)
            return done

        return await self._run(op)

    async def counts(self) -> dict[str, int]:
        return await self._run(ops.counts, write=False)

    async def maintain(self) -> bool:
        """Fold the counters' deltas and drop receipts older than RECEIPT_KEEP; False when
        another node was doing it at that moment. Run every `maintenance_every` seconds."""
        now = self._clock()

        async def op(conn: ops.Conn) -> bool:
            row = await ops.fetchone(
                conn, "SELECT pg_try_advisory_xact_lock(%s)", (schema.MAINTENANCE_LOCK,)
            )
            if row is None or not row[0]:
                return False
            await conn.execute(schema.COMPACT_COUNTS)
            await conn.execute("DELETE FROM queue_counts WHERE n = 0")
            await conn.execute(
                "DELETE FROM queue_receipts WHERE recorded_at < %s", (now - RECEIPT_KEEP,)
            )
            return True

        return await self._run(op)

    # -- bulk administration and its journal (postgres_admin.py) ----------------------

    async def select(self, selection: Selection) -> list[MessageRecord]:
        """The messages of `selection`, oldest first."""
        now = self._clock()
        return await self._run(
            lambda conn: admin_sql.list_selected(conn, selection, now), write=False
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
        """Apply `action` to `selection`, journal it and NOTIFY the other nodes, in one
        transaction."""

        def checked(candidate: BounceCandidate) -> NewMessage | None:
            message = report(candidate) if report is not None else None
            if message is not None:
                check_envelope(message)
            return message

        prepared = None
        if action is AdminAction.BOUNCE and report is not None:
            # The reports are built before the write transaction: it holds its locks less.
            at = self._clock()

            async def prepare(conn: ops.Conn) -> admin_sql.Prepared:
                await _unbounded(conn)
                return await admin_sql.prepare_bounce(conn, selection, at, checked)

            prepared = await self._run(prepare, write=False, deadline=self._admin_timeout)
        now = self._clock()

        async def op(conn: ops.Conn) -> AdminResult:
            await _unbounded(conn)
            return await admin_sql.apply_admin(
                conn,
                self._ids,
                action,
                selection,
                now=now,
                operator=operator,
                reason=reason,
                report=checked if report is not None else None,
                prepared=prepared,
                channel=self.channel,
            )

        return await self._run(op, deadline=self._admin_timeout)

    async def journal(self, after: int, limit: int = 500) -> list[JournalEntry]:
        """Journal entries above id `after`, oldest first."""
        return await self._run(lambda conn: admin_sql.read_journal(conn, after, limit), write=False)

    async def journal_head(self) -> int:
        return await self._run(admin_sql.journal_head, write=False)

    async def journal_logged(self) -> int:
        """How far the journal is logged: every entry up to this id is (0: none)."""
        return await self._run(admin_sql.journal_logged, write=False)

    async def mark_journal_logged(self, upto: int) -> None:
        now = self._clock()
        await self._run(lambda conn: admin_sql.mark_journal_logged(conn, upto, now))

    async def claim_journal(self, limit: int = 500) -> list[JournalEntry]:
        """Journal entries no node has logged yet, now marked as logged: the caller logs
        them. With several nodes claiming, each entry goes to exactly one (oldest first)."""
        now = self._clock()
        return await self._run(lambda conn: admin_sql.claim_journal(conn, now, limit))

    def notifications(self) -> AsyncGenerator[None, None]:
        """Yields once when the LISTEN session is up (and after each reconnection), then
        once per burst of changes made by any node (admin changes, flush, hold, release,
        release_owner): look at the queue again then. Ends when the store closes. The
        session opens with the first subscriber."""
        if self._listener is None:
            raise StoreUnavailable("queue store is not open")
        return self._listener.subscribe()


async def _unbounded(conn: ops.Conn) -> None:
    """No statement or idle-in-transaction timeout for this transaction: an operator's
    change over a large selection may take long (`admin_timeout` bounds it instead), and
    building bounce reports in Python leaves the transaction idle meanwhile."""
    await conn.execute("SET LOCAL statement_timeout = 0")
    await conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")


async def _read_only_state(conn: ops.Conn) -> tuple[Any, ...]:
    row = await ops.fetchone(
        conn, "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')"
    )
    return row if row is not None else (False, "off")


async def _probe_write(conn: ops.Conn) -> None:
    """A write that needs fresh space (as storing a message does), committed."""
    await conn.execute(
        "INSERT INTO queue_meta (key, value) VALUES ('write_probe', repeat('x', %s))"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (_PROBE_BYTES,),
    )
    await conn.execute("DELETE FROM queue_meta WHERE key = 'write_probe'")


def _settled(task: asyncio.Task[Any]) -> None:
    """Retrieve the outcome of a transaction whose caller stopped waiting (no warning)."""
    if not task.cancelled():
        task.exception()


def _copy(exc: StoreUnavailable) -> StoreUnavailable:
    """One exception per caller: the same object raised in many tasks shares a traceback."""
    copy = type(exc)(str(exc))
    copy.__cause__ = exc.__cause__
    return copy
