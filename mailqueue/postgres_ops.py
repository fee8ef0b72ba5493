"""SQL of the PostgreSQL queue store: storing messages, reading them, and the
single-message changes (the lease lifecycle is postgres_leases.py's, bulk administration
postgres_admin.py's).

Every function runs inside a transaction its caller opened (postgres_connections.py) and
is a function of the connection and plain arguments, so a transaction the server broke
off (a deadlock, a lost session) can simply run it again. Owns only `queue_*` tables.
Knows nothing of TLS or SMTP.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import psycopg

from mailqueue.ids import QueueIds
from mailqueue.model import MessageRecord, NewMessage
from mailqueue.postgres_connections import StatementFailed
from mailqueue.postgres_schema import COUNTS
from mailqueue.rows import (
    HELD,
    SET_ASIDE,
    domain_of,
    dsn_to_json,
    message_record,
    tally_counts,
)

Conn = psycopg.AsyncConnection[Any]
# Leasable rows are written `state IN ('queued', 'deferred') AND held = 0` in every
# statement that looks for them: the predicate of the partial index queue_recipients_due.
_ID_TRIES = 5  # fresh ids tried for a message whose store-chosen id was taken meanwhile

# One statement for a whole batch of messages (group commit): each column an array. An id
# already in the queue inserts nothing and returns nothing; the transaction goes on.
_INSERT_MESSAGES = (
    "INSERT INTO queue_messages (queue_id, sender, received_at, size, client, dsn,"
    " requiretls, data)"
    " SELECT q, s, %s, z, c, d, t, b FROM unnest(%s::text[], %s::text[], %s::int8[],"
    " %s::text[], %s::text[], %s::bool[], %b::bytea[]) AS v(q, s, z, c, d, t, b)"
    " ON CONFLICT (queue_id) DO NOTHING RETURNING queue_id, id"
)
_INSERT_RECIPIENTS = (
    "INSERT INTO queue_recipients (message_id, address, domain, state, attempts,"
    " next_attempt_at)"
    " SELECT m, a, d, 'queued', 0, %s FROM unnest(%s::int8[], %s::text[], %s::text[])"
    " WITH ORDINALITY AS v(m, a, d, n) ORDER BY n"
)


async def fetchone(conn: Conn, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
    cur = await conn.execute(sql, params)
    return await cur.fetchone()


async def fetchall(conn: Conn, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    cur = await conn.execute(sql, params)
    return await cur.fetchall()


async def execute(conn: Conn, sql: str, params: Sequence[Any] = ()) -> int:
    """Run a statement; the number of rows it touched."""
    cur = await conn.execute(sql, params)
    return cur.rowcount


async def snapshot(conn: Conn) -> None:
    """Make the caller's transaction one read-only snapshot (several statements agree)."""
    await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")


async def notify(conn: Conn, channel: str, payload: str) -> None:
    """Tell every listening node, at this transaction's commit, that the queue changed."""
    await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


# -- storing ---------------------------------------------------------------------------


async def insert_messages(
    conn: Conn, ids: QueueIds, msgs: Sequence[NewMessage], now: float
) -> list[str | StatementFailed]:
    """Store `msgs` (their rows and one QUEUED row per distinct recipient, due now) in a
    few statements whatever their number; per message, its queue id or why it was not
    stored. A submitter-chosen id already in the queue (or twice in `msgs`) stores nothing
    of that message: the submitter answers 4xx and tries again with a new id. A store-chosen
    id taken meanwhile by another node is replaced by a fresh one."""
    outcome: list[str | StatementFailed | None] = [None] * len(msgs)
    taken: set[str] = set()
    pending: list[tuple[int, str]] = []
    for i, msg in enumerate(msgs):
        if msg.queue_id and msg.queue_id in taken:
            outcome[i] = StatementFailed(f"queue store: queue id {msg.queue_id} is taken")
            continue
        queue_id = msg.queue_id or _fresh_id(ids, now, taken)
        taken.add(queue_id)
        pending.append((i, queue_id))
    row_ids: dict[int, int] = {}
    for _ in range(_ID_TRIES):
        if not pending:
            break
        inserted = await _insert_rows(conn, [(msgs[i], q) for i, q in pending], now)
        retry: list[tuple[int, str]] = []
        for i, queue_id in pending:
            row_id = inserted.get(queue_id)
            if row_id is not None:
                row_ids[i], outcome[i] = row_id, queue_id
            elif msgs[i].queue_id:
                outcome[i] = StatementFailed(f"queue store: queue id {queue_id} is taken")
            else:
                retry.append((i, _fresh_id(ids, now, taken)))
        pending = retry
    for i, _ in pending:
        outcome[i] = StatementFailed("queue store: no free queue id")
    rcpts = [(row_ids[i], a) for i in sorted(row_ids) for a in dict.fromkeys(msgs[i].recipients)]
    if rcpts:
        await conn.execute(
            _INSERT_RECIPIENTS,
            (
                now,
                [m for m, _ in rcpts],
                [a for _, a in rcpts],
                [domain_of(a) for _, a in rcpts],
            ),
        )
    return [o if o is not None else StatementFailed("queue store: not stored") for o in outcome]


def _fresh_id(ids: QueueIds, now: float, taken: set[str]) -> str:
    while True:
        queue_id = ids.next(now)
        if queue_id not in taken:
            return queue_id


async def _insert_rows(
    conn: Conn, msgs: Sequence[tuple[NewMessage, str]], now: float
) -> dict[str, int]:
    """Insert the message rows; the row id of each queue id actually inserted."""
    cur = await conn.execute(
        _INSERT_MESSAGES,
        (
            now,
            [q for _, q in msgs],
            [m.sender for m, _ in msgs],
            [len(m.data) for m, _ in msgs],
            [m.client for m, _ in msgs],
            [dsn_to_json(m.dsn) for m, _ in msgs],
            [m.requiretls for m, _ in msgs],
            [m.data for m, _ in msgs],
        ),
    )
    return {str(q): int(i) for q, i in await cur.fetchall()}


async def insert_one(conn: Conn, ids: QueueIds, msg: NewMessage, now: float) -> str:
    """Store one message inside a larger transaction (a DSN); raises StatementFailed."""
    (outcome,) = await insert_messages(conn, ids, [msg], now)
    if isinstance(outcome, StatementFailed):
        raise outcome
    return outcome


# -- reading ---------------------------------------------------------------------------


async def read_data(conn: Conn, queue_id: str) -> bytes | None:
    # Binary: the content comes as it is stored, not as hex text to decode.
    cur = await conn.execute(
        "SELECT data FROM queue_messages WHERE queue_id = %s", (queue_id,), binary=True
    )
    row = await cur.fetchone()
    return None if row is None else bytes(row[0])


async def next_due_at(conn: Conn) -> float | None:
    row = await fetchone(
        conn,
        "SELECT min(next_attempt_at) FROM queue_recipients"
        " WHERE state IN ('queued', 'deferred') AND held = 0",
    )
    return None if row is None or row[0] is None else float(row[0])


_MESSAGE_COLUMNS = "id, queue_id, sender, received_at, size, held"
_RECIPIENT_COLUMNS = "message_id, address, domain, state, attempts, next_attempt_at, last_error"


async def records(conn: Conn, rows: Sequence[tuple[Any, ...]]) -> list[MessageRecord]:
    """The records of these message rows (_MESSAGE_COLUMNS) with their recipients, in the
    rows' order; unreadable rows skipped."""
    if not rows:
        return []
    by_message: dict[int, list[tuple[Any, ...]]] = {}
    for r in await fetchall(
        conn,
        f"SELECT {_RECIPIENT_COLUMNS} FROM queue_recipients"  # noqa: S608 (constants)
        " WHERE message_id = ANY(%s::int8[]) ORDER BY message_id, id",
        ([row[0] for row in rows],),
    ):
        by_message.setdefault(r[0], []).append(r[1:])
    decoded = (message_record(row, by_message.get(row[0], ())) for row in rows)
    return [record for record in decoded if record is not None]


async def get_message(conn: Conn, queue_id: str) -> MessageRecord | None:
    await snapshot(conn)
    row = await fetchone(
        conn,
        f"SELECT {_MESSAGE_COLUMNS} FROM queue_messages WHERE queue_id = %s",  # noqa: S608
        (queue_id,),
    )
    found = await records(conn, [row] if row is not None else [])
    return found[0] if found else None


async def list_messages(conn: Conn, limit: int | None) -> list[MessageRecord]:
    """Oldest first; unreadable rows are skipped. Never reads message contents."""
    await snapshot(conn)
    rows = await fetchall(
        conn,
        f"SELECT {_MESSAGE_COLUMNS} FROM queue_messages ORDER BY id LIMIT %s",  # noqa: S608
        (limit,),
    )
    return await records(conn, rows)


async def counts(conn: Conn) -> dict[str, int]:
    """Recipients per state, "held", "set_aside" and "messages", from the counters and the
    deltas not folded into them yet (postgres_schema.py): a few hundred rows at most."""
    return tally_counts(await fetchall(conn, COUNTS))


# -- single-message changes ------------------------------------------------------------


async def lock_message(conn: Conn, queue_id: str) -> tuple[Any, ...] | None:
    """(row id, received_at) of the message, its row locked until the commit: every change
    to a lease takes this lock first, so changes to one message's leases never deadlock."""
    return await fetchone(
        conn,
        "SELECT id, received_at FROM queue_messages WHERE queue_id = %s FOR NO KEY UPDATE",
        (queue_id,),
    )


async def delete_rows(conn: Conn, msg_ids: Iterable[int]) -> int:
    """Remove messages and their recipients (by row id); how many messages."""
    ids = list(msg_ids)
    await conn.execute("DELETE FROM queue_recipients WHERE message_id = ANY(%s::int8[])", (ids,))
    return await execute(conn, "DELETE FROM queue_messages WHERE id = ANY(%s::int8[])", (ids,))


async def delete_message(conn: Conn, queue_id: str) -> bool:
    found = await fetchone(
        conn, "SELECT id FROM queue_messages WHERE queue_id = %s FOR UPDATE", (queue_id,)
    )
    return found is not None and await delete_rows(conn, [found[0]]) > 0


async def set_held(conn: Conn, queue_id: str, held: bool) -> bool:
    """Hold or release a message; set-aside rows (held = 2) stay set aside."""
    found = await lock_message(conn, queue_id)
    if found is None:
        return False
    new, old = (HELD, 0) if held else (0, HELD)
    await conn.execute("UPDATE queue_messages SET held = %s WHERE id = %s", (new, found[0]))
    await conn.execute(
        "UPDATE queue_recipients SET held = %s WHERE message_id = %s AND held = %s",
        (new, found[0], old),
    )
    return True


async def flush(conn: Conn, queue_id: str | None, now: float) -> int:
    """Make waiting recipients due now; held and currently leased ones are left alone."""
    return await execute(
        conn,
        "UPDATE queue_recipients SET next_attempt_at = %s"
        " WHERE state IN ('queued', 'deferred') AND held = 0 AND next_attempt_at > %s"
        " AND (lease_until IS NULL OR lease_until <= %s) AND (%s::text IS NULL OR"
        " message_id = (SELECT id FROM queue_messages WHERE queue_id = %s))",
        (now, now, now, queue_id, queue_id),
    )


async def set_aside(conn: Conn, rcpt_ids: Sequence[int], reason: str) -> None:
    """Never leased again, counted as "set_aside"; the reason shows in `last_error`."""
    if rcpt_ids:
        await conn.execute(
            "UPDATE queue_recipients SET held = %s, last_error = %s, lease_owner = NULL,"
            " lease_until = NULL WHERE id = ANY(%s::int8[])",
            (SET_ASIDE, f"set aside: {reason}", list(rcpt_ids)),
        )
