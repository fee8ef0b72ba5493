"""Connections of the PostgreSQL queue store: how a session is set up, a small pool, one
transaction per operation, and what a driver error means for the caller.

Every session is set up explicitly, whatever the server's or the role's defaults say:
`synchronous_commit = on` (RFC 5321 §6.1: a COMMIT returns only once it is durable, on the
standbys too where synchronous replication is configured), READ COMMITTED (the leasing
statements rely on each statement seeing what committed before it started), and statement,
lock and idle-in-transaction timeouts so that no call waits on the database for long.

The database may go away at any time (restart, failover, network). There is no
background reconnection: a connection is made when an operation needs one, in at most
`connect_timeout`, so every call fails promptly with StoreUnavailable while the server is
away and works again as soon as it is back. A connection found broken throws every idle
one away (after a restart they are all dead), and an operation that failed on a reused
connection before its COMMIT was sent is run once more on a fresh one (nothing of it was
stored: the server rolls back what a lost session did).

Only the outcome of a COMMIT whose reply never came is unknown; the caller gets
StoreUnavailable then, as for a failure: the stored work is what a retry finds (a `put`
retried by its SMTP client is stored twice, the duplicate window SMTP always leaves open;
`record`, `renew` and `release` are safe to retry, mailqueue/store.py).

Knows psycopg and asyncio; nothing of messages, leases or schedules.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict

from mailqueue.store import StoreUnavailable

T = TypeVar("T")
Op = Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]

# A lost race between transactions (a deadlock broken by the server, a serialization
# failure): nothing was stored, the operation runs again.
_RACE_ERRORS = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)
_RACE_RETRIES = 5
# Errors of one operation's own data (a duplicate queue id, a NUL in a text field): the
# database itself took writes.
_OPERATION_ERRORS = (psycopg.IntegrityError, psycopg.DataError, UnicodeEncodeError)


class StatementFailed(StoreUnavailable):
    """The database refused this operation's data (a constraint, a value it cannot hold);
    nothing of it was stored, and the store works for other operations."""


def redacted(url: str) -> str:
    """Host, port and database of `url`, for messages (never its password)."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://(unparsable URL)"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{host}{port}/{params.get('dbname', '')}"


def unavailable(exc: BaseException, what: str = "queue store") -> StoreUnavailable:
    """The store's one documented failure for a driver error (its first line only: the
    server's message, never the URL)."""
    if isinstance(exc, StoreUnavailable):
        return exc
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    cls = StatementFailed if isinstance(exc, _OPERATION_ERRORS) else StoreUnavailable
    failure = cls(f"{what}: {text}")
    failure.__cause__ = exc
    return failure


class Connections:
    """Up to `size` open sessions to one database; `run(op)` is one transaction."""

    def __init__(
        self,
        url: str,
        *,
        size: int,
        connect_timeout: float,
        statement_timeout: float,
        lock_timeout: float,
        application_name: str = "sts-relay",
    ) -> None:
        self.url = url
        self._size = size
        self._connect_timeout = connect_timeout
        self._statement_timeout = statement_timeout
        self._lock_timeout = lock_timeout
        self._application_name = application_name
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._slots = asyncio.Semaphore(size)
        self._closed = False
        self.commits = 0  # write transactions committed
        # Why the last write failed for a reason of the database's (None: it committed).
        self.failure: str | None = None

    # -- sessions ----------------------------------------------------------------------

    def _connect_kwargs(self) -> dict[str, Any]:
        given = conninfo_to_dict(self.url)
        kwargs: dict[str, Any] = {
            "autocommit": True,  # for the SETs; transactions are explicit after them
            "connect_timeout": max(1, round(self._connect_timeout)),
            "application_name": given.get("application_name", self._application_name),
        }
        # A server that vanishes without closing (power, network) is noticed within
        # seconds, not after the kernel's two hours; the URL may say otherwise.
        keepalives = {
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 3,
            "keepalives_count": 3,
        }
        kwargs |= {k: v for k, v in keepalives.items() if k not in given}
        return kwargs

    async def connect(self, *, autocommit: bool = False) -> psycopg.AsyncConnection[Any]:
        """A new session, set up (raises psycopg errors and OSError)."""
        async with asyncio.timeout(self._connect_timeout + 1):
            conn = await psycopg.AsyncConnection.connect(self.url, **self._connect_kwargs())
            try:
                ms = int(self._statement_timeout * 1000)
                await conn.execute(
                    # Set on the session itself: a role or database default of `off` or
                    # `local` must never make a COMMIT return before it is durable.
                    "SET synchronous_commit = on;"
                    " SET default_transaction_isolation = 'read committed';"
                    f" SET statement_timeout = {ms};"
                    f" SET lock_timeout = {int(self._lock_timeout * 1000)};"
                    f" SET idle_in_transaction_session_timeout = {ms * 2};"
                )
                if not autocommit:
                    await conn.set_autocommit(False)
            except BaseException:
                await conn.close()
                raise
        return conn

    async def _acquire(self) -> tuple[psycopg.AsyncConnection[Any], bool]:
        """A session and whether it was reused (idle in the pool)."""
        while self._idle:
            conn = self._idle.pop()
            if not (conn.closed or conn.broken):
                return conn, True
            await conn.close()
        return await self.connect(), False

    async def _release(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Back to the pool when sound and idle; closed otherwise."""
        idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if self._closed or conn.closed or conn.broken or not idle:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()
            return
        self._idle.append(conn)

    async def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    async def close(self) -> None:
        self._closed = True
        await self._drop_idle()

    # -- transactions ------------------------------------------------------------------

    async def run(self, op: Op[T], *, deadline: float | None = None, write: bool = True) -> T:
        """Run `op` in one transaction and commit it; its result once committed.

        Raises StoreUnavailable (nothing stored, except when the COMMIT's reply was lost),
        StatementFailed (this operation's data was refused), or what `op` itself raised
        (after a rollback). `deadline`: seconds for the whole call (default: statement
        timeout plus connecting).
        """
        if self._closed:
            raise StoreUnavailable("queue store is closed")
        limit = deadline or (self._statement_timeout + self._connect_timeout + 5)
        try:
            async with asyncio.timeout(limit), self._slots:
                return await self._run(op, write=write)
        except TimeoutError as exc:
            raise StoreUnavailable(f"queue store: no answer within {limit:g} s") from exc

    async def _run(self, op: Op[T], *, write: bool) -> T:
        races = 0
        stale_retry = True
        while True:
            try:
                conn, reused = await self._acquire()
            except (psycopg.Error, OSError) as exc:
                raise self._failed(exc, write) from exc
            committing = False
            try:
                result = await op(conn)
                committing = True
                await conn.commit()
            except BaseException as exc:
                broken = conn.broken or conn.closed
                cancelled = isinstance(exc, asyncio.CancelledError)
                await self._abandon(conn, committing or cancelled)
                if cancelled:
                    raise
                if isinstance(exc, _RACE_ERRORS) and races < _RACE_RETRIES:
                    races += 1
                    continue
                if broken:
                    await self._drop_idle()  # a restart or failover: they are all dead
                    if reused and stale_retry and not committing:
                        stale_retry = False  # nothing of it was stored: once more
                        continue
                if isinstance(exc, psycopg.Error | OSError | UnicodeEncodeError):
                    raise self._failed(exc, write) from exc
                raise
            await self._release(conn)
            if write:
                self.commits += 1
                self.failure = None
            return result

    async def _abandon(self, conn: psycopg.AsyncConnection[Any], unsure: bool) -> None:
        """After a failure: roll back and keep the session if it is sound, else close it
        (`unsure`: a COMMIT or a statement was cut off; what the session is doing is
        unknown)."""
        if not (conn.closed or conn.broken or unsure):
            try:
                await conn.rollback()
            except (psycopg.Error, OSError):
                pass
            else:
                await self._release(conn)
                return
        with contextlib.suppress(psycopg.Error, OSError):
            await conn.close()

    def _failed(self, exc: BaseException, write: bool) -> StoreUnavailable:
        failure = unavailable(exc)
        if write and not isinstance(failure, StatementFailed):
            self.failure = str(failure)
        return failure
