"""SQL of the SQLite queue store: row decoding, messages, reads and admin operations
(the lease lifecycle is sqlite_leases.py's).

Every function here runs inside a transaction opened by its caller (the group-commit
writer for writes, a read snapshot for reads) and is a function of the connection and
plain arguments, so a failed batch can simply run it again. Owns only `queue_*` tables.
Knows nothing of threads, asyncio, TLS or SMTP.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from mailqueue.ids import QueueIds
from mailqueue.model import MessageRecord, NewMessage
from mailqueue.rows import HELD as HELD
from mailqueue.rows import SET_ASIDE as SET_ASIDE
from mailqueue.rows import domain_of, tally_counts
from mailqueue.rows import message_record as _message
from mailqueue.sqlite_schema import dsn_to_json

BLOB_CHUNK = 1 << 20  # larger contents are written and read in pieces of this size
_INSERT = (
    "INSERT INTO queue_messages"
    " (queue_id, sender, received_at, size, held, client, dsn, requiretls, data)"
    " VALUES (?, ?, ?, ?, 0, ?, ?, ?, "
)
_INSERT_SMALL, _INSERT_BIG = _INSERT + "?)", _INSERT + "zeroblob(?))"
_INSERT_RECIPIENT = (
    "INSERT INTO queue_recipients (message_id, address, domain, state, attempts,"
    " next_attempt_at) VALUES (?, ?, ?, 'queued', 0, ?)"
)
LEASABLE = "state IN ('queued', 'deferred') AND held = 0"  # must match the partial index


def set_aside(conn: sqlite3.Connection, rcpt_ids: Iterable[int], reason: str) -> None:
    """Never leased again, counted as "set_aside"; the reason shows in `last_error`."""
    conn.executemany(
        "UPDATE queue_recipients SET held = ?, last_error = ?, lease_owner = NULL,"
        " lease_until = NULL WHERE id = ?",
        [(SET_ASIDE, f"set aside: {reason}", rid) for rid in rcpt_ids],
    )


def message_id(conn: sqlite3.Connection, queue_id: str) -> int | None:
    found = conn.execute("SELECT id FROM queue_messages WHERE queue_id = ?", (queue_id,)).fetchone()
    return None if found is None else int(found[0])


def insert_message(conn: sqlite3.Connection, ids: QueueIds, msg: NewMessage, now: float) -> str:
    """One message row and one QUEUED row per distinct recipient, due now.

    Uses `msg.queue_id` when the submitter chose one (a clash is an IntegrityError: the
    submitter answers 4xx and tries again with a new id), else picks a fresh id.
    """
    dsn = dsn_to_json(msg.dsn)
    big = len(msg.data) > BLOB_CHUNK
    content: bytes | int = len(msg.data) if big else msg.data
    sql = _INSERT_BIG if big else _INSERT_SMALL
    for _ in range(1 if msg.queue_id else 5):
        queue_id = msg.queue_id or ids.next(now)
        try:
            cur = conn.execute(
                sql,
                (
                    queue_id,
                    msg.sender,
                    now,
                    len(msg.data),
                    msg.client,
                    dsn,
                    int(msg.requiretls),
                    content,
                ),
            )
        except sqlite3.IntegrityError:
            if msg.queue_id:
                raise
            continue  # another process took this id in the same millisecond
        break
    else:
        raise sqlite3.IntegrityError("no free queue id")
    row_id = int(cur.lastrowid or 0)
    if big:
        write_blob(conn, row_id, msg.data)
    rows = [(row_id, a, domain_of(a), now) for a in dict.fromkeys(msg.recipients)]
    if len(rows) == 1:  # most mail: execute() costs less than executemany() for one row
        conn.execute(_INSERT_RECIPIENT, rows[0])
    else:
        conn.executemany(_INSERT_RECIPIENT, rows)
    return queue_id


def write_blob(conn: sqlite3.Connection, row_id: int, data: bytes) -> None:
    """Fill a zeroblob in chunks: binding a large value would make SQLite copy it whole."""
    view = memoryview(data)
    with conn.blobopen("queue_messages", "data", row_id) as blob:
        for start in range(0, len(view), BLOB_CHUNK):
            blob.write(view[start : start + BLOB_CHUNK])


def delete_rows(conn: sqlite3.Connection, msg_id: int) -> None:
    """Remove a message and its recipients (by row id)."""
    conn.execute("DELETE FROM queue_recipients WHERE message_id = ?", (msg_id,))
    conn.execute("DELETE FROM queue_messages WHERE id = ?", (msg_id,))


def delete_message(conn: sqlite3.Connection, queue_id: str) -> bool:
    msg_id = message_id(conn, queue_id)
    if msg_id is None:
        return False
    delete_rows(conn, msg_id)
    return True


def set_held(conn: sqlite3.Connection, queue_id: str, held: bool) -> bool:
    """Hold or release a message; set-aside rows (held = 2) stay set aside."""
    msg_id = message_id(conn, queue_id)
    if msg_id is None:
        return False
    new, old = (HELD, 0) if held else (0, HELD)
    conn.execute("UPDATE queue_messages SET held = ? WHERE id = ?", (new, msg_id))
    conn.execute(
        "UPDATE queue_recipients SET held = ? WHERE message_id = ? AND held = ?",
        (new, msg_id, old),
    )
    return True


def flush(conn: sqlite3.Connection, queue_id: str | None, now: float) -> int:
    """Make waiting recipients due now; held and currently leased ones are left alone."""
    sql = (
        "UPDATE queue_recipients SET next_attempt_at = ?"
        " WHERE state IN ('queued', 'deferred') AND held = 0"
        " AND next_attempt_at > ? AND (lease_until IS NULL OR lease_until <= ?)"
    )
    if queue_id is None:
        return conn.execute(sql, (now, now, now)).rowcount
    msg_id = message_id(conn, queue_id)
    if msg_id is None:
        return 0
    return conn.execute(f"{sql} AND message_id = ?", (now, now, now, msg_id)).rowcount


def read_data(conn: sqlite3.Connection, queue_id: str) -> bytes | None:
    """The content, read through the incremental blob API: SQLite copies the pages straight
    into the one bytes object returned (a SELECT would materialise it twice)."""
    row = conn.execute(
        "SELECT id, typeof(data) FROM queue_messages WHERE queue_id = ?", (queue_id,)
    ).fetchone()
    if row is None or row[1] != "blob":
        return None
    with conn.blobopen("queue_messages", "data", row[0], readonly=True) as blob:
        return blob.read()


def next_due_at(conn: sqlite3.Connection) -> float | None:
    row = conn.execute(
        "SELECT MIN(next_attempt_at) FROM queue_recipients"
        " WHERE state IN ('queued', 'deferred') AND held = 0"
    )
    value = row.fetchone()[0]
    return float(value) if isinstance(value, int | float) else None


def get_message(conn: sqlite3.Connection, queue_id: str) -> MessageRecord | None:
    row = conn.execute(
        "SELECT id, queue_id, sender, received_at, size, held FROM queue_messages"
        " WHERE queue_id = ?",
        (queue_id,),
    ).fetchone()
    if row is None:
        return None
    rcpts = conn.execute(
        "SELECT address, domain, state, attempts, next_attempt_at, last_error"
        " FROM queue_recipients WHERE message_id = ? ORDER BY id",
        (row[0],),
    )
    return _message(row, rcpts)


def list_messages(conn: sqlite3.Connection, limit: int | None) -> list[MessageRecord]:
    """Oldest first; unreadable rows are skipped. Never reads message contents."""
    rows = conn.execute(
        "SELECT id, queue_id, sender, received_at, size, held FROM queue_messages"
        " ORDER BY id LIMIT ?",
        (-1 if limit is None else limit,),
    ).fetchall()
    if not rows:
        return []
    by_message: dict[int, list[Sequence[Any]]] = {}
    for r in conn.execute(
        "SELECT message_id, address, domain, state, attempts, next_attempt_at, last_error"
        " FROM queue_recipients WHERE message_id <= ?"
        " ORDER BY message_id, id",
        (rows[-1][0],),
    ):
        by_message.setdefault(r[0], []).append(r[1:])
    records = (_message(row, by_message.get(row[0], ())) for row in rows)
    return [record for record in records if record is not None]


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Recipients per state; "held" (of held messages), "set_aside", and "messages".

    Reads the counters the schema's triggers keep (sqlite_schema.py), a few rows however
    long the queue: this runs on every metrics scrape and readiness probe. Recipients in
    a state this code does not know count as set aside, as the rows themselves are.
    """
    return tally_counts(conn.execute("SELECT kind, state, held, n FROM queue_counts"))
