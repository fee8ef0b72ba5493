"""Schema of the PostgreSQL queue store: tables, indexes, counters, version, migrations.

Owns the `queue_*` tables, functions and triggers of the database (the policy cache and
the TLS-report counters keep tables of their own beside them) and
`queue_meta.schema_version`. Created and upgraded by the store itself at `open()`, in one
transaction under a transaction-level advisory lock, so that nodes starting at once on an
empty database create it once (the others wait, then find it made). Knows nothing of
asyncio's tasks, TLS or SMTP.

The layout mirrors the SQLite store's (sqlite_schema.py) with the database's own types:
times are POSIX seconds (`double precision`, as the stores' clocks give them), the content
is `bytea`. While a recipient is leased its `next_attempt_at` holds the lease's end, so the
one partial index `queue_recipients_due` finds due work and expired leases alike.

Counts (every metrics scrape and readiness probe, on every node) must not count a million
rows, and must not make every transaction of every node queue on one counter row either:
triggers append deltas (`queue_count_deltas`: insert-only, so writers never wait on each
other), and the store folds them into `queue_counts` now and then (`COMPACT_COUNTS`);
counting sums both, a few hundred rows at most.

Version history:
  1: messages, recipients, receipts, admin journal (with the `logged_at` claim of each
     entry), counters and their triggers.
"""

from __future__ import annotations

from typing import Any

import psycopg

SCHEMA_VERSION = 1
# pg_advisory_xact_lock keys (one 64-bit space per database, shared with other tenants:
# these spell "STS" and a purpose, far from small numbers someone else might pick).
SCHEMA_LOCK = 0x5354_5351_0000_0001  # creating or migrating the queue's schema
MAINTENANCE_LOCK = 0x5354_5351_0000_0002  # folding counters, pruning receipts

_TABLES: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS queue_messages (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue_id TEXT NOT NULL UNIQUE,
    sender TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    size BIGINT NOT NULL,
    held SMALLINT NOT NULL DEFAULT 0, -- 1: held by an operator
    client TEXT NOT NULL DEFAULT '',
    dsn TEXT, -- RFC 3461 parameters as JSON (mailqueue/rows.py), NULL when none were given
    requiretls BOOLEAN NOT NULL DEFAULT FALSE, -- RFC 8689: MAIL FROM carried REQUIRETLS
    data BYTEA NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS queue_recipients (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id BIGINT NOT NULL REFERENCES queue_messages(id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    domain TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION, -- while leased: the lease's end
    last_error TEXT,
    lease_owner TEXT,
    lease_until DOUBLE PRECISION,
    held SMALLINT NOT NULL DEFAULT 0, -- the message's flag, for the index (2: set aside)
    delay_notified BOOLEAN NOT NULL DEFAULT FALSE,
    UNIQUE (message_id, address)
)""",
    "CREATE INDEX IF NOT EXISTS queue_recipients_due ON queue_recipients (next_attempt_at)"
    " WHERE state IN ('queued', 'deferred') AND held = 0",
    "CREATE INDEX IF NOT EXISTS queue_recipients_leased ON queue_recipients (lease_owner)"
    " WHERE lease_owner IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS queue_receipts (
    queue_id TEXT NOT NULL, -- no foreign key: the message may be deleted by that record
    domain TEXT NOT NULL,
    lease_owner TEXT NOT NULL,
    lease_until DOUBLE PRECISION NOT NULL,
    recorded_at DOUBLE PRECISION NOT NULL,
    applied TEXT[] NOT NULL,
    lost TEXT[] NOT NULL,
    dsn_queue_id TEXT,
    PRIMARY KEY (queue_id, domain, lease_owner, lease_until)
)""",
    "CREATE INDEX IF NOT EXISTS queue_receipts_age ON queue_receipts (recorded_at)",
    """CREATE TABLE IF NOT EXISTS queue_admin_journal (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, -- never reused
    at DOUBLE PRECISION NOT NULL,
    action TEXT NOT NULL,
    queue_id TEXT,
    selection TEXT NOT NULL,
    matched BIGINT NOT NULL,
    count BIGINT NOT NULL,
    operator TEXT NOT NULL,
    logged_at DOUBLE PRECISION -- NULL until one node claims it for its log
)""",
    "CREATE INDEX IF NOT EXISTS queue_admin_journal_unlogged ON queue_admin_journal (id)"
    " WHERE logged_at IS NULL",
    """CREATE TABLE IF NOT EXISTS queue_counts (
    kind TEXT NOT NULL, -- 'recipients' or 'messages'
    state TEXT NOT NULL, -- the recipients' state ('' for messages)
    held SMALLINT NOT NULL, -- the recipients' held flag (0 for messages)
    n BIGINT NOT NULL,
    PRIMARY KEY (kind, state, held)
)""",
    """CREATE TABLE IF NOT EXISTS queue_count_deltas (
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    held SMALLINT NOT NULL,
    n BIGINT NOT NULL
)""",
)


def _statement_trigger(table: str, kind: str, event: str) -> tuple[str, str]:
    """A function and its trigger adding one delta per (state, held) of the rows a whole
    INSERT or DELETE statement touched (a batch of puts: one row, not one per message)."""
    rows, sign = ("new_rows", "") if event == "INSERT" else ("old_rows", "-")
    if kind == "recipients":
        select = f"SELECT 'recipients', state, held, {sign}count(*) FROM {rows} GROUP BY 2, 3"  # noqa: S608 (constants)
    else:
        select = f"SELECT 'messages', '', 0, {sign}count(*) FROM {rows} HAVING count(*) > 0"  # noqa: S608
    name = f"{table}_count_{event.lower()}"
    function = (
        f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$"
        f" BEGIN INSERT INTO queue_count_deltas (kind, state, held, n) {select};"
        " RETURN NULL; END $$"
    )
    reference = "NEW TABLE AS new_rows" if event == "INSERT" else "OLD TABLE AS old_rows"
    trigger = (
        f"CREATE TRIGGER {name} AFTER {event} ON {table} REFERENCING {reference}"
        f" FOR EACH STATEMENT EXECUTE FUNCTION {name}()"
    )
    return function, trigger


_COUNTERS: tuple[str, ...] = (
    *_statement_trigger("queue_recipients", "recipients", "INSERT"),
    *_statement_trigger("queue_recipients", "recipients", "DELETE"),
    *_statement_trigger("queue_messages", "messages", "INSERT"),
    *_statement_trigger("queue_messages", "messages", "DELETE"),
    # Per row, and only when the state or the held flag changes: leasing, renewing and
    # releasing (the busiest updates) change neither, and this trigger does not fire.
    "CREATE OR REPLACE FUNCTION queue_recipients_count_update() RETURNS trigger"
    " LANGUAGE plpgsql AS $$ BEGIN"
    " INSERT INTO queue_count_deltas (kind, state, held, n)"
    " VALUES ('recipients', OLD.state, OLD.held, -1), ('recipients', NEW.state, NEW.held, 1);"
    " RETURN NULL; END $$",
    "CREATE TRIGGER queue_recipients_count_update AFTER UPDATE OF state, held"
    " ON queue_recipients FOR EACH ROW"
    " WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.held IS DISTINCT FROM NEW.held)"
    " EXECUTE FUNCTION queue_recipients_count_update()",
)

# Fold the deltas into the counters (under MAINTENANCE_LOCK: one node at a time; writers
# only ever insert deltas, so they never wait for this).
COMPACT_COUNTS = (
    "WITH gone AS (DELETE FROM queue_count_deltas RETURNING kind, state, held, n)"
    " INSERT INTO queue_counts (kind, state, held, n)"
    " SELECT kind, state, held, sum(n) FROM gone GROUP BY kind, state, held"
    " ON CONFLICT (kind, state, held) DO UPDATE SET n = queue_counts.n + excluded.n"
)
COUNTS = (
    "SELECT kind, state, held, sum(n)::bigint FROM ("
    " SELECT kind, state, held, n FROM queue_counts"
    " UNION ALL SELECT kind, state, held, n FROM queue_count_deltas) AS c"
    " GROUP BY kind, state, held"
)

# Each entry takes a store from version N (its index + 1) to N + 1.
_MIGRATIONS: tuple[tuple[str, ...], ...] = ()


class SchemaMismatch(Exception):
    """The database holds a queue schema this code does not know (a newer relay wrote it)."""


async def prepare(conn: psycopg.AsyncConnection[Any]) -> int | None:
    """Create or migrate the queue's schema to SCHEMA_VERSION inside the caller's
    transaction, under SCHEMA_LOCK. Returns the version found (None for a new store).
    Raises SchemaMismatch for an unknown version."""
    # No deadline on waiting for another node's migration, nor on a long migration.
    await conn.execute("SET LOCAL lock_timeout = 0")
    await conn.execute("SET LOCAL statement_timeout = 0")
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS queue_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
    )
    cur = await conn.execute("SELECT value FROM queue_meta WHERE key = 'schema_version'")
    row = await cur.fetchone()
    found = None if row is None else str(row[0])
    if found is not None:
        if not found.isdigit() or not 1 <= int(found) <= SCHEMA_VERSION:
            raise SchemaMismatch(f"schema version {found}, this code knows {SCHEMA_VERSION}")
        if int(found) == SCHEMA_VERSION:
            return SCHEMA_VERSION
        for step in _MIGRATIONS[int(found) - 1 :]:
            for statement in step:
                await conn.execute(statement)  # constants only
    else:
        for statement in (*_TABLES, *_COUNTERS):
            await conn.execute(statement)  # constants only
    await conn.execute(
        "INSERT INTO queue_meta (key, value) VALUES ('schema_version', %s)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (str(SCHEMA_VERSION),),
    )
    return None if found is None else int(found)
