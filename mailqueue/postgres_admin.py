"""SQL of queue administration in the PostgreSQL store: selections, bulk changes, the
journal and its claiming by one node.

What a selection means and what each action touches are the SQLite store's
(sqlite_admin.py, mailqueue/admin.py), in this database's dialect. A change is a handful of
statements over the whole selection, run in one transaction with its journal entry and a
NOTIFY, so other nodes learn of it at its commit. The selected messages are read once, at
the start, into the transaction (their ids), and locked in id order: the change and its
journal entry speak of the same messages, and a node leasing or recording one of them
meanwhile skips it or waits (never a deadlock: everyone locks a message before its rows).

The journal: each entry is logged by exactly one node. `claim_journal` marks unlogged
entries as logged and returns them in one statement (`FOR UPDATE SKIP LOCKED`: two nodes
claiming at once get different entries, none twice, whatever order their transactions
committed in). `journal_logged`/`mark_journal_logged` keep the SQLite store's cursor
semantics for a single relay.

Like postgres_ops, every function runs inside its caller's transaction and may run again
after a rollback. Knows nothing of TLS, SMTP or DSNs (a bounce asks `report`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from mailqueue.admin import (
    JOURNAL_KEEP,
    AdminAction,
    AdminResult,
    BounceCandidate,
    BounceReport,
    JournalEntry,
    Selection,
)
from mailqueue.ids import QueueIds
from mailqueue.model import DsnRequest, LeasedRecipient, MessageRecord, NewMessage
from mailqueue.postgres_ops import (
    Conn,
    delete_rows,
    execute,
    fetchall,
    fetchone,
    insert_one,
    read_data,
    records,
    snapshot,
)
from mailqueue.rows import HELD, dsn_from_json
from mailqueue.selection_sql import PENDING, POSTGRES, conditions

_FREE = POSTGRES.free  # not being delivered right now
_IN_SELECTION = "r.message_id = ANY(%s::int8[])"


async def list_selected(conn: Conn, sel: Selection, now: float) -> list[MessageRecord]:
    """The selected messages, oldest first (unreadable rows skipped); never reads contents."""
    await snapshot(conn)
    where, args, _, _ = conditions(sel, now, POSTGRES)
    rows = await fetchall(
        conn,
        "SELECT m.id, m.queue_id, m.sender, m.received_at, m.size, m.held"  # noqa: S608
        f" FROM queue_messages m WHERE {where} ORDER BY m.id",
        args,
    )
    return await records(conn, rows)


# Reports built ahead of a bounce's write transaction, per message row id: the recipient
# row ids they report on, and the report (None: none owed).
Prepared = dict[int, tuple[frozenset[int], NewMessage | None]]
_Rows = dict[int, list[tuple[int, LeasedRecipient]]]


async def apply_admin(
    conn: Conn,
    ids: QueueIds,
    action: AdminAction,
    sel: Selection,
    *,
    now: float,
    operator: str,
    reason: str,
    report: BounceReport | None,
    prepared: Prepared | None,
    channel: str,
) -> AdminResult:
    """Apply `action` to the selection, journal it (when anything changed) and notify the
    other nodes, in the caller's transaction. `reason` is the bounced recipients' last
    error; `report` builds the report a bounce owes (None: no reports); `prepared`:
    reports prepare_bounce built."""
    where, args, rcpt_sql, rcpt_args = conditions(sel, now, POSTGRES)
    # The messages' row locks, taken in one order before any recipient row is touched, as
    # leasing and recording take them: changes to one message queue up, never deadlock.
    lock = "UPDATE" if action is AdminAction.DELETE else "NO KEY UPDATE"
    selected = await fetchall(
        conn,
        f"SELECT m.id, m.queue_id, m.held FROM queue_messages m WHERE {where}"  # noqa: S608
        f" ORDER BY m.id FOR {lock} OF m",
        args,
    )
    chosen = [row[0] for row in selected]
    found = {row[1] for row in selected}
    missing = tuple(q for q in dict.fromkeys(sel.queue_ids) if q not in found)
    held = sum(1 for row in selected if row[2] == HELD)
    result = AdminResult(action, sel.describe(), len(chosen), 0, held=held, missing=missing)
    if chosen:
        if action is AdminAction.DELETE:
            result = replace(result, count=await delete_rows(conn, chosen))
        elif action in (AdminAction.HOLD, AdminAction.RELEASE):
            result = await _hold(conn, result, chosen, hold=action is AdminAction.HOLD)
        elif action is AdminAction.FLUSH:
            result = await _flush(conn, result, chosen, rcpt_sql, rcpt_args, now)
        else:
            result = await _bounce(
                conn, ids, result, chosen, rcpt_sql, rcpt_args, now, reason, report, prepared or {}
            )
    if result.count:
        one_id = sel.queue_ids[0] if len(sel.queue_ids) == 1 else None
        row = await fetchone(
            conn,
            "INSERT INTO queue_admin_journal (at, action, queue_id, selection, matched, count,"
            " operator) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (now, action.value, one_id, result.selection, result.matched, result.count, operator),
        )
        assert row is not None  # noqa: S101 (INSERT ... RETURNING returns the row)
        await conn.execute("SELECT pg_notify(%s, %s)", (channel, f"{action.value} {row[0]}"))
    return result


async def _hold(conn: Conn, result: AdminResult, chosen: list[int], *, hold: bool) -> AdminResult:
    """Hold or release; set-aside rows (held = 2) stay set aside."""
    new, old = (HELD, 0) if hold else (0, HELD)
    count = await execute(
        conn,
        "UPDATE queue_messages SET held = %s WHERE id = ANY(%s::int8[]) AND held = %s",
        (new, chosen, old),
    )
    await conn.execute(
        "UPDATE queue_recipients SET held = %s WHERE message_id = ANY(%s::int8[]) AND held = %s",
        (new, chosen, old),
    )
    return replace(result, count=count)


async def _in_flight(
    conn: Conn, chosen: list[int], rcpt_sql: str, rcpt_args: list[Any], now: float
) -> int:
    row = await fetchone(
        conn,
        f"SELECT count(*) FROM queue_recipients r WHERE {_IN_SELECTION} AND {rcpt_sql}"  # noqa: S608
        " AND r.lease_until > %s",
        (chosen, *rcpt_args, now),
    )
    return int(row[0]) if row is not None else 0


async def _flush(
    conn: Conn,
    result: AdminResult,
    chosen: list[int],
    rcpt_sql: str,
    rcpt_args: list[Any],
    now: float,
) -> AdminResult:
    """Waiting recipients due now; held messages and recipients in delivery left alone."""
    count = await execute(
        conn,
        f"UPDATE queue_recipients AS r SET next_attempt_at = %s WHERE {_IN_SELECTION}"  # noqa: S608
        f" AND {rcpt_sql} AND r.held = 0 AND r.next_attempt_at > %s AND {_FREE}",
        (now, chosen, *rcpt_args, now, now),
    )
    in_flight = await _in_flight(conn, chosen, rcpt_sql, rcpt_args, now)
    return replace(result, count=count, in_flight=in_flight)


async def _bounce_rows(
    conn: Conn, chosen: list[int], rcpt_sql: str, rcpt_args: Sequence[Any], now: float
) -> _Rows:
    """The waiting recipients of `chosen` that a bounce takes, per message: (row id,
    recipient), not those a worker is delivering."""
    grouped: _Rows = {}
    for row_id, msg_id, address, attempts, notified in await fetchall(
        conn,
        "SELECT r.id, r.message_id, r.address, r.attempts, r.delay_notified"  # noqa: S608
        f" FROM queue_recipients r WHERE {_IN_SELECTION} AND {rcpt_sql} AND {_FREE}"
        " ORDER BY r.message_id, r.id",
        (chosen, *rcpt_args, now),
    ):
        recipient = LeasedRecipient(address, attempts, notified)
        grouped.setdefault(msg_id, []).append((row_id, recipient))
    return grouped


async def _build_reports(conn: Conn, grouped: _Rows, report: BounceReport, now: float) -> Prepared:
    """Ask `report` for each message's report. It is plain code that may read the content
    (BounceCandidate.read_data, a blocking call): it runs in a worker thread, and each read
    comes back to the event loop to be made on this transaction's connection."""
    if not grouped:
        return {}
    loop = asyncio.get_running_loop()

    def reader(queue_id: str) -> Callable[[], bytes | None]:
        def read() -> bytes | None:
            return asyncio.run_coroutine_threadsafe(read_data(conn, queue_id), loop).result()

        return read

    candidates: list[tuple[int, BounceCandidate]] = []
    for msg_id, queue_id, sender, received_at, dsn, requiretls in await fetchall(
        conn,
        "SELECT id, queue_id, sender, received_at, dsn, requiretls FROM queue_messages"
        " WHERE id = ANY(%s::int8[]) ORDER BY id",
        (sorted(grouped),),
    ):
        candidate = BounceCandidate(
            queue_id=queue_id,
            sender=sender,
            received_at=float(received_at),
            dsn=dsn_from_json(dsn) or DsnRequest(),
            recipients=tuple(r for _, r in grouped[msg_id]),
            read_data=reader(queue_id),
            requiretls=requiretls,
        )
        candidates.append((msg_id, candidate))
    built = await asyncio.to_thread(lambda: [report(c) for _, c in candidates])
    return {
        msg_id: (frozenset(row_id for row_id, _ in grouped[msg_id]), message)
        for (msg_id, _), message in zip(candidates, built, strict=True)
    }


async def prepare_bounce(conn: Conn, sel: Selection, now: float, report: BounceReport) -> Prepared:
    """In a read snapshot, before the write transaction: the reports a bounce of `sel` owes.
    Building them (reading each message, writing each DSN) is most of a large bounce's
    work; done here, the write transaction holds its locks for less time."""
    await snapshot(conn)
    where, args, rcpt_sql, rcpt_args = conditions(sel, now, POSTGRES)
    chosen = [
        row[0]
        for row in await fetchall(conn, f"SELECT m.id FROM queue_messages m WHERE {where}", args)  # noqa: S608
    ]
    return await _build_reports(
        conn, await _bounce_rows(conn, chosen, rcpt_sql, rcpt_args, now), report, now
    )


async def _bounce(
    conn: Conn,
    ids: QueueIds,
    result: AdminResult,
    chosen: list[int],
    rcpt_sql: str,
    rcpt_args: list[Any],
    now: float,
    reason: str,
    report: BounceReport | None,
    prepared: Prepared,
) -> AdminResult:
    """Bounce the selected waiting recipients now, queue the reports they owe, and delete
    the messages left with nothing to deliver (as recording a final outcome does). A
    prepared report is used only when it covers exactly the recipients bounced now (else
    something changed since, e.g. a node delivered one: it is built again)."""
    grouped = await _bounce_rows(conn, chosen, rcpt_sql, rcpt_args, now)
    dsns = 0
    if report is not None:
        current = {m: frozenset(row_id for row_id, _ in rows) for m, rows in grouped.items()}
        stale = {m: grouped[m] for m in grouped if prepared.get(m, (None, None))[0] != current[m]}
        reports = {**prepared, **await _build_reports(conn, stale, report, now)}
        for msg_id in sorted(grouped):
            message = reports[msg_id][1] if msg_id in reports else None
            if message is not None:
                await insert_one(conn, ids, message, now)
                dsns += 1
    bounced = [row_id for rows in grouped.values() for row_id, _ in rows]
    await conn.execute(
        "UPDATE queue_recipients SET state = 'bounced', last_error = %s, next_attempt_at = NULL,"
        " lease_owner = NULL, lease_until = NULL WHERE id = ANY(%s::int8[])",
        (reason, bounced),
    )
    in_flight = await _in_flight(conn, chosen, rcpt_sql, rcpt_args, now)
    # Messages with nothing left to deliver go, as after a final outcome (postgres_leases).
    done = await fetchall(
        conn,
        "SELECT m FROM unnest(%s::int8[]) AS m WHERE NOT EXISTS (SELECT 1 FROM"  # noqa: S608
        f" queue_recipients r WHERE r.message_id = m AND {PENDING})",
        (chosen,),
    )
    await delete_rows(conn, [row[0] for row in done])
    return replace(result, count=len(bounced), in_flight=in_flight, dsns=dsns)


# -- the journal ------------------------------------------------------------------------

_ENTRY = "id, at, action, queue_id, selection, matched, count, operator"


def _entry(r: Sequence[Any]) -> JournalEntry:
    return JournalEntry(
        id=int(r[0]),
        at=float(r[1]),
        action=str(r[2]),
        queue_id=r[3],
        selection=str(r[4]),
        matched=int(r[5]),
        count=int(r[6]),
        operator=str(r[7]),
    )


async def read_journal(conn: Conn, after: int, limit: int) -> list[JournalEntry]:
    """Entries with an id above `after`, oldest first."""
    rows = await fetchall(
        conn,
        f"SELECT {_ENTRY} FROM queue_admin_journal WHERE id > %s ORDER BY id LIMIT %s",  # noqa: S608
        (after, limit),
    )
    return [_entry(r) for r in rows]


async def journal_head(conn: Conn) -> int:
    """The id of the newest journal entry (0: none)."""
    row = await fetchone(conn, "SELECT COALESCE(max(id), 0) FROM queue_admin_journal")
    return int(row[0]) if row is not None else 0


async def journal_logged(conn: Conn) -> int:
    """How far the journal is logged: every entry up to this id is (0: none)."""
    row = await fetchone(
        conn,
        "SELECT LEAST("
        " COALESCE((SELECT value::int8 FROM queue_meta WHERE key = 'journal_logged'), 0),"
        " COALESCE((SELECT min(id) - 1 FROM queue_admin_journal WHERE logged_at IS NULL),"
        "  9223372036854775807))",
    )
    return int(row[0]) if row is not None else 0


async def _advance(conn: Conn, upto: int) -> None:
    await conn.execute(
        "INSERT INTO queue_meta (key, value) VALUES ('journal_logged', %s)"
        " ON CONFLICT (key) DO UPDATE SET value ="
        " greatest(queue_meta.value::int8, excluded.value::int8)::text",
        (str(upto),),
    )


async def mark_journal_logged(conn: Conn, upto: int, now: float) -> None:
    """Entries up to `upto` are logged; those logged and older than JOURNAL_KEEP go."""
    await conn.execute(
        "UPDATE queue_admin_journal SET logged_at = %s WHERE id <= %s AND logged_at IS NULL",
        (now, upto),
    )
    await _advance(conn, upto)
    await conn.execute(
        "DELETE FROM queue_admin_journal WHERE id <= %s AND at < %s AND logged_at IS NOT NULL",
        (upto, now - JOURNAL_KEEP),
    )


async def claim_journal(conn: Conn, now: float, limit: int) -> list[JournalEntry]:
    """Up to `limit` entries no node has logged yet, marked as logged by the caller, who
    logs them (oldest first). Two nodes claiming at once never get the same entry."""
    rows = await fetchall(
        conn,
        "UPDATE queue_admin_journal SET logged_at = %s WHERE id IN (SELECT id FROM"  # noqa: S608
        " queue_admin_journal WHERE logged_at IS NULL ORDER BY id LIMIT %s"
        f" FOR UPDATE SKIP LOCKED) RETURNING {_ENTRY}",
        (now, limit),
    )
    entries = sorted((_entry(r) for r in rows), key=lambda e: e.id)
    if entries:
        await _advance(conn, entries[-1].id)
        await conn.execute(
            "DELETE FROM queue_admin_journal WHERE at < %s AND logged_at IS NOT NULL",
            (now - JOURNAL_KEEP,),
        )
    return entries
