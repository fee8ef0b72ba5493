"""Persistent TLSRPT state in SQLite: per-day session counters, built reports, and where
each report stands for each reporting URI.

Owns the `tlsrpt_` tables of the relay's state database and nothing else in it (the queue
and the policy cache keep their own tables in the same file). Methods are synchronous and
thread-safe; async callers run them with asyncio.to_thread. Knows nothing of DNS, SMTP or
HTTP. Its own part is SQLite's SQL and connection: rows are made and read by
tlsrpt/store_rows.py, shared with the PostgreSQL store (tlsrpt/store_postgres.py).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

from tlsrpt.model import Count, Delivery, DeliveryState, Session
from tlsrpt.store_rows import (
    DELIVERY_COLUMNS,
    counter_key,
    counts_from_rows,
    deliveries_from_rows,
    delivery_result_row,
    delivery_row,
    due_from_rows,
    time_from_row,
)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tlsrpt_sessions (
        day TEXT NOT NULL,
        domain TEXT NOT NULL,
        policy_type TEXT NOT NULL,
        policy_strings TEXT NOT NULL,
        policy_mx TEXT NOT NULL,
        result_type TEXT NOT NULL,
        receiving_mx TEXT NOT NULL,
        receiving_ip TEXT NOT NULL,
        sending_ip TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (day, domain, policy_type, policy_strings, policy_mx, result_type,
                     receiving_mx, receiving_ip, sending_ip)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS tlsrpt_reports (
        report_id TEXT PRIMARY KEY,
        day TEXT NOT NULL,
        domain TEXT NOT NULL,
        created_at REAL NOT NULL,
        payload BLOB,
        UNIQUE (day, domain)
    )""",
    """CREATE TABLE IF NOT EXISTS tlsrpt_deliveries (
        report_id TEXT NOT NULL,
        uri TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        first_attempt_at REAL NOT NULL,
        next_attempt_at REAL,
        last_error TEXT,
        PRIMARY KEY (report_id, uri)
    )""",
)
_BUSY_TIMEOUT_MS = 10_000


class ReportStorage(Protocol):
    """The TLSRPT state, whichever the engine: ReportStore (SQLite) or PostgresReportStore
    (tlsrpt/store_postgres.py, shared by several nodes). The semantics are ReportStore's;
    `save_report` returns True to one caller per (day, domain), the one that sends it."""

    def close(self) -> None: ...

    def add_counts(self, counts: Mapping[Session, int]) -> None: ...

    def counts(self, day: str, domain: str | None = None) -> list[Count]: ...

    def unreported(self, oldest: str, newest: str) -> list[tuple[str, str]]: ...

    def prune(self, before: str) -> None: ...

    def save_report(
        self,
        report_id: str,
        day: str,
        domain: str,
        payload: bytes | None,
        deliveries: Iterable[Delivery],
        now: float,
    ) -> bool: ...

    def update_delivery(self, delivery: Delivery) -> None: ...

    def due_deliveries(self, now: float) -> list[tuple[Delivery, bytes]]: ...

    def next_retry_at(self) -> float | None: ...

    def deliveries(self, day: str) -> list[Delivery]: ...

    def reported_domains(self, day: str) -> set[str]: ...


class ReportStore:
    """The `tlsrpt_*` tables. Corrupt rows are skipped, never fatal."""

    def __init__(self, db_path: str | Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            str(db_path),
            timeout=_BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,  # used from asyncio.to_thread workers, under _lock
        )
        try:
            self._db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            for statement in _SCHEMA:
                self._db.execute(statement)
        except sqlite3.Error:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- counters ----------------------------------------------------------------------

    def add_counts(self, counts: Mapping[Session, int]) -> None:
        """Add a batch of session counts in one transaction."""
        rows = [(*counter_key(s), n) for s, n in counts.items() if n > 0]
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO tlsrpt_sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT DO UPDATE SET count = count + excluded.count",
                    rows,
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def counts(self, day: str, domain: str | None = None) -> list[Count]:
        """Every counter of `day` (of one domain, if given), by domain."""
        query = "SELECT * FROM tlsrpt_sessions WHERE day = ?"
        args: tuple[str, ...] = (day,)
        if domain is not None:
            query += " AND domain = ?"
            args = (day, domain)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY domain", args).fetchall()
        return counts_from_rows(rows)

    def unreported(self, oldest: str, newest: str) -> list[tuple[str, str]]:
        """(day, domain) pairs with counters in [oldest, newest] and no report yet."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT s.day, s.domain FROM tlsrpt_sessions s"
                " WHERE s.day BETWEEN ? AND ? AND NOT EXISTS (SELECT 1 FROM tlsrpt_reports r"
                " WHERE r.day = s.day AND r.domain = s.domain) ORDER BY s.day, s.domain",
                (oldest, newest),
            ).fetchall()
        return [(str(day), str(domain)) for day, domain in rows]

    def prune(self, before: str) -> None:
        """Forget counters and reports of days before `before`."""
        with self._lock:
            self._db.execute("DELETE FROM tlsrpt_sessions WHERE day < ?", (before,))
            self._db.execute(
                "DELETE FROM tlsrpt_deliveries WHERE report_id IN"
                " (SELECT report_id FROM tlsrpt_reports WHERE day < ?)",
                (before,),
            )
            self._db.execute("DELETE FROM tlsrpt_reports WHERE day < ?", (before,))

    # -- reports and their deliveries ----------------------------------------------------

    def save_report(
        self,
        report_id: str,
        day: str,
        domain: str,
        payload: bytes | None,
        deliveries: Iterable[Delivery],
        now: float,
    ) -> bool:
        """Record that (day, domain) was reported (payload None: nowhere to send it).
        False, and nothing changed, if it already was: a report is built once."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO tlsrpt_reports VALUES (?, ?, ?, ?, ?)",
                    (report_id, day, domain, now, payload),
                )
                if cursor.rowcount == 1:
                    self._db.executemany(
                        "INSERT INTO tlsrpt_deliveries VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [delivery_row(d) for d in deliveries],
                    )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return cursor.rowcount == 1

    def update_delivery(self, delivery: Delivery) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE tlsrpt_deliveries SET state = ?, attempts = ?, next_attempt_at = ?,"
                " last_error = ? WHERE report_id = ? AND uri = ?",
                delivery_result_row(delivery),
            )

    def due_deliveries(self, now: float) -> list[tuple[Delivery, bytes]]:
        """Pending https deliveries whose retry time has come, with their payload."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {DELIVERY_COLUMNS}, r.payload FROM tlsrpt_deliveries d"  # noqa: S608 - constant
                " JOIN tlsrpt_reports r USING (report_id)"
                " WHERE d.state = ? AND d.next_attempt_at <= ? ORDER BY d.next_attempt_at",
                (DeliveryState.PENDING.value, now),
            ).fetchall()
        return due_from_rows(rows)

    def next_retry_at(self) -> float | None:
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(next_attempt_at) FROM tlsrpt_deliveries WHERE state = ?",
                (DeliveryState.PENDING.value,),
            ).fetchone()
        return time_from_row(row)

    def deliveries(self, day: str) -> list[Delivery]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {DELIVERY_COLUMNS} FROM tlsrpt_deliveries d"  # noqa: S608 - constant
                " JOIN tlsrpt_reports r USING (report_id) WHERE r.day = ? ORDER BY r.domain, d.uri",
                (day,),
            ).fetchall()
        return deliveries_from_rows(rows)

    def reported_domains(self, day: str) -> set[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT domain FROM tlsrpt_reports WHERE day = ?", (day,)
            ).fetchall()
        return {str(r[0]) for r in rows}
