"""The posture aggregates in PostgreSQL, shared by every relay node on one database
(`state.url = postgresql://...`, issue 15): the second engine of the PostureStore
interface (posture/store.py), with SqlitePostureStore's semantics and rows
(posture/store_rows.py): daily counts are added in the database (each node's flush adds
to what the others wrote), a waiting entry is upserted keeping the earliest `since` any
node saw, and `write` is all or nothing.

Owns the `posture_` tables and the row `posture` of the schema versions table
(`sts_relay_schema`), created or upgraded when a store is opened, under the relay's schema
lock. `readonly` (the report command) creates nothing and writes nothing; a database
whose relay never counted anything reads as empty. Methods are synchronous and
thread-safe; async callers run them with asyncio.to_thread. A failure of the database or
of the connection raises PostureStoreError (an OSError); the next call connects again.
Knows nothing of SMTP or the queue.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from pgstate.connection import Connection, Database
from posture.model import Cell, Figures, Waiting
from posture.store_rows import cells_from_rows, daily_rows, waiting_from_rows, waiting_row

COMPONENT: Final = "posture"
MIGRATIONS: Final[Sequence[Sequence[str]]] = (
    (
        """CREATE TABLE posture_daily (
            day           TEXT NOT NULL,
            domain        TEXT NOT NULL,
            status        TEXT NOT NULL,
            mechanism     TEXT NOT NULL,
            tls           TEXT NOT NULL,
            authenticated BOOLEAN NOT NULL,
            cause         TEXT NOT NULL,
            messages      BIGINT NOT NULL,
            recipients    BIGINT NOT NULL,
            PRIMARY KEY (day, domain, status, mechanism, tls, authenticated, cause)
        )""",
        """CREATE TABLE posture_waiting (
            key        TEXT PRIMARY KEY,
            domain     TEXT NOT NULL,
            recipients INTEGER NOT NULL,
            since      DOUBLE PRECISION NOT NULL,
            last_at    DOUBLE PRECISION NOT NULL,
            mechanism  TEXT NOT NULL,
            result     TEXT
        )""",
        "CREATE INDEX posture_waiting_last_at ON posture_waiting (last_at)",
    ),
)
# synchronous_commit as the server has it (no "on" forced, unlike the policy cache and the
# TLS reports): counts, not mail; a crash of the server may lose the last flush.
_SESSION: Final = {"statement_timeout": "30s"}
_READONLY: Final = {**_SESSION, "default_transaction_read_only": "on"}
RECONNECT_PAUSE_S: Final = 1.0  # after a failed connection, calls fail at once this long


class PostureStoreError(OSError):
    """The PostgreSQL posture store failed, or its database could not be reached; one line
    naming the database, never its password."""


class PostgresPostureStore:
    """The `posture_*` tables in a PostgreSQL database (a PostureStore). Raises
    PostureStoreError (at construction too: an unreachable database at start is an
    error)."""

    def __init__(
        self,
        url: str,
        *,
        readonly: bool = False,
        reconnect_pause: float = RECONNECT_PAUSE_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._db = Database(
            url,
            PostureStoreError,
            component=COMPONENT,
            migrations=MIGRATIONS,
            session=_READONLY if readonly else _SESSION,
            reconnect_pause=reconnect_pause,
            monotonic=monotonic,
            create=not readonly,
        )
        self._empty = False
        if readonly:
            try:
                found = self._db.read(
                    lambda db: db.execute(
                        "SELECT to_regclass('posture_daily') IS NOT NULL"
                        " AND to_regclass('posture_waiting') IS NOT NULL"
                    ).fetchone()
                )
            except BaseException:
                self._db.close()
                raise
            self._empty = not (found and found[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def write(self, cells: Mapping[Cell, Figures], waiting: Mapping[str, Waiting | None]) -> None:
        """Add `cells` to the daily counts and apply `waiting` (an entry, or None to end
        it) in one transaction. Keys are written in order, so that nodes flushing at once
        lock them in the same order."""
        rows = sorted(daily_rows(cells))
        changes = sorted(waiting.items(), key=lambda item: item[0])
        if not rows and not changes:
            return

        def write(db: Connection) -> None:
            with db.pipeline():
                cursor = db.cursor()
                cursor.executemany(
                    "INSERT INTO posture_daily VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (day, domain, status, mechanism, tls, authenticated, cause)"
                    " DO UPDATE SET messages = posture_daily.messages + excluded.messages,"
                    " recipients = posture_daily.recipients + excluded.recipients",
                    rows,
                )
                for key, entry in changes:
                    if entry is None:
                        cursor.execute("DELETE FROM posture_waiting WHERE key = %s", (key,))
                        continue
                    cursor.execute(
                        # The earliest `since` stays: another node may have seen the wait begin.
                        "INSERT INTO posture_waiting VALUES (%s, %s, %s, %s, %s, %s, %s)"
                        " ON CONFLICT (key) DO UPDATE SET domain = excluded.domain,"
                        " recipients = excluded.recipients,"
                        " since = LEAST(posture_waiting.since, excluded.since),"
                        " last_at = excluded.last_at, mechanism = excluded.mechanism,"
                        " result = excluded.result",
                        waiting_row(entry),
                    )

        with self._lock:
            self._db.write(write)

    def cells(self, first_day: str, last_day: str) -> list[tuple[Cell, Figures]]:
        if self._empty:
            return []
        with self._lock:
            rows = self._db.read(
                lambda db: db.execute(
                    "SELECT day, domain, status, mechanism, tls, authenticated, cause,"
                    " messages, recipients FROM posture_daily WHERE day BETWEEN %s AND %s"
                    " ORDER BY day, domain",
                    (first_day, last_day),
                ).fetchall()
            )
        return cells_from_rows(rows)

    def waiting(self) -> list[Waiting]:
        if self._empty:
            return []
        with self._lock:
            rows = self._db.read(
                lambda db: db.execute(
                    "SELECT key, domain, recipients, since, last_at, mechanism, result"
                    " FROM posture_waiting ORDER BY since"
                ).fetchall()
            )
        return waiting_from_rows(rows)

    def prune(self, before_day: str, stale_before: float) -> None:
        def prune(db: Connection) -> None:
            db.execute("DELETE FROM posture_daily WHERE day < %s", (before_day,))
            db.execute("DELETE FROM posture_waiting WHERE last_at < %s", (stale_before,))

        with self._lock:
            self._db.write(prune)
