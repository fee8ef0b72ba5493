"""A PostgreSQL connection for the shared state's stores (the policy cache, the TLS
reports, the posture figures): connection defaults, reconnection, transactions retried
after a race between nodes, and versioned migrations under one advisory lock with one
versions table. Knows nothing of what the stores keep. (The queue, mailqueue/postgres*.py,
keeps its own pool, lock and version.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Final, TypeVar

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

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
Connection = psycopg.Connection[TupleRow]


class Database:
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
        self._conn: Connection | None = None
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

    def read(self, work: Callable[[Connection], _T]) -> _T:
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

    def write(self, work: Callable[[Connection], _T]) -> _T:
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

    def _connection(self) -> tuple[Connection, bool]:
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

    def _broken(self, db: Connection) -> bool:
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
    db: Connection, component: str, migrations: Sequence[Sequence[str]], error: type[OSError]
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
