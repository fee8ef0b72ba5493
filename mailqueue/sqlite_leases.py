"""SQL of the lease lifecycle in the SQLite queue store: lease, renew, release, record.

A lease is the rows of one (message, domain) that carry its `lease_owner` and
`lease_until`; that pair names it. Renewing, releasing and recording touch only rows that
still carry both, so a holder whose lease was taken over (it ran out and another owner
leased the rows) or renewed changes nothing. Rows of a lease that ran out and that nobody
leased again still carry the pair: a late result is still applied.

`record_lease` leaves a receipt, the `Recorded` it returned, until the (message, domain) is
leased again or RECEIPT_KEEP seconds have passed (none when the call deleted the message:
every recipient final), so that a caller retrying a call whose commit
happened but whose reply it never saw gets that same answer, and nothing is applied or
queued twice. (Without the receipt a retry would still apply nothing, its rows no longer
being under the lease, and queue no DSN; it would only report every address as lost.)

Every function runs inside the caller's write transaction and may run twice (a failed
group-commit batch is run again op by op). Knows nothing of threads, asyncio, TLS or SMTP.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Sequence
from typing import Any

from mailqueue.ids import QueueIds
from mailqueue.model import (
    FINAL_STATES,
    RECEIPT_KEEP,
    Lease,
    LeasedRecipient,
    NewMessage,
    RcptState,
    RecipientResult,
    Recorded,
)
from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite_ops import insert_message, message_id, set_aside
from mailqueue.sqlite_schema import dsn_from_json

# The message of a lease and its rows still under the lease (none: one row of NULLs), plus
# whether any recipient of the message outside the lease is still pending, found once per
# call: bound as (domain, lease_owner, lease_until, queue_id). `+lease_owner` keeps SQLite
# off the lease_owner index (every row leased by this node shares one owner: a scan of all
# of them per call); the message's rows come by message_id.
_SELECT_UNDER_LEASE = (
    "SELECT m.id, m.received_at, r.id, r.address, r.attempts,"
    " EXISTS (SELECT 1 FROM queue_recipients p"
    "  WHERE p.message_id = (SELECT id FROM queue_messages WHERE queue_id = ?4)"
    "  AND p.state NOT IN ('sent', 'bounced')"
    "  AND NOT (p.domain = ?1 AND p.lease_owner IS ?2 AND p.lease_until IS ?3"
    "   AND p.state IN ('queued', 'deferred')))"
    " FROM queue_messages m LEFT JOIN queue_recipients r ON r.message_id = m.id"
    " AND r.domain = ?1 AND +r.lease_owner = ?2 AND r.lease_until = ?3"
    " AND r.state IN ('queued', 'deferred')"
    " WHERE m.queue_id = ?4"
)
# Rows of a lease being renewed to the second until: still under it, or already moved
# there by this same call whose reply was lost (a retried renew answers the same).
_SELECT_RENEWABLE = (
    "SELECT id, address FROM queue_recipients"
    " WHERE message_id = ? AND domain = ? AND +lease_owner = ? AND lease_until IN (?, ?)"
    " AND state IN ('queued', 'deferred')"
)
_RELEASE = (
    "UPDATE queue_recipients SET lease_owner = NULL, lease_until = NULL, next_attempt_at = ?"
    " WHERE message_id = ? AND domain = ? AND +lease_owner = ? AND lease_until = ?"
    " AND state IN ('queued', 'deferred') AND address = ?"
)


# The due rows of one (message, domain), each with the end of the live lease some row of
# the group is under (NULL: none; a non-correlated subquery, run once per call) and with its
# message's row (NULLs: none), that message's content included when it is at most
# `max_size` bytes long (read ahead for the attempt): bound as (message_id, domain, now,
# max_size).
_SELECT_GROUP = (
    "SELECT r.id, r.address, r.attempts, r.delay_notified,"
    " (SELECT MAX(lease_until) FROM queue_recipients WHERE message_id = ?1 AND domain = ?2"
    "  AND lease_owner IS NOT NULL AND lease_until > ?3),"
    " m.id, m.queue_id, m.sender, m.received_at, typeof(m.data), m.dsn, m.requiretls,"
    " CASE WHEN m.size <= ?4 AND typeof(m.data) = 'blob' THEN m.data END"
    " FROM queue_recipients r LEFT JOIN queue_messages m ON m.id = ?1"
    " WHERE r.message_id = ?1 AND r.domain = ?2 AND r.state IN ('queued', 'deferred')"
    " AND r.held = 0 AND r.next_attempt_at <= ?3"
)  # no ORDER BY: SQLite would sort the content along (sorted by row id here instead)
# Receipts of the (message, domain) groups just leased: bound as one JSON array of
# [queue_id, domain] pairs (one statement per lease_due call, whatever the groups).
_DELETE_RECEIPTS = (
    "DELETE FROM queue_receipts WHERE (queue_id, domain) IN"
    " (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))"
)


def lease_due(
    conn: sqlite3.Connection,
    owner: str,
    limit: int,
    until: float,
    now: float,
    lifetime: float,
    *,
    max_size: int = -1,
    contents: dict[str, bytes] | None = None,
) -> list[Lease]:
    """Lease up to `limit` (message, domain) groups to `owner`, most overdue first. The
    content of each leased message of at most `max_size` bytes goes into `contents`."""
    groups: dict[tuple[Any, Any], None] = {}
    cur = conn.execute(
        "SELECT message_id, domain FROM queue_recipients"
        " WHERE state IN ('queued', 'deferred') AND held = 0"
        " AND next_attempt_at <= ? ORDER BY next_attempt_at",
        (now,),
    )
    for key in cur:  # walks the partial index; stops as soon as it has enough groups
        groups.setdefault((key[0], key[1]), None)
        if len(groups) >= limit:
            break
    cur.close()
    out = {} if contents is None else contents
    leases = (
        _lease_group(conn, m, d, owner, until, now, lifetime, max_size, out) for m, d in groups
    )
    leased = [lease for lease in leases if lease is not None]
    if leased:
        # An earlier lease of these groups is over: its receipt can no longer be asked for
        # by a retry that matters, and a new lease with the same (owner, until) (a frozen
        # test clock) must not be answered with it.
        pairs = [[lease.queue_id, lease.domain] for lease in leased]
        conn.execute(_DELETE_RECEIPTS, (json.dumps(pairs, ensure_ascii=False),))
    return leased


def _lease_group(
    conn: sqlite3.Connection,
    msg_id: Any,
    domain: Any,
    owner: str,
    until: float,
    now: float,
    lifetime: float,
    max_size: int,
    contents: dict[str, bytes],
) -> Lease | None:
    rows = conn.execute(_SELECT_GROUP, (msg_id, domain, now, max_size)).fetchall()
    if not rows:
        return None
    if len(rows) > 1:
        rows.sort(key=lambda r: r[0])  # the recipients in the order they were given
    sibling = rows[0][4]
    if sibling is not None:
        # Part of the group is in delivery under a live lease: one attempt per (message,
        # domain) at a time. The rest waits for that lease's end (not found again by
        # every poll meanwhile).
        conn.executemany(
            "UPDATE queue_recipients SET next_attempt_at = ? WHERE id = ?",
            [(sibling, r[0]) for r in rows],
        )
        return None
    msg = rows[0][6:12] if rows[0][5] is not None else None
    dsn = dsn_from_json(msg[4]) if msg is not None else None
    if msg is None or dsn is None or not _leasable_message(msg) or not isinstance(domain, str):
        set_aside(conn, (r[0] for r in rows), "message row missing or unreadable")
        return None
    good = [r for r in rows if isinstance(r[1], str) and type(r[2]) is int]
    if len(good) < len(rows):
        set_aside(conn, (r[0] for r in rows if r not in good), "recipient row unreadable")
    if not good:
        return None
    lease_sql = (
        "UPDATE queue_recipients SET lease_owner = ?, lease_until = ?, next_attempt_at = ?"
        " WHERE id = ?"
    )
    if len(good) == 1:
        conn.execute(lease_sql, (owner, until, until, good[0][0]))
    else:
        conn.executemany(lease_sql, [(owner, until, until, r[0]) for r in good])
    data = rows[0][12]
    if data is not None:
        contents[msg[0]] = bytes(data)
    received_at = float(msg[2])
    return Lease(
        queue_id=msg[0],
        domain=domain,
        sender=msg[1],
        recipients=tuple(LeasedRecipient(r[1], r[2], bool(r[3])) for r in good),
        received_at=received_at,
        expires_at=received_at + lifetime,
        until=until,
        dsn=dsn,
        owner=owner,
        requiretls=bool(msg[5]),
    )


def _leasable_message(msg: Sequence[Any] | None) -> bool:
    if msg is None:
        return False
    queue_id, sender, received_at, data_type, _, requiretls = msg
    return (
        isinstance(queue_id, str)
        and isinstance(sender, str)
        and isinstance(received_at, int | float)
        and data_type == "blob"
        and requiretls in (0, 1)
    )


def renew_lease(conn: sqlite3.Connection, lease: Lease, until: float) -> tuple[str, ...]:
    """Move the rows still under `lease` to `until` (due then, as lease_due does); returns
    their addresses (none: the lease is no longer this one). Retrying it is safe."""
    msg_id = message_id(conn, lease.queue_id)
    if msg_id is None:
        return ()
    key = (msg_id, lease.domain, lease.owner, lease.until, until)
    rows = conn.execute(_SELECT_RENEWABLE, key).fetchall()
    conn.executemany(
        "UPDATE queue_recipients SET lease_until = ?, next_attempt_at = ? WHERE id = ?",
        [(until, until, r[0]) for r in rows],
    )
    return tuple(r[1] for r in rows)


def release_lease(conn: sqlite3.Connection, lease: Lease, now: float) -> None:
    """Due again now; only rows still under this very lease (same owner and until)."""
    msg_id = message_id(conn, lease.queue_id)
    if msg_id is None:
        return
    conn.executemany(
        _RELEASE,
        [
            (now, msg_id, lease.domain, lease.owner, lease.until, r.address)
            for r in lease.recipients
        ],
    )


def record_lease(
    conn: sqlite3.Connection,
    ids: QueueIds,
    lease: Lease,
    results: Sequence[RecipientResult],
    dsn: NewMessage | None,
    *,
    now: float,
    schedule: RetrySchedule,
    rng: random.Random,
    lifetime: float,
) -> Recorded:
    """Apply outcomes to the rows still under `lease`, queue `dsn` if any was applied,
    delete the message once every recipient is final, and keep a receipt of it all.

    A message these outcomes leave with nothing to deliver is deleted with its rows
    straight away: its outcomes are not written first (nothing could ever read them)."""
    found = conn.execute(
        _SELECT_UNDER_LEASE, (lease.domain, lease.owner, lease.until, lease.queue_id)
    ).fetchall()
    held = {row[3]: row[2:5] for row in found if row[2] is not None}
    if not results or any(r.address not in held for r in results):
        # Some outcome cannot be applied: this may be a retry of a call that committed
        # (it took its rows out of the lease, or deleted them), which gets that call's
        # answer. A call whose every outcome is still under the lease cannot be one.
        earlier = _receipt(conn, lease)
        if earlier is not None:
            return earlier
    applied = [r for r in results if r.address in held]
    deleted = False
    if found:  # else deleted by an operator while the attempt ran
        msg_id, received_at, others_pending = found[0][0], found[0][1], found[0][5]
        expires_at = float(received_at) + lifetime if isinstance(received_at, int | float) else now
        # One jitter draw for the whole group: its deferred recipients fall due together
        # and are leased together again (drawn apart, one could be leased while a sibling
        # still is: two attempts of one (message, domain) at once).
        group_jitter = rng.getrandbits(64)
        if (
            applied
            and not others_pending
            and len(applied) == len(held)
            and all(r.state in FINAL_STATES for r in applied)
        ):
            # Every recipient final: the message is done. Its rows go with it (ON DELETE
            # CASCADE: every connection of the store has foreign_keys on).
            conn.execute("DELETE FROM queue_messages WHERE id = ?", (msg_id,))
            deleted = True
        else:
            for result in applied:
                _apply(conn, held[result.address], result, now, expires_at, schedule, group_jitter)
    # RFC 3464 reports outcomes: it is owed only for outcomes this call applied (the ones
    # it did not are another lease's, which will report them).
    dsn_queue_id = insert_message(conn, ids, dsn, now) if dsn is not None and applied else None
    done = {r.address for r in applied}
    lost = tuple(r.address for r in results if r.address not in done)
    recorded = Recorded(
        applied=tuple(r.address for r in applied), lost=lost, dsn_queue_id=dsn_queue_id
    )
    if not deleted:
        # A message gone for good needs no receipt: a retried call then applies nothing
        # and queues nothing (its rows are gone), it only reports them as lost. This keeps
        # the table to the messages still queued, whatever the delivery rate.
        _keep_receipt(conn, lease, recorded, now)
    return recorded


def _apply(
    conn: sqlite3.Connection,
    found: Sequence[Any],  # id, address, attempts
    result: RecipientResult,
    now: float,
    expires_at: float,
    schedule: RetrySchedule,
    group_jitter: int,
) -> None:
    """SENT/BOUNCED are final; DEFERRED counts an attempt and follows the schedule."""
    attempts = (found[2] if type(found[2]) is int else 0) + 1
    next_at: float | None = None
    if result.state is RcptState.DEFERRED:
        same = random.Random(group_jitter)  # noqa: S311 - retry jitter, not a secret
        next_at = schedule.retry_at(attempts, now, expires_at, same)
    conn.execute(
        "UPDATE queue_recipients SET state = ?, attempts = ?, next_attempt_at = ?,"
        " last_error = ?, lease_owner = NULL, lease_until = NULL,"
        " delay_notified = MAX(delay_notified, ?) WHERE id = ?",
        (result.state.value, attempts, next_at, result.error, result.delay_notified, found[0]),
    )


def _receipt(conn: sqlite3.Connection, lease: Lease) -> Recorded | None:
    row = conn.execute(
        "SELECT applied, lost, dsn_queue_id FROM queue_receipts"
        " WHERE queue_id = ? AND domain = ? AND lease_owner = ? AND lease_until = ?",
        (lease.queue_id, lease.domain, lease.owner, lease.until),
    ).fetchone()
    if row is None:
        return None
    applied, lost = _addresses(row[0]), _addresses(row[1])
    if applied is None or lost is None or not isinstance(row[2], str | None):
        return None  # unreadable: recording again is still safe (see the module docstring)
    return Recorded(applied=applied, lost=lost, dsn_queue_id=row[2])


def _addresses(text: Any) -> tuple[str, ...] | None:
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        return None
    return tuple(value)


def _keep_receipt(conn: sqlite3.Connection, lease: Lease, recorded: Recorded, now: float) -> None:
    """Keep what this call did; receipts older than RECEIPT_KEEP go meanwhile (only this
    adds receipts, so pruning here bounds the table as well as pruning on every call)."""
    conn.execute("DELETE FROM queue_receipts WHERE recorded_at < ?", (now - RECEIPT_KEEP,))
    conn.execute(
        "INSERT OR REPLACE INTO queue_receipts (queue_id, domain, lease_owner, lease_until,"
        " recorded_at, applied, lost, dsn_queue_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            lease.queue_id,
            lease.domain,
            lease.owner,
            lease.until,
            now,
            json.dumps(recorded.applied, ensure_ascii=False),
            json.dumps(recorded.lost, ensure_ascii=False),
            recorded.dsn_queue_id,
        ),
    )
