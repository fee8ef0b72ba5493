"""Schema of the SQLite queue store: tables, version, migrations, and the DSN column codec.

Owns the `queue_*` tables' definitions and `queue_meta.schema_version` (never `PRAGMA
user_version`, which the file's other tenants may use). Runs inside a write transaction
opened by the caller. Knows nothing of threads, asyncio, TLS or SMTP.

Version history:
  1: messages, recipients, due and lease indexes.
  2: `queue_messages.dsn` (RFC 3461 parameters as JSON, NULL when none were given) and
     `queue_recipients.delay_notified` (a "delayed" DSN was sent for the recipient).
  3: `queue_receipts`: what each recent `record` did, so a retried call gets the same
     answer (sqlite_leases.py).
  4: `queue_admin_journal`: each change made by an operator, for the running relay to log
     (sqlite_admin.py).
  5: `queue_messages.requiretls` (1: MAIL FROM carried REQUIRETLS, RFC 8689; older rows 0).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from mailqueue.model import DsnRequest

SCHEMA_VERSION = 5

_TABLES = """
CREATE TABLE IF NOT EXISTS queue_messages (
    id INTEGER PRIMARY KEY,
    queue_id TEXT NOT NULL UNIQUE,
    sender TEXT NOT NULL,
    received_at REAL NOT NULL,
    size INTEGER NOT NULL,
    held INTEGER NOT NULL DEFAULT 0,
    client TEXT NOT NULL DEFAULT '',
    data BLOB NOT NULL,
    dsn TEXT,
    requiretls INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS queue_recipients (
    id INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL REFERENCES queue_messages(id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    domain TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    last_error TEXT,
    lease_owner TEXT,
    lease_until REAL,
    held INTEGER NOT NULL DEFAULT 0, -- copy of the message's flag (2: set aside), for the index
    delay_notified INTEGER NOT NULL DEFAULT 0,
    UNIQUE (message_id, address)
);
CREATE INDEX IF NOT EXISTS queue_recipients_due
    ON queue_recipients(next_attempt_at) WHERE state IN ('queued', 'deferred') AND held = 0;
CREATE INDEX IF NOT EXISTS queue_recipients_leased
    ON queue_recipients(lease_owner) WHERE lease_owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS queue_receipts (
    queue_id TEXT NOT NULL, -- no foreign key: the message may be deleted by that record
    domain TEXT NOT NULL,
    lease_owner TEXT NOT NULL,
    lease_until REAL NOT NULL,
    recorded_at REAL NOT NULL,
    applied TEXT NOT NULL, -- JSON arrays of addresses
    lost TEXT NOT NULL,
    dsn_queue_id TEXT,
    PRIMARY KEY (queue_id, domain, lease_owner, lease_until)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS queue_receipts_age ON queue_receipts(recorded_at);
CREATE TABLE IF NOT EXISTS queue_admin_journal (
    id INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: the relay's cursor only grows
    at REAL NOT NULL,
    action TEXT NOT NULL,
    queue_id TEXT,
    selection TEXT NOT NULL,
    matched INTEGER NOT NULL,
    count INTEGER NOT NULL,
    operator TEXT NOT NULL
)
"""

# Each entry takes a store from version N (its index + 1) to N + 1.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "ALTER TABLE queue_messages ADD COLUMN dsn TEXT",
        "ALTER TABLE queue_recipients ADD COLUMN delay_notified INTEGER NOT NULL DEFAULT 0",
    ),
    (),  # 2 -> 3: only a new table, which _TABLES creates
    (),  # 3 -> 4: likewise
    ("ALTER TABLE queue_messages ADD COLUMN requiretls INTEGER NOT NULL DEFAULT 0",),
)


class SchemaMismatch(Exception):
    """The file holds a queue schema this code does not know (a newer relay wrote it)."""


def prepare(conn: sqlite3.Connection) -> int | None:
    """Create or migrate the queue tables to SCHEMA_VERSION, inside the caller's write
    transaction (executescript() would COMMIT on Python 3.11). Returns the version found
    (None for a new store). Raises SchemaMismatch for an unknown version."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS queue_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
    )
    row = conn.execute("SELECT value FROM queue_meta WHERE key = 'schema_version'").fetchone()
    found = None if row is None else str(row[0])
    if found is not None:
        if not found.isdigit() or not 1 <= int(found) <= SCHEMA_VERSION:
            raise SchemaMismatch(f"schema version {found}, this code knows {SCHEMA_VERSION}")
        for step in _MIGRATIONS[int(found) - 1 :]:
            for statement in step:
                conn.execute(statement)
    for statement in _TABLES.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute(
        "INSERT INTO queue_meta (key, value) VALUES ('schema_version', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (str(SCHEMA_VERSION),),
    )
    return None if found is None else int(found)


def dsn_to_json(dsn: DsnRequest) -> str | None:
    """The column value: NULL when the client gave no RFC 3461 parameter at all."""
    if dsn == DsnRequest():
        return None
    value = {
        "ret": dsn.ret,
        "envid": dsn.envid,
        "notify": {rcpt: list(words) for rcpt, words in dsn.notify.items()},
        "orcpt": dict(dsn.orcpt),
    }
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def dsn_from_json(text: Any) -> DsnRequest | None:
    """Decode the column; None when it is not what dsn_to_json writes (set the row aside)."""
    if text is None:
        return DsnRequest()
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    ret, envid = value.get("ret"), value.get("envid")
    notify, orcpt = value.get("notify", {}), value.get("orcpt", {})
    if not (_opt_str(ret) and _opt_str(envid) and isinstance(notify, dict)):
        return None
    if not isinstance(orcpt, dict) or not all(isinstance(v, str) for v in orcpt.values()):
        return None
    if not all(
        isinstance(words, list) and all(isinstance(w, str) for w in words)
        for words in notify.values()
    ):
        return None
    return DsnRequest(
        ret=ret,
        envid=envid,
        notify={str(k): tuple(v) for k, v in notify.items()},
        orcpt={str(k): v for k, v in orcpt.items()},
    )


def _opt_str(value: Any) -> bool:
    return value is None or isinstance(value, str)
