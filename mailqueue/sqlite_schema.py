"""Schema of the SQLite queue store: tables, version and migrations.

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
  6: `queue_counts` and its triggers: recipients per (state, held) and the number of
     messages, maintained with every change, so counting a queue of a million recipients
     (every metrics scrape, every readiness probe) reads a few rows instead of the table.
     Migrating counts the rows once (about a second per million recipients).
"""

from __future__ import annotations

import sqlite3

# The DSN column's codec is engine-neutral (mailqueue/rows.py); re-exported for old importers.
from mailqueue.rows import dsn_from_json as dsn_from_json
from mailqueue.rows import dsn_to_json as dsn_to_json

SCHEMA_VERSION = 6

# Rows per (state, held) of queue_recipients and the number of queue_messages, kept by the
# triggers below in the transaction of every change, whichever process or statement makes
# it: a metrics scrape or readiness probe reads a few rows instead of counting the queue.
_COUNTS = """CREATE TABLE IF NOT EXISTS queue_counts (
    kind TEXT NOT NULL, -- 'recipients' or 'messages'
    state TEXT NOT NULL, -- the recipients' state ('' for messages)
    held INTEGER NOT NULL, -- the recipients' held flag (0 for messages)
    n INTEGER NOT NULL,
    PRIMARY KEY (kind, state, held)
) WITHOUT ROWID"""


def _count(kind: str, row: str, delta: str) -> str:
    """An upsert adding `delta` to the counter of `row` (NEW or OLD); a counter row that a
    decrement finds missing starts below zero rather than failing the change."""
    state, held = (f"{row}.state", f"{row}.held") if kind == "recipients" else ("''", "0")
    return (
        "INSERT INTO queue_counts (kind, state, held, n)"  # noqa: S608 (constants only)
        f" VALUES ('{kind}', {state}, {held}, {delta})"
        f" ON CONFLICT (kind, state, held) DO UPDATE SET n = n + {delta};"
    )


_COUNT_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS queue_recipients_count_insert AFTER INSERT ON queue_recipients"
    f" BEGIN {_count('recipients', 'NEW', '1')} END",
    "CREATE TRIGGER IF NOT EXISTS queue_recipients_count_delete AFTER DELETE ON queue_recipients"
    f" BEGIN {_count('recipients', 'OLD', '-1')} END",
    # Leasing, renewing and releasing change neither column: this trigger does not fire.
    "CREATE TRIGGER IF NOT EXISTS queue_recipients_count_update"
    " AFTER UPDATE OF state, held ON queue_recipients"
    " WHEN OLD.state IS NOT NEW.state OR OLD.held IS NOT NEW.held"
    f" BEGIN {_count('recipients', 'OLD', '-1')} {_count('recipients', 'NEW', '1')} END",
    "CREATE TRIGGER IF NOT EXISTS queue_messages_count_insert AFTER INSERT ON queue_messages"
    f" BEGIN {_count('messages', 'NEW', '1')} END",
    "CREATE TRIGGER IF NOT EXISTS queue_messages_count_delete AFTER DELETE ON queue_messages"
    f" BEGIN {_count('messages', 'OLD', '-1')} END",
)


_TABLES: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS queue_messages (
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
)""",
    """CREATE TABLE IF NOT EXISTS queue_recipients (
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
)""",
    "CREATE INDEX IF NOT EXISTS queue_recipients_due"
    " ON queue_recipients(next_attempt_at) WHERE state IN ('queued', 'deferred') AND held = 0",
    "CREATE INDEX IF NOT EXISTS queue_recipients_leased"
    " ON queue_recipients(lease_owner) WHERE lease_owner IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS queue_receipts (
    queue_id TEXT NOT NULL, -- no foreign key: the message may be deleted by that record
    domain TEXT NOT NULL,
    lease_owner TEXT NOT NULL,
    lease_until REAL NOT NULL,
    recorded_at REAL NOT NULL,
    applied TEXT NOT NULL, -- JSON arrays of addresses
    lost TEXT NOT NULL,
    dsn_queue_id TEXT,
    PRIMARY KEY (queue_id, domain, lease_owner, lease_until)
) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS queue_receipts_age ON queue_receipts(recorded_at)",
    """CREATE TABLE IF NOT EXISTS queue_admin_journal (
    id INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: the relay's cursor only grows
    at REAL NOT NULL,
    action TEXT NOT NULL,
    queue_id TEXT,
    selection TEXT NOT NULL,
    matched INTEGER NOT NULL,
    count INTEGER NOT NULL,
    operator TEXT NOT NULL
)""",
    _COUNTS,
    *_COUNT_TRIGGERS,
)

# Each entry takes a store from version N (its index + 1) to N + 1.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "ALTER TABLE queue_messages ADD COLUMN dsn TEXT",
        "ALTER TABLE queue_recipients ADD COLUMN delay_notified INTEGER NOT NULL DEFAULT 0",
    ),
    (),  # 2 -> 3: only a new table, which _TABLES creates
    (),  # 3 -> 4: likewise
    ("ALTER TABLE queue_messages ADD COLUMN requiretls INTEGER NOT NULL DEFAULT 0",),
    (  # 5 -> 6: the counters start from one count of the rows (the triggers come after)
        _COUNTS,
        "DELETE FROM queue_counts",
        "INSERT INTO queue_counts (kind, state, held, n)"
        " SELECT 'recipients', state, held, COUNT(*) FROM queue_recipients WHERE 1"
        " GROUP BY state, held ON CONFLICT (kind, state, held) DO UPDATE SET n = n + excluded.n",
        "INSERT INTO queue_counts (kind, state, held, n)"
        " SELECT 'messages', '', 0, COUNT(*) FROM queue_messages",
    ),
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
    for statement in _TABLES:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO queue_meta (key, value) VALUES ('schema_version', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (str(SCHEMA_VERSION),),
    )
    return None if found is None else int(found)
