"""Bulk queue administration on a real SQLite store: selections, what each action touches,
work in delivery left alone, the operator's bounce and its report, and the journal."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailqueue.admin import AdminAction, BounceCandidate, Pick, Selection
from mailqueue.ids import QueueIds
from mailqueue.model import DsnRequest, MessageRecord, NewMessage, RcptState, RecipientResult
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


def ids(messages: list[MessageRecord]) -> set[str]:
    return {m.queue_id for m in messages}


async def test_selections_combine_domain_sender_and_state(store: SqliteStore) -> None:
    a = await put(store, "app@src.test", "u@one.test", "v@two.test")
    b = await put(store, "App@Src.test", "w@two.test")
    c = await put(store, "", "x@one.test")  # a bounce: null sender
    await defer_all(store)
    d = await put(store, "other@elsewhere.test", "y@one.test")  # still queued

    assert ids(await store.select(Selection(domain="ONE.test."))) == {a, c, d}
    assert ids(await store.select(Selection(sender="app@src.test"))) == {a, b}
    assert ids(await store.select(Selection(sender="@src.test"))) == {a, b}
    assert ids(await store.select(Selection(sender="<>"))) == {c}
    assert ids(await store.select(Selection(state=Pick.DEFERRED))) == {a, b, c}
    assert ids(await store.select(Selection(state=Pick.QUEUED))) == {d}
    assert ids(await store.select(Selection(domain="one.test", state=Pick.DEFERRED))) == {a, c}
    assert ids(await store.select(Selection(everything=True))) == {a, b, c, d}
    assert ids(await store.select(Selection(queue_ids=(b, "NOSUCHID0000")))) == {b}
    assert await store.select(Selection()) == []  # nothing asked, nothing selected

    result = await store.administer(AdminAction.HOLD, Selection(domain="two.test"), operator="op")
    assert (result.matched, result.count) == (2, 2)
    assert ids(await store.select(Selection(state=Pick.HELD))) == {a, b}
    assert ids(await store.select(Selection(state=Pick.DEFERRED))) == {c}  # held ones are not
    again = await store.administer(AdminAction.HOLD, Selection(queue_ids=(a,)), operator="op")
    assert (again.matched, again.count, again.held) == (1, 0, 1)  # already held: no change


async def test_operator_bounce_of_a_requiretls_message_reports_with_requiretls(
    store: SqliteStore, clock: Clock
) -> None:
    # RFC 8689 §5: the report returns headers only (RET=FULL disregarded) and is itself
    # a REQUIRETLS message, when an operator gives up too.
    body = b"Subject: secret plans\r\n\r\nthe body stays home\r\n"
    dsn = DsnRequest(ret="FULL")
    await store.put(NewMessage("app@src.test", ("u@one.test",), body, dsn=dsn, requiretls=True))
    await defer_all(store)
    report = operator_bounce_report(reporting_mta="relay.test", lifetime=86400.0, now=clock.now)
    bounced = await store.administer(
        AdminAction.BOUNCE, Selection(domain="one.test"), operator="op", report=report
    )
    assert bounced.dsns == 1
    (leased,) = await store.lease_due("w", 10, 60)  # only the report is left, due now
    assert (leased.sender, leased.requiretls) == ("", True)
    data = await store.read_data(leased.queue_id)
    assert b"Subject: secret plans" in data
    assert b"the body stays home" not in data


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


async def test_work_in_delivery_is_left_alone(store: SqliteStore) -> None:
    queue_id = await put(store, "app@src.test", "u@one.test", "v@two.test")
    leases = await store.lease_due("worker", 10, 600)  # both domains in delivery now
    one = next(lease for lease in leases if lease.domain == "one.test")
    await store.release(one)  # one.test waits again; two.test is still being delivered

    assert ids(await store.select(Selection(state=Pick.ACTIVE))) == {queue_id}
    result = await store.administer(
        AdminAction.BOUNCE, Selection(queue_ids=(queue_id,)), operator="op", reason="5.0.0 x"
    )
    assert (result.count, result.in_flight) == (1, 1)
    msg = await store.get_message(queue_id)
    assert msg is not None
    states = {r.address: r.state for r in msg.recipients}
    assert states == {"u@one.test": RcptState.BOUNCED, "v@two.test": RcptState.QUEUED}


async def test_no_report_for_a_null_sender_or_notify_never(store: SqliteStore) -> None:
    await put(store, "", "u@one.test")
    await put(store, "app@src.test", "v@one.test", notify="NEVER")
    asked: list[BounceCandidate] = []

    def report(candidate: BounceCandidate) -> NewMessage | None:
        asked.append(candidate)
        return operator_bounce_report(reporting_mta="r.test", lifetime=1.0, now=T0)(candidate)

    result = await store.administer(
        AdminAction.BOUNCE, Selection(everything=True), operator="op", report=report
    )
    assert (result.count, result.dsns) == (2, 0)
    assert len(asked) == 2
    assert await store.select(Selection(everything=True)) == []


async def test_each_change_is_journaled_once_in_its_transaction(
    store: SqliteStore, clock: Clock
) -> None:
    a = await put(store, "app@src.test", "u@one.test")
    await store.administer(AdminAction.HOLD, Selection(queue_ids=(a,)), operator="alice")
    await store.administer(AdminAction.HOLD, Selection(queue_ids=(a,)), operator="alice")
    await store.administer(AdminAction.DELETE, Selection(domain="none.test"), operator="bob")
    await store.administer(AdminAction.DELETE, Selection(everything=True), operator="bob")

    entries = await store.journal(await store.journal_logged())
    assert [
        (e.action, e.queue_id, e.selection, e.matched, e.count, e.operator) for e in entries
    ] == [
        ("hold", a, f"id={a}", 1, 1, "alice"),
        ("delete", None, "all", 1, 1, "bob"),
    ]  # no change, no entry
    await store.mark_journal_logged(entries[0].id)
    assert await store.journal_logged() == entries[0].id
    assert [e.id for e in await store.journal(await store.journal_logged())] == [entries[1].id]
    clock.now += 91 * 86400
    await store.mark_journal_logged(entries[1].id)
    assert await store.journal(0) == []  # logged long ago: dropped


async def test_thousands_of_messages_in_one_transaction(store: SqliteStore) -> None:
    for first in range(0, 3000, 500):  # concurrent puts: group commit
        await asyncio.gather(
            *(
                store.put(NewMessage("app@src.test", (f"u{i}@d{i % 3}.test",), b"x\r\n"))
                for i in range(first, first + 500)
            )
        )
    commits = store.commits
    result = await store.administer(AdminAction.HOLD, Selection(domain="d1.test"), operator="op")
    assert (result.matched, result.count) == (1000, 1000)
    assert store.commits == commits + 1
    deleted = await store.administer(AdminAction.DELETE, Selection(state=Pick.HELD), operator="op")
    assert deleted.count == 1000
    assert (await store.counts())["messages"] == 2000


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
