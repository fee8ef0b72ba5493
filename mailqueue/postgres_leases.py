"""SQL of the lease lifecycle in the PostgreSQL queue store: lease, renew, release, record,
and returning a dead owner's leases.

The semantics are the SQLite store's (sqlite_leases.py, mailqueue/store.py): a lease is
the rows of one (message, domain) that carry its `lease_owner` and `lease_until`; renew,
release and record touch only rows that still carry both; `record` keeps a receipt, the
`Recorded` it returned, so that a retried call gets the same answer (until the group is
leased again or RECEIPT_KEEP has passed; none when it deleted the message).

Across nodes: leasing locks each candidate message row with `FOR NO KEY UPDATE SKIP
LOCKED` (a message another node is leasing or recording right now is skipped, never
waited for), and only then reads which of its recipients are due, in a statement of its
own: in READ COMMITTED that statement sees every lease committed before the lock was
granted, so a (message, domain) is never leased twice while a lease is live. That holds
for the group, not only for its rows: recipients of one group deferred together become
due at slightly different times (the schedule's jitter), and one that comes due while a
sibling is in delivery waits for that lease to end instead of starting a second attempt
to the same domain beside it. Renew,
release and record take the same message lock first (waiting for it), so every change to
one message's leases is serialised and none of them can deadlock with another.

Every function runs inside the caller's transaction and may run again after a rollback.
Knows nothing of TLS or SMTP.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from mailqueue.ids import QueueIds
from mailqueue.model import (
    FINAL_STATES,
    Lease,
    LeasedRecipient,
    NewMessage,
    RcptState,
    RecipientResult,
    Recorded,
)
from mailqueue.postgres_ops import (
    Conn,
    delete_rows,
    execute,
    fetchall,
    fetchone,
    insert_one,
    lock_message,
    set_aside,
)
from mailqueue.rows import dsn_from_json
from mailqueue.schedule import RetrySchedule

# The messages with due work, most overdue first, locked; those locked by another node
# skipped. The inner scan walks queue_recipients_due and stops after `scan` rows.
LOCK_DUE_MESSAGES = (
    "SELECT m.id, m.queue_id, m.sender, m.received_at, m.dsn, m.requiretls"
    " FROM (SELECT message_id, min(next_attempt_at) AS due FROM ("
    "  SELECT message_id, next_attempt_at FROM queue_recipients"
    "   WHERE state IN ('queued', 'deferred') AND held = 0 AND next_attempt_at <= %s"
    "   ORDER BY next_attempt_at LIMIT %s) AS d"
    "  GROUP BY message_id) AS c"
    " JOIN queue_messages AS m ON m.id = c.message_id"
    " ORDER BY c.due, m.id LIMIT %s FOR NO KEY UPDATE OF m SKIP LOCKED"
)
# All their waiting rows, read after the locks were granted (a statement of its own: see
# above): the due ones, and those under a live lease, which keeps their group from being
# leased again meanwhile, whatever its other rows' times.
GROUP_ROWS = (
    "SELECT id, message_id, domain, address, attempts, delay_notified, next_attempt_at,"
    " lease_until, held FROM queue_recipients WHERE message_id = ANY(%s::int8[])"
    " AND state IN ('queued', 'deferred') ORDER BY id"
)
# Rows still under a lease: bound as (message_id, domain, lease_owner, lease_until, ...).
_SELECT_UNDER_LEASE = (
    "SELECT id, address, attempts FROM queue_recipients"
    " WHERE message_id = %s AND domain = %s AND lease_owner = %s AND lease_until = %s"
    " AND state IN ('queued', 'deferred')"
)
# A renewal moves the rows still under the lease, or already moved by this same call whose
# reply was lost (lease_until is either end): a retried renew answers the same.
_RENEW = (
    "UPDATE queue_recipients SET lease_until = %s, next_attempt_at = %s"
    " WHERE message_id = %s AND domain = %s AND lease_owner = %s"
    " AND lease_until = ANY(%s::float8[]) AND state IN ('queued', 'deferred')"
    " RETURNING id, address"
)
_RELEASE = (
    "UPDATE queue_recipients SET lease_owner = NULL, lease_until = NULL, next_attempt_at = %s"
    " WHERE message_id = %s AND domain = %s AND lease_owner = %s AND lease_until = %s"
    " AND state IN ('queued', 'deferred') AND address = ANY(%s::text[])"
)


def _scan_rows(limit: int) -> int:
    """Due rows to look at for `limit` groups: room for groups of several recipients and
    for messages another node holds locked at that moment."""
    return limit * 4 + 16


async def lease_due(
    conn: Conn, owner: str, limit: int, until: float, now: float, lifetime: float
) -> list[Lease]:
    """Lease up to `limit` (message, domain) groups to `owner`, most overdue first."""
    messages = {
        row[0]: row
        for row in await fetchall(conn, LOCK_DUE_MESSAGES, (now, _scan_rows(limit), limit))
    }
    if not messages:
        return []
    rows = await fetchall(conn, GROUP_ROWS, (list(messages),))
    groups, waiting = _due_groups(rows, now)
    if waiting:
        # Due, but a sibling of its group is in delivery: it waits for that lease to end
        # (not due until then, so nobody polls for it meanwhile).
        await conn.execute(
            "UPDATE queue_recipients AS r SET next_attempt_at = v.at FROM unnest("
            "%s::int8[], %s::float8[]) AS v(id, at) WHERE r.id = v.id",
            ([i for i, _ in waiting], [at for _, at in waiting]),
        )
    chosen = sorted(groups, key=lambda k: (min(r[6] for r in groups[k]), k[0]))[:limit]
    leases: list[Lease] = []
    leased_ids: list[int] = []
    unreadable: list[int] = []
    for msg_id, domain in chosen:
        rows = groups[(msg_id, domain)]
        msg = messages[msg_id]
        dsn = dsn_from_json(msg[4])
        if dsn is None:
            unreadable += [r[0] for r in rows]
            continue
        leased_ids += [r[0] for r in rows]
        leases.append(
            Lease(
                queue_id=msg[1],
                domain=domain,
                sender=msg[2],
                recipients=tuple(LeasedRecipient(r[3], r[4], r[5]) for r in rows),
                received_at=float(msg[3]),
                expires_at=float(msg[3]) + lifetime,
                until=until,
                dsn=dsn,
                owner=owner,
                requiretls=msg[5],
            )
        )
    await set_aside(conn, unreadable, "message row unreadable")
    if leased_ids:
        await conn.execute(
            "UPDATE queue_recipients SET lease_owner = %s, lease_until = %s,"
            " next_attempt_at = %s WHERE id = ANY(%s::int8[])",
            (owner, until, until, leased_ids),
        )
        # An earlier lease of these groups is over: its receipt can no longer be asked for
        # by a retry that matters, and a new lease with the same (owner, until) (a frozen
        # test clock) must not be answered with it.
        await conn.execute(
            "DELETE FROM queue_receipts WHERE (queue_id, domain) IN"
            " (SELECT * FROM unnest(%s::text[], %s::text[]))",
            ([ls.queue_id for ls in leases], [ls.domain for ls in leases]),
        )
    return leases


Group = tuple[int, str]  # (message row id, domain)


def _due_groups(
    rows: Sequence[tuple[Any, ...]], now: float
) -> tuple[dict[Group, list[tuple[Any, ...]]], list[tuple[int, float]]]:
    """The due rows (GROUP_ROWS) of each group that no live lease holds, and the due rows
    of groups that one does, each with the end of that lease."""
    live: dict[Group, float] = {}
    due: dict[Group, list[tuple[Any, ...]]] = {}
    for row in rows:
        key = (row[1], row[2])
        next_at, lease_until, held = row[6], row[7], row[8]
        if lease_until is not None and lease_until > now:
            live[key] = max(live.get(key, lease_until), lease_until)
        elif held == 0 and next_at is not None and next_at <= now:
            due.setdefault(key, []).append(row)
    waiting = [(r[0], live[key]) for key, group in due.items() if key in live for r in group]
    return {key: group for key, group in due.items() if key not in live}, waiting


async def renew_lease(conn: Conn, lease: Lease, until: float) -> tuple[str, ...]:
    """Move the rows still under `lease` to `until` (due then, as lease_due does); returns
    their addresses (none: the lease is no longer this one). Retrying it is safe: rows
    already moved there by this same call count as still under it."""
    msg = await lock_message(conn, lease.queue_id)
    if msg is None:
        return ()
    rows = await fetchall(
        conn,
        _RENEW,
        (until, until, msg[0], lease.domain, lease.owner, [lease.until, until]),
    )
    return tuple(address for _, address in sorted(rows))


async def release_lease(conn: Conn, lease: Lease, now: float) -> None:
    """Due again now; only rows still under this very lease (same owner and until)."""
    msg = await lock_message(conn, lease.queue_id)
    if msg is None:
        return
    await conn.execute(
        _RELEASE,
        (
            now,
            msg[0],
            lease.domain,
            lease.owner,
            lease.until,
            [r.address for r in lease.recipients],
        ),
    )


async def release_owner(conn: Conn, owner: str, now: float) -> int:
    """Every lease of `owner` (known to be dead) due again now; how many recipients."""
    return await execute(
        conn,
        "UPDATE queue_recipients SET lease_owner = NULL, lease_until = NULL,"
        " next_attempt_at = %s WHERE lease_owner = %s AND state IN ('queued', 'deferred')",
        (now, owner),
    )


async def record_lease(
    conn: Conn,
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
    delete the message once every recipient is final, and keep a receipt of it all."""
    msg = await lock_message(conn, lease.queue_id)  # else deleted meanwhile
    earlier = await _receipt(conn, lease)
    if earlier is not None:
        return earlier  # this lease was recorded already (a retried call)
    applied: list[str] = []
    deleted = False
    if msg is not None:
        msg_id, received_at = msg
        held = {
            r[1]: r
            for r in await fetchall(
                conn,
                _SELECT_UNDER_LEASE,
                (msg_id, lease.domain, lease.owner, lease.until),
            )
        }
        updates: list[tuple[Any, ...]] = []
        for result in results:
            found = held.get(result.address)
            if found is None:
                continue
            attempts = found[2] + 1
            next_at = None
            if result.state is RcptState.DEFERRED:
                next_at = schedule.retry_at(attempts, now, float(received_at) + lifetime, rng)
            state, error, notified = result.state.value, result.error, result.delay_notified
            updates.append((found[0], state, attempts, next_at, error, notified))
            applied.append(result.address)
        if updates:
            await _apply(conn, updates)
            deleted = await _delete_if_final(conn, msg_id)
    # RFC 3464 reports outcomes: it is owed only for outcomes this call applied (the ones
    # it did not are another lease's, which will report them).
    dsn_queue_id = await insert_one(conn, ids, dsn, now) if dsn is not None and applied else None
    done = set(applied)
    lost = tuple(r.address for r in results if r.address not in done)
    recorded = Recorded(applied=tuple(applied), lost=lost, dsn_queue_id=dsn_queue_id)
    if not deleted:
        # A message gone for good needs no receipt (a retried call then applies nothing
        # and queues nothing, its rows being gone): the table stays the size of the queue.
        await _keep_receipt(conn, lease, recorded, now)
    return recorded


async def _apply(conn: Conn, updates: Sequence[tuple[Any, ...]]) -> None:
    """SENT/BOUNCED are final; DEFERRED has counted an attempt and follows the schedule."""
    columns = list(zip(*updates, strict=True))
    await conn.execute(
        "UPDATE queue_recipients AS r SET state = v.state, attempts = v.attempts,"
        " next_attempt_at = v.next_at, last_error = v.error, lease_owner = NULL,"
        " lease_until = NULL, delay_notified = r.delay_notified OR v.notified"
        " FROM unnest(%s::int8[], %s::text[], %s::int4[], %s::float8[], %s::text[],"
        " %s::bool[]) AS v(id, state, attempts, next_at, error, notified) WHERE r.id = v.id",
        tuple(list(c) for c in columns),
    )


async def _delete_if_final(conn: Conn, msg_id: int) -> bool:
    """Delete the message when every recipient is final; True when it was deleted."""
    final = [s.value for s in FINAL_STATES]
    pending = await fetchone(
        conn,
        "SELECT 1 FROM queue_recipients WHERE message_id = %s"
        " AND NOT (state = ANY(%s::text[])) LIMIT 1",
        (msg_id, final),
    )
    if pending is None:
        await delete_rows(conn, [msg_id])
        return True
    return False


async def _receipt(conn: Conn, lease: Lease) -> Recorded | None:
    row = await fetchone(
        conn,
        "SELECT applied, lost, dsn_queue_id FROM queue_receipts"
        " WHERE queue_id = %s AND domain = %s AND lease_owner = %s AND lease_until = %s",
        (lease.queue_id, lease.domain, lease.owner, lease.until),
    )
    if row is None:
        return None
    return Recorded(applied=tuple(row[0]), lost=tuple(row[1]), dsn_queue_id=row[2])


async def _keep_receipt(conn: Conn, lease: Lease, recorded: Recorded, now: float) -> None:
    await conn.execute(
        "INSERT INTO queue_receipts (queue_id, domain, lease_owner, lease_until,"
        " recorded_at, applied, lost, dsn_queue_id)"
        " VALUES (%s, %s, %s, %s, %s, %s::text[], %s::text[], %s)"
        " ON CONFLICT (queue_id, domain, lease_owner, lease_until) DO UPDATE SET"
        " recorded_at = excluded.recorded_at, applied = excluded.applied,"
        " lost = excluded.lost, dsn_queue_id = excluded.dsn_queue_id",
        (
            lease.queue_id,
            lease.domain,
            lease.owner,
            lease.until,
            now,
            list(recorded.applied),
            list(recorded.lost),
            recorded.dsn_queue_id,
        ),
    )
