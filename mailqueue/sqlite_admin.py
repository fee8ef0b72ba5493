"""SQL of queue administration in the SQLite store: selections, bulk changes, the journal.

Every change is set-based (a handful of statements over the whole selection, however many
messages it holds) and runs in the caller's one write transaction together with its
journal entry, so a change and the record that it happened are committed together or not
at all. The running relay reads the journal and logs each entry once (`queue_admin`);
`queue_meta.journal_logged` is how far it got. Entries are kept `JOURNAL_KEEP` seconds
after they were logged, as a short audit trail in the store itself.

Like sqlite_ops, every function runs inside a transaction opened by its caller and may be
run again after a rollback. Knows nothing of threads, asyncio, TLS, SMTP or DSNs.
(The SQL is assembled from this module's constants; every value goes in as a parameter:
hence the `noqa: S608`.)
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Sequence
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
from mailqueue.rows import HELD
from mailqueue.rows import message_record as _message
from mailqueue.selection_sql import PENDING, SQLITE, conditions
from mailqueue.sqlite_ops import insert_message, read_data
from mailqueue.sqlite_schema import dsn_from_json

_FREE = SQLITE.free  # not being delivered right now
_SELECTED = "SELECT id FROM temp.admin_selection"


def list_selected(conn: sqlite3.Connection, sel: Selection, now: float) -> list[MessageRecord]:
    """The selected messages, oldest first (unreadable rows skipped); never reads contents."""
    where, args, _, _ = conditions(sel, now, SQLITE)
    chosen = f"SELECT m.id FROM queue_messages m WHERE {where}"  # noqa: S608
    rows = conn.execute(
        "SELECT id, queue_id, sender, received_at, size, held FROM queue_messages"  # noqa: S608
        f" WHERE id IN ({chosen}) ORDER BY id",
        args,
    ).fetchall()
    by_message: dict[int, list[Sequence[Any]]] = {}
    for r in conn.execute(
        "SELECT message_id, address, domain, state, attempts, next_attempt_at, last_error"  # noqa: S608
        f" FROM queue_recipients WHERE message_id IN ({chosen}) ORDER BY message_id, id",
        args,
    ):
        by_message.setdefault(r[0], []).append(r[1:])
    records = (_message(row, by_message.get(row[0], ())) for row in rows)
    return [record for record in records if record is not None]


def apply_admin(
    conn: sqlite3.Connection,
    ids: QueueIds,
    action: AdminAction,
    sel: Selection,
    *,
    now: float,
    operator: str,
    reason: str,
    report: BounceReport | None,
    prepared: Prepared | None = None,
) -> AdminResult:
    """Apply `action` to the selection and journal it (when anything changed), in the
    caller's transaction. `reason` is the bounced recipients' last error; `report` builds
    the report a bounce owes (None: no reports); `prepared`: reports prepare_bounce built."""
    where, args, rcpt_sql, rcpt_args = conditions(sel, now, SQLITE)
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS admin_selection (id INTEGER PRIMARY KEY)")
    conn.execute("DELETE FROM temp.admin_selection")
    matched = conn.execute(
        f"INSERT INTO temp.admin_selection (id) SELECT m.id FROM queue_messages m WHERE {where}",  # noqa: S608
        args,
    ).rowcount
    missing: tuple[str, ...] = ()
    if sel.queue_ids:
        found = {
            row[0]
            for row in conn.execute(
                f"SELECT queue_id FROM queue_messages WHERE id IN ({_SELECTED})"  # noqa: S608
            )
        }
        missing = tuple(q for q in dict.fromkeys(sel.queue_ids) if q not in found)
    held = conn.execute(
        f"SELECT COUNT(*) FROM queue_messages WHERE id IN ({_SELECTED}) AND held = {HELD}"  # noqa: S608
    ).fetchone()[0]
    result = AdminResult(action, sel.describe(), matched, 0, held=held, missing=missing)
    if matched:
        if action is AdminAction.DELETE:
            result = _delete(conn, result)
        elif action in (AdminAction.HOLD, AdminAction.RELEASE):
            result = _hold(conn, result, hold=action is AdminAction.HOLD)
        elif action is AdminAction.FLUSH:
            result = _flush(conn, result, rcpt_sql, rcpt_args, now)
        else:
            result = _bounce(
                conn, ids, result, rcpt_sql, rcpt_args, now, reason, report, prepared or {}
            )
    conn.execute("DELETE FROM temp.admin_selection")
    if result.count:
        one_id = sel.queue_ids[0] if len(sel.queue_ids) == 1 else None
        conn.execute(
            "INSERT INTO queue_admin_journal (at, action, queue_id, selection, matched, count,"
            " operator) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now, action.value, one_id, result.selection, matched, result.count, operator),
        )
    return result


def _delete(conn: sqlite3.Connection, result: AdminResult) -> AdminResult:
    conn.execute(f"DELETE FROM queue_recipients WHERE message_id IN ({_SELECTED})")  # noqa: S608
    count = conn.execute(f"DELETE FROM queue_messages WHERE id IN ({_SELECTED})").rowcount  # noqa: S608
    return replace(result, count=count)


def _hold(conn: sqlite3.Connection, result: AdminResult, *, hold: bool) -> AdminResult:
    """Hold or release; set-aside rows (held = 2) stay set aside."""
    new, old = (HELD, 0) if hold else (0, HELD)
    count = conn.execute(
        f"UPDATE queue_messages SET held = ? WHERE id IN ({_SELECTED}) AND held = ?",  # noqa: S608
        (new, old),
    ).rowcount
    conn.execute(
        f"UPDATE queue_recipients SET held = ? WHERE message_id IN ({_SELECTED}) AND held = ?",  # noqa: S608
        (new, old),
    )
    return replace(result, count=count)


def _in_flight(conn: sqlite3.Connection, rcpt_sql: str, rcpt_args: list[Any], now: float) -> int:
    row = conn.execute(
        f"SELECT COUNT(*) FROM queue_recipients r WHERE r.message_id IN ({_SELECTED})"  # noqa: S608
        f" AND {rcpt_sql} AND r.lease_until > ?",
        (*rcpt_args, now),
    ).fetchone()
    return int(row[0])


def _flush(
    conn: sqlite3.Connection,
    result: AdminResult,
    rcpt_sql: str,
    rcpt_args: list[Any],
    now: float,
) -> AdminResult:
    """Waiting recipients due now; held messages and recipients in delivery left alone."""
    count = conn.execute(
        f"UPDATE queue_recipients AS r SET next_attempt_at = ? WHERE r.message_id IN ({_SELECTED})"  # noqa: S608
        f" AND {rcpt_sql} AND r.held = 0 AND r.next_attempt_at > ? AND {_FREE}",
        (now, *rcpt_args, now, now),
    ).rowcount
    return replace(result, count=count, in_flight=_in_flight(conn, rcpt_sql, rcpt_args, now))


# Reports built ahead of a bounce's write transaction, per message row id: the recipient
# row ids they report on, and the report (None: none owed).
Prepared = dict[int, tuple[frozenset[int], NewMessage | None]]
_Rows = dict[int, list[tuple[int, LeasedRecipient]]]


def _bounce_rows(
    conn: sqlite3.Connection,
    chosen: str,
    args: Sequence[Any],
    rcpt_sql: str,
    rcpt_args: Sequence[Any],
    now: float,
) -> _Rows:
    """The waiting recipients of the messages `chosen` selects that a bounce takes, per
    message: (row id, recipient), not those a worker is delivering."""
    rows = conn.execute(
        "SELECT r.id, r.message_id, r.address, r.attempts, r.delay_notified"  # noqa: S608
        f" FROM queue_recipients r WHERE r.message_id IN ({chosen})"
        f" AND {rcpt_sql} AND {_FREE} ORDER BY r.message_id, r.id",
        (*args, *rcpt_args, now),
    ).fetchall()
    grouped: _Rows = {}
    for row_id, msg_id, address, attempts, notified in rows:
        count = attempts if type(attempts) is int else 0
        grouped.setdefault(msg_id, []).append(
            (row_id, LeasedRecipient(address, count, bool(notified)))
        )
    return grouped


def _build_reports(
    conn: sqlite3.Connection, grouped: _Rows, report: BounceReport, now: float
) -> Prepared:
    out: Prepared = {}
    if not grouped:
        return out
    for msg_id, queue_id, sender, received_at, dsn, requiretls in conn.execute(
        "SELECT id, queue_id, sender, received_at, dsn, requiretls FROM queue_messages"
        " WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
        (json.dumps(sorted(grouped)),),
    ).fetchall():
        if not isinstance(sender, str) or not isinstance(queue_id, str):
            continue
        candidate = BounceCandidate(
            queue_id=queue_id,
            sender=sender,
            received_at=float(received_at) if isinstance(received_at, int | float) else now,
            dsn=dsn_from_json(dsn) or DsnRequest(),
            recipients=tuple(r for _, r in grouped[msg_id]),
            read_data=functools.partial(read_data, conn, queue_id),
            requiretls=requiretls != 0,  # unreadable: treated as REQUIRETLS, never less
        )
        out[msg_id] = (frozenset(row_id for row_id, _ in grouped[msg_id]), report(candidate))
    return out


def prepare_bounce(
    conn: sqlite3.Connection, sel: Selection, now: float, report: BounceReport
) -> Prepared:
    """In a read snapshot, before the write transaction: the reports a bounce of `sel` owes.
    Building them (reading each message, writing each DSN) is most of a large bounce's
    work; done here, it does not keep the store's write lock from the running relay."""
    where, args, rcpt_sql, rcpt_args = conditions(sel, now, SQLITE)
    chosen = f"SELECT m.id FROM queue_messages m WHERE {where}"  # noqa: S608
    return _build_reports(
        conn, _bounce_rows(conn, chosen, args, rcpt_sql, rcpt_args, now), report, now
    )


def _bounce(
    conn: sqlite3.Connection,
    ids: QueueIds,
    result: AdminResult,
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
    something changed since, e.g. the relay delivered one: it is built again)."""
    grouped = _bounce_rows(conn, _SELECTED, (), rcpt_sql, rcpt_args, now)
    dsns = 0
    if report is not None:
        current = {m: frozenset(row_id for row_id, _ in rows) for m, rows in grouped.items()}
        stale = {m: grouped[m] for m in grouped if prepared.get(m, (None, None))[0] != current[m]}
        reports = {**prepared, **_build_reports(conn, stale, report, now)}
        for msg_id in sorted(grouped):
            message = reports[msg_id][1] if msg_id in reports else None
            if message is not None:
                insert_message(conn, ids, message, now)
                dsns += 1
    bounced = [(reason, row_id) for rows in grouped.values() for row_id, _ in rows]
    conn.executemany(
        "UPDATE queue_recipients SET state = 'bounced', last_error = ?, next_attempt_at = NULL,"
        " lease_owner = NULL, lease_until = NULL WHERE id = ?",
        bounced,
    )
    in_flight = _in_flight(conn, rcpt_sql, rcpt_args, now)
    # Messages with nothing left to deliver go, as after a final outcome (sqlite_leases).
    conn.execute(
        "DELETE FROM temp.admin_selection WHERE EXISTS (SELECT 1 FROM queue_recipients r"  # noqa: S608
        f" WHERE r.message_id = temp.admin_selection.id AND {PENDING})"
    )
    conn.execute(f"DELETE FROM queue_recipients WHERE message_id IN ({_SELECTED})")  # noqa: S608
    conn.execute(f"DELETE FROM queue_messages WHERE id IN ({_SELECTED})")  # noqa: S608
    return replace(result, count=len(bounced), in_flight=in_flight, dsns=dsns)


# -- the journal ------------------------------------------------------------------------


def read_journal(conn: sqlite3.Connection, after: int, limit: int) -> list[JournalEntry]:
    """Entries with an id above `after`, oldest first."""
    rows = conn.execute(
        "SELECT id, at, action, queue_id, selection, matched, count, operator"
        " FROM queue_admin_journal WHERE id > ? ORDER BY id LIMIT ?",
        (after, limit),
    ).fetchall()
    return [
        JournalEntry(
            id=int(r[0]),
            at=float(r[1]),
            action=str(r[2]),
            queue_id=r[3] if isinstance(r[3], str) else None,
            selection=str(r[4]),
            matched=int(r[5]),
            count=int(r[6]),
            operator=str(r[7]),
        )
        for r in rows
    ]


def journal_head(conn: sqlite3.Connection) -> int:
    """The id of the newest journal entry (0: none)."""
    return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM queue_admin_journal").fetchone()[0])


def journal_logged(conn: sqlite3.Connection) -> int:
    """The id of the last entry a relay has logged (0: none)."""
    row = conn.execute("SELECT value FROM queue_meta WHERE key = 'journal_logged'").fetchone()
    return int(row[0]) if row is not None and str(row[0]).isdigit() else 0


def mark_journal_logged(conn: sqlite3.Connection, upto: int, now: float) -> None:
    """Entries up to `upto` are logged; those logged and older than JOURNAL_KEEP go."""
    conn.execute(
        "INSERT INTO queue_meta (key, value) VALUES ('journal_logged', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (str(max(upto, journal_logged(conn))),),
    )
    conn.execute(
        "DELETE FROM queue_admin_journal WHERE id <= ? AND at < ?", (upto, now - JOURNAL_KEEP)
    )
