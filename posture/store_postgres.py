"""The posture aggregates in PostgreSQL, shared by every relay node on one database
(`state.url = postgresql://...`, issue 15): the second engine of the PostureStore
interface (posture/store.py), with SqlitePostureStore's semantics: daily counts are added
in the database (each node's flush adds to what the others wrote), a waiting entry is
upserted keeping the earliest `since` any node saw, and `write` is all or nothing.

Owns the `posture_` tables and the row `posture` of the schema versions table
(`sts_relay_schema`), created or upgraded when a store is opened, under the relay's schema
lock. `readonly` (the report command) creates nothing and writes nothing; a database
whose relay never counted anything reads as empty. Methods are synchronous and
thread-safe; async callers run them with asyncio.to_thread. A failure of the database or
of the connection raises PostureStoreError (an OSError); the next call connects again.
Knows nothing of SMTP or the queue.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from posture.model import Cell, Figures, Waiting
from posture.store import _cell_from_row, _waiting_from_row, _waiting_row

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
        self._db = _Database(
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
        rows = sorted((*_cell_key(c), f.messages, f.recipients) for c, f in cells.items())
        changes = sorted(waiting.items(), key=lambda item: item[0])
        if not rows and not changes:
            return

        def write(db: _Connection) -> None:
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
                        _waiting_row(entry),
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
        return [c for c in map(_cell_from_row, rows) if c is not None]

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
        return [w for w in map(_waiting_from_row, rows) if w is not None]

    def prune(self, before_day: str, stale_before: float) -> None:
        def prune(db: _Connection) -> None:
            db.execute("DELETE FROM posture_daily WHERE day < %s", (before_day,))
            db.execute("DELETE FROM posture_waiting WHERE last_at < %s", (stale_before,))

        with self._lock:
            self._db.write(prune)


def _cell_key(c: Cell) -> tuple[str, str, str, str, str, bool, str]:
    return (c.day, c.domain, c.status.value, c.mechanism.value, c.tls, c.authenticated, c.cause)


# --- the connection ---------------------------------------------------------------------
# The same in policy/cache_postgres.py, tlsrpt/store_postgres.py and posture/store_postgres.py:
# those packages may not import each other (tests/unit/test_layering.py), and
# tests/integration/test_postgres_schema.py keeps the three copies equal.

# The policy cache, the TLS reports and the posture take this lock around their schema work
# (with the versions table they share): "STSRELAY" as a bigint. (The queue keeps its own
# lock and version, mailqueue/postgres_schema.py.)
SCHEMA_LOCK: Final = 0x5354_5352_454C_4159
_VERSIONS_TABLE: Final = (
    "CREATE TABLE IF NOT EXISTS sts_relay_schema ("
    " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
)
# Connection parameters unless the URL sets them: a database that does not answer must
# not hold a caller (or the lock the store's other callers wait for) for long.
_CONNECT_DEFAULTS: Final = {
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "application_name": "sts-relay",
}
# What a statement may raise: the driver's errors, and a str it cannot encode (a lone
# surrogate), which SQLite's engine raises too.
_ERRORS: Final = (psycopg.Error, UnicodeEncodeError)
# A transaction the server rolled back to settle a race between nodes: run it again.
_RACE_ERRORS: Final = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
_RACE_RETRIES: Final = 5
_T = TypeVar("_T")
_Connection = psycopg.Connection[TupleRow]


class _Database:
    """One connection, opened at start (creating or upgrading the schema) and again after
    it broke. psycopg errors leave as `error` (one line naming the database). Not locked:
    the owner serialises calls."""

    def __init__(
        self,
        url: str,
        error: type[OSError],
        *,
        component: str,
        migrations: Sequence[Sequence[str]],
        session: Mapping[str, str],
        reconnect_pause: float,
        monotonic: Callable[[], float],
        create: bool = True,
    ) -> None:
        self._error = error
        self._session = session
        self._pause = reconnect_pause
        self._monotonic = monotonic
        self._conn: _Connection | None = None
        self._failed: tuple[float, str] | None = None  # when and why connecting failed
        self._closed = False
        try:
            given = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise error(f"state.url: {_one_line(exc)}") from None  # may hold the password
        host, port = given.get("host", "localhost"), given.get("port", "5432")
        self._where = f"PostgreSQL {host}:{port}/{given.get('dbname', '')}"
        defaults = {k: v for k, v in _CONNECT_DEFAULTS.items() if k not in given}
        self._conninfo = make_conninfo(url, **defaults)
        if create:
            try:
                self.write(lambda db: migrate(db, component, migrations, error))
            except BaseException:
                self.close()
                raise

    def read(self, work: Callable[[_Connection], _T]) -> _T:
        """`work` in autocommit (one statement, or reads that need no snapshot); tried
        again on a new connection when the one kept turns out dead."""
        for stale_ok in (True, False):
            db, reused = self._connection()
            try:
                return work(db)
            except _ERRORS as exc:
                if self._broken(db) and reused and stale_ok:
                    continue
                raise self._fail(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def write(self, work: Callable[[_Connection], _T]) -> _T:
        """`work` in one transaction: committed, or rolled back and raised as `error`. Run
        again when nothing of it can have been committed: the kept connection was dead
        before BEGIN went out, or the server broke a deadlock or a serialization conflict
        by rolling it back (a few times)."""
        stale_ok, races = True, 0
        while True:
            db, reused = self._connection()
            begun = False
            try:
                with db.transaction():
                    begun = True
                    return work(db)
            except _RACE_ERRORS as exc:
                races += 1
                if races >= _RACE_RETRIES:
                    raise self._fail(exc) from exc
            except _ERRORS as exc:
                if not (self._broken(db) and reused and stale_ok and not begun):
                    raise self._fail(exc) from exc
                stale_ok = False

    def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def _connection(self) -> tuple[_Connection, bool]:
        """The kept connection (True), or a new one (False)."""
        if self._closed:
            raise self._error(f"{self._where}: closed")
        if self._conn is not None and not self._conn.closed:
            return self._conn, True
        if self._failed is not None and self._monotonic() - self._failed[0] < self._pause:
            raise self._error(self._failed[1])
        try:
            db = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            failure = self._fail(exc)
            self._failed = (self._monotonic(), str(failure))
            raise failure from None  # the chained error could name the password
        try:
            for name, value in self._session.items():
                db.execute("SELECT set_config(%s, %s, false)", (name, value))
        except psycopg.Error as exc:
            db.close()
            raise self._fail(exc) from exc
        self._conn, self._failed = db, None
        return db, False

    def _broken(self, db: _Connection) -> bool:
        """After an error: whether the connection is gone (then it is dropped)."""
        if not (db.broken or db.closed):
            return False
        with contextlib.suppress(psycopg.Error):
            db.close()
        if self._conn is db:
            self._conn = None
        return True

    def _fail(self, exc: Exception) -> OSError:
        return self._error(f"{self._where}: {_one_line(exc)}")


def migrate(
    db: _Connection, component: str, migrations: Sequence[Sequence[str]], error: type[OSError]
) -> None:
    """Inside a transaction: bring `component`'s tables to version len(migrations), under
    the relay's schema lock (nodes starting at once wait for each other); `error` for a
    schema newer than this code."""
    db.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (SCHEMA_LOCK,))
    db.execute(_VERSIONS_TABLE)
    row = db.execute(
        "SELECT version FROM sts_relay_schema WHERE component = %s", (component,)
    ).fetchone()
    found = int(row[0]) if row is not None else 0
    if found > len(migrations):
        raise error(
            f"{component}: schema version {found} is newer than this relay knows"
            f" ({len(migrations)}); upgrade the relay"
        )
    if found == len(migrations):
        return
    for step in migrations[found:]:
        for statement in step:
            db.execute(statement)
    db.execute(
        "INSERT INTO sts_relay_schema (component, version) VALUES (%s, %s)"
        " ON CONFLICT (component) DO UPDATE SET version = excluded.version",
        (component, len(migrations)),
    )


def _one_line(exc: Exception) -> str:
    """The error as one printable line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return "".join(ch if ch.isprintable() else "?" for ch in text)
