"""TLSRPT state in PostgreSQL, shared by every relay node on one database (`state.url =
postgresql://...`, issue 15): the PostgreSQL engine of tlsrpt/store.py.

Same methods and semantics as ReportStore (SQLite, the ReportStorage protocol), plus what
a cluster needs for one RFC 8460 report per policy domain per day:
- counters are added in the database (`add_counts` never overwrites), so the sessions
  every node counted end up in one report;
- `save_report` inserts the (day, domain) report only if none exists (the unique key
  decides, whatever the number of nodes building it at once) and says whether this call
  made it: the reporter sends only a report it made (relay/reporting.py);
- a delivery is sent by one node at a time: the winner's new deliveries are claimed by
  this store until `now + claim_seconds`, `due_deliveries` claims the due ones with FOR
  UPDATE SKIP LOCKED (claimed by no one, or a claim that ran out: its node died), and
  `update_delivery` records a result only while the claim is this store's (or no one's).

Owns the `tlsrpt_` tables and the row `tlsrpt` of the schema versions table
(`sts_relay_schema`), created or upgraded when a store is opened, under the relay's
schema lock. A counter row's key is a digest of the session's fields (they can be longer
than an index entry may be); rows are made and read by tlsrpt/store_rows.py, as in the
SQLite store. Methods are synchronous and thread-safe; async callers run
them with asyncio.to_thread. A failure of the database or of the connection raises
ReportStoreError (an OSError); the next call connects again.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

from pgstate.connection import Connection, Database
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

COMPONENT: Final = "tlsrpt"
MIGRATIONS: Final[Sequence[Sequence[str]]] = (
    (
        """CREATE TABLE tlsrpt_sessions (
            session_key    BYTEA PRIMARY KEY, -- SHA-256 of the nine fields that follow
            day            TEXT NOT NULL,
            domain         TEXT NOT NULL,
            policy_type    TEXT NOT NULL,
            policy_strings TEXT NOT NULL,
            policy_mx      TEXT NOT NULL,
            result_type    TEXT NOT NULL,
            receiving_mx   TEXT NOT NULL,
            receiving_ip   TEXT NOT NULL,
            sending_ip     TEXT NOT NULL,
            count          BIGINT NOT NULL
        )""",
        "CREATE INDEX tlsrpt_sessions_day ON tlsrpt_sessions (day, domain)",
        """CREATE TABLE tlsrpt_reports (
            report_id  TEXT PRIMARY KEY,
            day        TEXT NOT NULL,
            domain     TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            payload    BYTEA,
            UNIQUE (day, domain)
        )""",
        """CREATE TABLE tlsrpt_deliveries (
            report_id        TEXT NOT NULL,
            uri              TEXT NOT NULL,
            state            TEXT NOT NULL,
            attempts         INTEGER NOT NULL,
            first_attempt_at DOUBLE PRECISION NOT NULL,
            next_attempt_at  DOUBLE PRECISION,
            last_error       TEXT,
            claimed_by       TEXT, -- the store (node) sending it now, until claimed_until
            claimed_until    DOUBLE PRECISION,
            PRIMARY KEY (report_id, uri)
        )""",
        "CREATE INDEX tlsrpt_deliveries_pending ON tlsrpt_deliveries (next_attempt_at)"
        " WHERE state = 'pending'",
    ),
)
# A claim covers a batch of sends one after the other, each bounded by its POST deadline
# (or a queue insert) and DNS: past it, the claimant is taken for dead.
CLAIM_SECONDS: Final = 900.0
_CLAIM_BATCH: Final = 16
_SESSION: Final = {
    "statement_timeout": "30s",
    # A report recorded as made is never made again: its record must outlive a crash.
    "synchronous_commit": "on",
}
RECONNECT_PAUSE_S: Final = 1.0  # after a failed connection, calls fail at once this long


class ReportStoreError(OSError):
    """The PostgreSQL report store failed, or its database could not be reached; one line
    naming the database, never its password. Nothing of the call was stored, except when
    the connection broke during its commit."""


class PostgresReportStore:
    """The `tlsrpt_*` tables in a PostgreSQL database. Corrupt rows are skipped, never
    fatal. Raises ReportStoreError (at construction too: an unreachable database at start
    is an error)."""

    def __init__(
        self,
        url: str,
        *,
        claim_seconds: float = CLAIM_SECONDS,
        reconnect_pause: float = RECONNECT_PAUSE_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._claim_seconds = claim_seconds
        self._me = secrets.token_hex(8)  # the claimant's name on the rows it sends
        self._lock = threading.Lock()
        self._db = Database(
            url,
            ReportStoreError,
            component=COMPONENT,
            migrations=MIGRATIONS,
            session=_SESSION,
            reconnect_pause=reconnect_pause,
            monotonic=monotonic,
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- counters ----------------------------------------------------------------------

    def add_counts(self, counts: Mapping[Session, int]) -> None:
        """Add a batch of session counts to the database's, in one transaction."""
        rows = sorted(_counter_row(s, n) for s, n in counts.items() if n > 0)
        if not rows:
            return  # (sorted: two nodes adding the same keys lock them in one order)
        with self._lock:
            self._db.write(
                lambda db: db.cursor().executemany(
                    "INSERT INTO tlsrpt_sessions VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s,"
                    " %s, %s) ON CONFLICT (session_key)"
                    " DO UPDATE SET count = tlsrpt_sessions.count + excluded.count",
                    rows,
                )
            )

    def counts(self, day: str, domain: str | None = None) -> list[Count]:
        """Every counter of `day` (of one domain, if given), by domain."""
        query = (
            "SELECT day, domain, policy_type, policy_strings, policy_mx, result_type,"
            " receiving_mx, receiving_ip, sending_ip, count FROM tlsrpt_sessions"
            " WHERE day = %s AND (%s::text IS NULL OR domain = %s) ORDER BY domain"
        )
        with self._lock:
            rows = self._db.read(lambda db: db.execute(query, (day, domain, domain)).fetchall())
        return counts_from_rows(rows)

    def unreported(self, oldest: str, newest: str) -> list[tuple[str, str]]:
        """(day, domain) pairs with counters in [oldest, newest] and no report yet."""
        with self._lock:
            rows = self._db.read(
                lambda db: db.execute(
                    "SELECT DISTINCT s.day, s.domain FROM tlsrpt_sessions s"
                    " WHERE s.day BETWEEN %s AND %s AND NOT EXISTS (SELECT 1 FROM"
                    " tlsrpt_reports r WHERE r.day = s.day AND r.domain = s.domain)"
                    " ORDER BY s.day, s.domain",
                    (oldest, newest),
                ).fetchall()
            )
        return [(str(day), str(domain)) for day, domain in rows]

    def prune(self, before: str) -> None:
        """Forget counters and reports of days before `before`."""

        def prune(db: Connection) -> None:
            db.execute("DELETE FROM tlsrpt_sessions WHERE day < %s", (before,))
            db.execute(
                "DELETE FROM tlsrpt_deliveries WHERE report_id IN"
                " (SELECT report_id FROM tlsrpt_reports WHERE day < %s)",
                (before,),
            )
            db.execute("DELETE FROM tlsrpt_reports WHERE day < %s", (before,))

        with self._lock:
            self._db.write(prune)

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
        """Record that (day, domain) was reported (payload None: nowhere to send it), with
        its deliveries claimed by this store for sending now. True when this call made the
        report; False, and nothing changed, when it existed (another node made it)."""
        rows = [(*delivery_row(d), self._me, now + self._claim_seconds) for d in deliveries]

        def save(db: Connection) -> bool:
            made = db.execute(
                "INSERT INTO tlsrpt_reports VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT DO NOTHING RETURNING 1",
                (report_id, day, domain, now, payload),
            ).fetchone()
            if made is None:
                return False
            db.cursor().executemany(
                "INSERT INTO tlsrpt_deliveries VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                rows,
            )
            return True

        with self._lock:
            return self._db.write(save)

    def update_delivery(self, delivery: Delivery) -> None:
        """Record a send's result and end this store's claim. A row another node claimed
        meanwhile (this claim ran out) is that node's: left as it is."""
        with self._lock:
            self._db.write(
                lambda db: db.execute(
                    "UPDATE tlsrpt_deliveries SET state = %s, attempts = %s,"
                    " next_attempt_at = %s, last_error = %s, claimed_by = NULL,"
                    " claimed_until = NULL WHERE report_id = %s AND uri = %s"
                    " AND (claimed_by IS NULL OR claimed_by = %s)",
                    (*delivery_result_row(delivery), self._me),
                )
            )

    def due_deliveries(self, now: float) -> list[tuple[Delivery, bytes]]:
        """Pending deliveries whose retry time has come, with their payload, each claimed
        by this store until now + claim_seconds (at most a batch per call): no other node
        gets them meanwhile."""
        claim = (
            "WITH due AS (SELECT d.report_id, d.uri FROM tlsrpt_deliveries d"
            " JOIN tlsrpt_reports r USING (report_id)"
            " WHERE d.state = %(pending)s AND d.next_attempt_at <= %(now)s"
            " AND r.payload IS NOT NULL"
            " AND (d.claimed_until IS NULL OR d.claimed_until <= %(now)s)"
            " ORDER BY d.next_attempt_at LIMIT %(batch)s FOR UPDATE OF d SKIP LOCKED)"
            " UPDATE tlsrpt_deliveries d SET claimed_by = %(me)s, claimed_until = %(until)s"
            " FROM due, tlsrpt_reports r"
            " WHERE d.report_id = due.report_id AND d.uri = due.uri"
            " AND r.report_id = d.report_id"
            " RETURNING d.report_id, r.domain, r.day, d.uri, d.state, d.attempts,"
            " d.first_attempt_at, d.next_attempt_at, d.last_error, r.payload"
        )
        args = {
            "pending": DeliveryState.PENDING.value,
            "now": now,
            "batch": _CLAIM_BATCH,
            "me": self._me,
            "until": now + self._claim_seconds,
        }
        with self._lock:
            rows = self._db.write(lambda db: db.execute(claim, args).fetchall())
        due = due_from_rows(rows)
        return sorted(due, key=lambda found: (found[0].next_attempt_at or 0.0, found[0].uri))

    def next_retry_at(self) -> float | None:
        """When the next pending delivery falls due (a claimed one: when its claim ends)."""
        with self._lock:
            row = self._db.read(
                lambda db: db.execute(
                    "SELECT MIN(GREATEST(next_attempt_at, claimed_until))"
                    " FROM tlsrpt_deliveries WHERE state = %s",
                    (DeliveryState.PENDING.value,),
                ).fetchone()
            )
        return time_from_row(row)

    def deliveries(self, day: str) -> list[Delivery]:
        with self._lock:
            rows = self._db.read(
                lambda db: db.execute(
                    f"SELECT {DELIVERY_COLUMNS} FROM tlsrpt_deliveries d"  # noqa: S608 - constant
                    " JOIN tlsrpt_reports r USING (report_id) WHERE r.day = %s"
                    " ORDER BY r.domain, d.uri",
                    (day,),
                ).fetchall()
            )
        return deliveries_from_rows(rows)

    def reported_domains(self, day: str) -> set[str]:
        with self._lock:
            rows = self._db.read(
                lambda db: db.execute(
                    "SELECT domain FROM tlsrpt_reports WHERE day = %s", (day,)
                ).fetchall()
            )
        return {str(r[0]) for r in rows}


def _counter_row(session: Session, count: int) -> tuple[object, ...]:
    fields = counter_key(session)
    digest = hashlib.sha256(json.dumps(fields).encode()).digest()
    return (digest, *fields, count)
