"""Bulk queue administration on a real SQLite store, beyond the contract both engines share
(test_queue_store_engines.py): the operator's bounce report in detail, and a report
prepared before a change, checked against the file."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailqueue.admin import AdminAction, Selection
from mailqueue.ids import QueueIds
from mailqueue.model import DsnRequest, NewMessage, RcptState, RecipientResult
from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite import SqliteStore
from mailqueue.sqlite_admin import apply_admin
from relay.cli.queue_bounce import last_error, operator_bounce_report

T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(tmp_path: Path, clock: Clock) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(
        tmp_path / "relay.sqlite3",
        schedule=RetrySchedule((3600.0,)),
        lifetime=86400.0,
        clock=clock,
    )
    await opened.open()
    yield opened
    await opened.close()


async def put(store: SqliteStore, sender: str, *rcpts: str, notify: str | None = None) -> str:
    dsn = DsnRequest(notify={r: (notify,) for r in rcpts}) if notify else DsnRequest()
    body = b"Subject: held back\r\nMessage-ID: <m@src.test>\r\n\r\nbody\r\n"
    return await store.put(NewMessage(sender, rcpts, body, dsn=dsn))


async def defer_all(store: SqliteStore) -> None:
    """One failed attempt for everything due: recipients become `deferred`, due in an hour."""
    for lease in await store.lease_due("w", 10_000, 60):
        results = [
            RecipientResult(r.address, RcptState.DEFERRED, "451 later") for r in lease.recipients
        ]
        await store.record(lease, results)


async def test_flush_and_bounce_touch_only_the_selected_recipients(
    store: SqliteStore, clock: Clock
) -> None:
    both = await put(store, "app@src.test", "u@one.test", "v@two.test")
    await defer_all(store)

    flushed = await store.administer(AdminAction.FLUSH, Selection(domain="two.test"), operator="op")
    assert flushed.count == 1
    (lease,) = await store.lease_due("w", 10, 60)
    assert [r.address for r in lease.recipients] == ["v@two.test"]
    await store.release(lease)

    report = operator_bounce_report(reporting_mta="relay.test", lifetime=86400.0, now=clock.now)
    bounced = await store.administer(
        AdminAction.BOUNCE,
        Selection(domain="one.test"),
        operator="op",
        reason=last_error(),
        report=report,
    )
    assert (bounced.matched, bounced.count, bounced.dsns) == (1, 1, 1)
    msg = await store.get_message(both)
    assert msg is not None  # v@two.test still waits
    assert [(r.address, r.state, r.last_error) for r in msg.recipients] == [
        ("u@one.test", RcptState.BOUNCED, "5.0.0 bounced by the operator"),
        ("v@two.test", RcptState.DEFERRED, "451 later"),
    ]
    (dsn,) = await store.select(Selection(sender="<>"))
    assert [r.address for r in dsn.recipients] == ["app@src.test"]
    data = await store.read_data(dsn.queue_id)
    assert b"Status: 5.0.0" in data
    assert b"Final-Recipient: rfc822; u@one.test" in data
    assert b"bounced by the operator" in data
    assert b"v@two.test" not in data.split(b"Content-Type: text/rfc822-headers")[0]

    last = await store.administer(
        AdminAction.BOUNCE, Selection(queue_ids=(both,)), operator="op", report=report
    )
    assert last.count == 1
    assert await store.get_message(both) is None  # nothing left to deliver: gone


async def test_a_report_prepared_before_a_change_is_built_again(
    store: SqliteStore, tmp_path: Path
) -> None:
    """Reports are built before the write transaction; one whose recipients changed in
    between (the relay delivered one, say) is not used."""
    queue_id = await put(store, "app@src.test", "u@one.test")
    await store.close()
    conn = sqlite3.connect(tmp_path / "relay.sqlite3", isolation_level=None)
    try:
        msg_id = conn.execute(
            "SELECT id FROM queue_messages WHERE queue_id = ?", (queue_id,)
        ).fetchone()[0]
        stale = NewMessage("", ("stale@old.test",), b"Subject: stale\r\n\r\n")
        report = operator_bounce_report(reporting_mta="r.test", lifetime=86400.0, now=T0)
        conn.execute("BEGIN IMMEDIATE")
        result = apply_admin(
            conn,
            QueueIds(random.Random(1)),
            AdminAction.BOUNCE,
            Selection(queue_ids=(queue_id,)),
            now=T0,
            operator="op",
            reason=last_error(),
            report=report,
            prepared={msg_id: (frozenset({-1}), stale)},  # other rows than those bounced now
        )
        conn.execute("COMMIT")
        assert (result.count, result.dsns) == (1, 1)
        (rcpt,) = conn.execute("SELECT address FROM queue_recipients").fetchall()
        assert rcpt == ("app@src.test",)  # the report built now, not the stale one
    finally:
        conn.close()
