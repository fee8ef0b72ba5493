"""Where the posture aggregates are kept: a small interface and its SQLite engine.

Owns the `posture_` tables of the relay's state database and nothing else in it:
- `posture_daily`: one row per (UTC day, domain, status, mechanism, TLS version,
  authenticated, cause) with message and recipient counts. Rows per day are bounded by
  the domains mailed that day times a handful of combinations; days older than the
  retention are pruned (`prune`).
- `posture_waiting`: one row per (message, domain) currently waiting because its policy
  cannot be met; rows not refreshed by an attempt within the staleness bound are pruned
  (the message was deleted, held or expired).

The interface (`PostureStore`) is synchronous and thread-safe; async callers run it with
asyncio.to_thread. A second engine (PostgreSQL, issue 15) is one more class with these
five methods, sharing the rows (posture/store_rows.py). Corrupt rows are skipped, never
fatal. Knows nothing of SMTP or the queue.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from posture.model import Cell, Figures, Waiting
from posture.store_rows import cells_from_rows, daily_rows, waiting_from_rows, waiting_row

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS posture_daily (
        day TEXT NOT NULL,
        domain TEXT NOT NULL,
        status TEXT NOT NULL,
        mechanism TEXT NOT NULL,
        tls TEXT NOT NULL,
        authenticated INTEGER NOT NULL,
        cause TEXT NOT NULL,
        messages INTEGER NOT NULL,
        recipients INTEGER NOT NULL,
        PRIMARY KEY (day, domain, status, mechanism, tls, authenticated, cause)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS posture_waiting (
        key TEXT PRIMARY KEY,
        domain TEXT NOT NULL,
        recipients INTEGER NOT NULL,
        since REAL NOT NULL,
        last_at REAL NOT NULL,
        mechanism TEXT NOT NULL,
        result TEXT
    )""",
)
_BUSY_TIMEOUT_MS = 10_000


class PostureStore(Protocol):
    """The aggregates' storage, whatever the engine."""

    def write(self, cells: Mapping[Cell, Figures], waiting: Mapping[str, Waiting | None]) -> None:
        """Add `cells` to the daily counts and apply `waiting` (an entry, or None to end
        it) in one transaction: all or nothing."""

    def cells(self, first_day: str, last_day: str) -> list[tuple[Cell, Figures]]:
        """Every aggregate of the days in [first_day, last_day]."""

    def waiting(self) -> list[Waiting]:
        """Every (message, domain) now waiting on its policy."""

    def prune(self, before_day: str, stale_before: float) -> None:
        """Forget the days before `before_day` and the waiting entries whose last attempt
        was before `stale_before`."""

    def close(self) -> None: ...


class SqlitePostureStore:
    """The `posture_*` tables in the embedded SQLite state database.

    `readonly` (the report command): opened read-only, nothing created; a database whose
    relay never counted anything reads as empty."""

    def __init__(self, db_path: str | Path, *, readonly: bool = False) -> None:
        self._lock = threading.Lock()
        target = f"{Path(db_path).resolve().as_uri()}?mode=ro" if readonly else str(db_path)
        self._db = sqlite3.connect(
            target,
            timeout=_BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,  # used from asyncio.to_thread workers, under _lock
            uri=readonly,
        )
        self._empty = False
        try:
            self._db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            if readonly:
                found = self._db.execute(
                    "SELECT COUNT(*) FROM sqlite_master WHERE name IN"
                    " ('posture_daily', 'posture_waiting')"
                ).fetchone()
                self._empty = found[0] < 2
                return
            self._db.execute("PRAGMA journal_mode = WAL")
            # Counts, not mail: a power cut may lose the last flush, never the queue.
            self._db.execute("PRAGMA synchronous = NORMAL")
            for statement in _SCHEMA:
                self._db.execute(statement)
        except sqlite3.Error:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def write(self, cells: Mapping[Cell, Figures], waiting: Mapping[str, Waiting | None]) -> None:
        rows = daily_rows(cells)
        upserts = [waiting_row(w) for w in waiting.values() if w is not None]
        ends = [(key,) for key, w in waiting.items() if w is None]
        if not rows and not upserts and not ends:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO posture_daily VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT DO UPDATE SET messages = messages + excluded.messages,"
                    " recipients = recipients + excluded.recipients",
                    rows,
                )
                self._db.executemany(
                    # The earliest `since` stays: another writer on the same store (a
                    # process of the same relay) may have seen the wait begin.
                    "INSERT INTO posture_waiting VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET domain = excluded.domain,"
                    " recipients = excluded.recipients, since = MIN(since, excluded.since),"
                    " last_at = excluded.last_at, mechanism = excluded.mechanism,"
                    " result = excluded.result",
                    upserts,
                )
                self._db.executemany("DELETE FROM posture_waiting WHERE key = ?", ends)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def cells(self, first_day: str, last_day: str) -> list[tuple[Cell, Figures]]:
        if self._empty:
            return []
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM posture_daily WHERE day BETWEEN ? AND ? ORDER BY day, domain",
                (first_day, last_day),
            ).fetchall()
        return cells_from_rows(rows)

    def waiting(self) -> list[Waiting]:
        if self._empty:
            return []
        with self._lock:
            rows = self._db.execute("SELECT * FROM posture_waiting ORDER BY since").fetchall()
        return waiting_from_rows(rows)

    def prune(self, before_day: str, stale_before: float) -> None:
        with self._lock:
            self._db.execute("DELETE FROM posture_daily WHERE day < ?", (before_day,))
            self._db.execute("DELETE FROM posture_waiting WHERE last_at < ?", (stale_before,))
