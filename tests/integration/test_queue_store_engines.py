"""The QueueStore contract on both engines (the embedded SQLite file, the shared PostgreSQL
database): put and lease, who may record, renew and release, one commit and safe retries,
admin selections and changes, the journal. Only the public interface is used, so every
test holds of both; what each engine does underneath has its own tests
(test_sqlite_*.py, test_postgres_queue.py)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from mailqueue import new_queue_id
from mailqueue.admin import AdminAction, BounceCandidate, Pick, Selection
from mailqueue.model import (
    DsnRequest,
    Lease,
    MessageRecord,
    NewMessage,
    RcptState,
    RecipientResult,
    Recorded,
)
from mailqueue.schedule import RetrySchedule
from mailqueue.store import MessageNotFound, QueueStore, StoreUnavailable
from relay.cli.queue_bounce import last_error, operator_bounce_report
from tests.support.queue_engines import ENGINES, AnyOpener, AnyStore, engine_opener, location
from tests.support.queue_store import T0, Clock

SCHEDULE = RetrySchedule((300.0, 600.0, 1200.0))
LIFETIME = 86400.0
SENDER = "app@src.test"
SENT = RecipientResult("a@one.test", RcptState.SENT, "250 2.0.0 ok")
BOUNCED = RecipientResult("a@one.test", RcptState.BOUNCED, "550 5.1.1 no such user")
DEFERRED = RecipientResult("a@one.test", RcptState.DEFERRED, "451 4.3.0 later")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=ENGINES)
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    return location(request, tmp_path)


@pytest.fixture
async def open_store(where: Path | str, clock: Clock) -> AsyncIterator[AnyOpener]:
    async with engine_opener(where, clock, schedule=SCHEDULE, lifetime=LIFETIME) as opener:
        yield opener


@pytest.fixture
async def store(open_store: AnyOpener) -> AnyStore:
    return await open_store()


def message(*rcpts: str, data: bytes = b"Subject: t\r\n\r\nhello\r\n") -> NewMessage:
    return NewMessage(sender=SENDER, recipients=rcpts, data=data, client="127.0.0.1")


def report(size: int = 200) -> NewMessage:
    """A DSN as the scheduler hands it over: null reverse-path, to the original sender."""
    return NewMessage(sender="", recipients=(SENDER,), data=b"Subject: dsn\r\n\r\n" + b"r" * size)


def keys(leases: list[Lease]) -> list[tuple[str, str, str]]:
    return [(ls.queue_id, ls.domain, r.address) for ls in leases for r in ls.recipients]


async def states(store: AnyStore, queue_id: str) -> list[tuple[str, str, int]]:
    """(address, state, attempts) of every recipient of the message, in order."""
    found = await store.get_message(queue_id)
    assert found is not None
    return [(r.address, r.state.value, r.attempts) for r in found.recipients]


async def dsns(store: AnyStore) -> list[MessageRecord]:
    return await store.select(Selection(sender="<>"))


# --- put and lease --------------------------------------------------------------------


async def test_is_a_queue_store(store: AnyStore) -> None:
    typed: QueueStore = store  # mypy checks the Protocol
    assert await typed.counts() == {
        "queued": 0, "deferred": 0, "sent": 0, "bounced": 0, "held": 0, "set_aside": 0,
        "messages": 0,
    }  # fmt: skip


async def test_put_then_lease_groups_by_message_and_domain(store: AnyStore) -> None:
    msg = message("a@one.test", "b@One.TEST", "c@two.test", "a@one.test")
    qid = await store.put(msg)
    assert len(qid) == 12
    assert await store.read_data(qid) == msg.data
    assert await store.next_due_at() == T0
    leases = await store.lease_due("w1", limit=10, lease_seconds=60)
    by_domain = {ls.domain: ls for ls in leases}
    assert set(by_domain) == {"one.test", "two.test"}
    one = by_domain["one.test"]
    assert [r.address for r in one.recipients] == ["a@one.test", "b@One.TEST"]
    assert (one.queue_id, one.sender, one.owner) == (qid, SENDER, "w1")
    assert (one.received_at, one.expires_at, one.until) == (T0, T0 + LIFETIME, T0 + 60)
    assert all(r.attempts == 0 for r in one.recipients)
    assert await store.lease_due("w2", limit=10, lease_seconds=60) == []
    assert await store.next_due_at() == T0 + 60


async def test_requiretls_and_dsn_parameters_survive_reopening(
    open_store: AnyOpener, clock: Clock
) -> None:
    dsn = DsnRequest(
        ret="HDRS",
        envid="env-1 ü",
        notify={"a@one.test": ("SUCCESS", "DELAY"), "b@one.test": ("NEVER",)},
        orcpt={"a@one.test": "rfc822;A@one.test"},
    )
    store = await open_store()
    flagged = await store.put(
        replace(message("a@one.test", "b@one.test"), requiretls=True, dsn=dsn)
    )
    plain = await store.put(message("c@two.test"))
    await store.close()
    store = await open_store()  # from the database, not from memory
    leases = {ls.queue_id: ls for ls in await store.lease_due("w", 10, 60)}
    assert (leases[flagged].requiretls, leases[flagged].dsn) == (True, dsn)
    assert (leases[plain].requiretls, leases[plain].dsn) == (False, DsnRequest())
    await store.record(
        leases[flagged],
        [
            RecipientResult("a@one.test", RcptState.DEFERRED, "451 later", delay_notified=True),
            RecipientResult("b@one.test", RcptState.DEFERRED, "451 later"),
        ],
    )
    clock.now += 10_000
    (again,) = [ls for ls in await store.lease_due("w", 10, 60) if ls.queue_id == flagged]
    flags = {r.address: (r.attempts, r.delay_notified) for r in again.recipients}
    assert flags == {"a@one.test": (1, True), "b@one.test": (1, False)}
    # The flag stays set: a later result without it does not clear it.
    await store.record(again, [RecipientResult("a@one.test", RcptState.DEFERRED, "451 again")])
    clock.now += 10_000
    (third,) = [ls for ls in await store.lease_due("w", 10, 60) if ls.queue_id == flagged]
    assert {r.address: r.delay_notified for r in third.recipients}["a@one.test"] is True


async def test_queue_ids_are_unique_and_sortable(store: AnyStore, clock: Clock) -> None:
    ids = []
    for i in range(30):
        clock.now = T0 + i * 0.0004  # several per millisecond, and across milliseconds
        ids.append(await store.put(message("a@one.test")))
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


async def test_limit_counts_leases(store: AnyStore) -> None:
    for _ in range(5):
        await store.put(message("a@one.test", "b@two.test"))
    first = await store.lease_due("w", limit=3, lease_seconds=60)
    assert len(first) == 3
    rest = await store.lease_due("w", limit=100, lease_seconds=60)
    assert len(rest) == 7
    assert not set(keys(first)) & set(keys(rest))


async def test_record_sent_and_bounced_deletes_message(store: AnyStore) -> None:
    qid = await store.put(message("a@one.test", "b@one.test"))
    (lease,) = await store.lease_due("w", 10, 60)
    recorded = await store.record(lease, [SENT, replace(BOUNCED, address="b@one.test")])
    assert recorded == Recorded(applied=("a@one.test", "b@one.test"), lost=(), dsn_queue_id=None)
    assert await store.get_message(qid) is None
    with pytest.raises(MessageNotFound):
        await store.read_data(qid)
    assert (await store.counts())["messages"] == 0


async def test_record_partial_follows_the_schedule(store: AnyStore, clock: Clock) -> None:
    qid = await store.put(message("a@one.test", "b@one.test"))
    (lease,) = await store.lease_due("w", 10, 60)
    clock.now += 5
    await store.record(lease, [SENT, replace(DEFERRED, address="b@one.test")])
    record = await store.get_message(qid)
    assert record is not None
    a, b = record.recipients
    assert (a.state, a.attempts, a.next_attempt_at) == (RcptState.SENT, 1, None)
    assert (b.state, b.attempts, b.last_error) == (RcptState.DEFERRED, 1, "451 4.3.0 later")
    assert b.next_attempt_at is not None
    assert 300 * 0.9 <= b.next_attempt_at - clock.now <= 300 * 1.1
    assert await store.lease_due("w", 10, 60) == []
    clock.now = b.next_attempt_at
    (again,) = await store.lease_due("w", 10, 60)
    assert [(r.address, r.attempts) for r in again.recipients] == [("b@one.test", 1)]


async def test_deferral_never_waits_past_the_lifetime(open_store: AnyOpener) -> None:
    store = await open_store(lifetime=100.0)
    qid = await store.put(message("a@one.test"))
    (lease,) = await store.lease_due("w", 10, 60)
    await store.record(lease, [DEFERRED])
    record = await store.get_message(qid)
    assert record is not None
    assert record.recipients[0].next_attempt_at == T0 + 100.0


async def test_flush_hold_release_delete(store: AnyStore) -> None:
    qid = await store.put(message("a@one.test"))
    other = await store.put(message("b@two.test"))
    for lease in await store.lease_due("w", 10, 60):
        await store.record(lease, [replace(DEFERRED, address=lease.recipients[0].address)])
    assert await store.lease_due("w", 10, 60) == []
    assert await store.flush(qid) == 1
    (lease,) = await store.lease_due("w", 10, 60)
    assert lease.queue_id == qid
    await store.release(lease)
    assert await store.hold(qid) is True
    assert await store.flush() == 1  # only `other`: held messages stay put
    assert [ls.queue_id for ls in await store.lease_due("w", 10, 60)] == [other]
    assert (await store.counts())["held"] == 1
    assert await store.release_hold(qid) is True
    (leased,) = await store.lease_due("w", 10, 60)
    assert leased.queue_id == qid
    assert await store.delete(qid) is True
    assert await store.delete(qid) is False
    assert await store.hold(qid) is False
    assert await store.release_hold(qid) is False
    recorded = await store.record(leased, [SENT])
    assert recorded == Recorded(applied=(), lost=("a@one.test",))
    assert [m.queue_id for m in await store.list_messages()] == [other]


async def test_list_messages_and_counts(store: AnyStore) -> None:
    ids = [await store.put(message(f"u{i}@one.test", "v@two.test")) for i in range(5)]
    listed = await store.list_messages()
    assert [m.queue_id for m in listed] == ids
    assert all(len(m.recipients) == 2 and m.size > 0 for m in listed)
    assert [m.queue_id for m in await store.list_messages(limit=2)] == ids[:2]
    counts = await store.counts()
    assert (counts["queued"], counts["messages"]) == (10, 5)


async def test_group_commit_batches_concurrent_puts(store: AnyStore) -> None:
    before = store.commits
    ids = await asyncio.gather(*(store.put(message(f"u{i}@one.test")) for i in range(50)))
    assert len(set(ids)) == 50
    assert store.commits - before <= 10  # one commit each would be 50
    assert (await store.counts())["messages"] == 50


async def test_submitter_chosen_queue_id_is_used_and_never_reused(store: AnyStore) -> None:
    chosen = new_queue_id()
    msg = NewMessage("s@src.test", ("a@one.test",), b"hi\r\n", queue_id=chosen)
    assert await store.put(msg) == chosen
    with pytest.raises(StoreUnavailable):
        await store.put(msg)  # a clash stores nothing
    assert [m.queue_id for m in await store.list_messages()] == [chosen]


async def test_large_message_is_read_back_whole(store: AnyStore) -> None:
    data = bytes(range(256)) * (5 * 4096 + 7)  # ~5 MiB
    qid = await store.put(message("a@one.test", data=data))
    assert await store.read_data(qid) == data
    found = await store.get_message(qid)
    assert found is not None
    assert found.size == len(data)


async def test_closed_store_is_unavailable(open_store: AnyOpener) -> None:
    store = await open_store()
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.put(message("a@one.test"))
    with pytest.raises(StoreUnavailable):
        await store.counts()


async def test_invalid_envelopes_are_refused(store: AnyStore) -> None:
    with pytest.raises(ValueError, match="recipient"):
        await store.put(message())
    with pytest.raises(ValueError, match="domain"):
        await store.put(message("postmaster"))


# --- who may record, renew, release -----------------------------------------------------


async def test_a_taken_over_lease_records_nothing_and_the_new_owner_does(
    store: AnyStore, clock: Clock
) -> None:
    qid = await store.put(message("a@one.test"))
    (old,) = await store.lease_due("node-a", 10, 60)
    clock.now += 60  # node-a's attempt outlived its lease
    (new,) = await store.lease_due("node-b", 10, 60)
    assert (new.owner, new.queue_id, new.domain) == ("node-b", old.queue_id, old.domain)
    late = await store.record(old, [SENT], report())
    assert late == Recorded(applied=(), lost=("a@one.test",), dsn_queue_id=None)
    assert await states(store, qid) == [("a@one.test", "queued", 0)]
    assert await dsns(store) == []  # the report of unapplied outcomes is not queued
    assert await store.renew(old, clock.now + 600) is None
    await store.release(old)
    assert await store.lease_due("node-c", 10, 60) == []
    assert await store.record(new, [DEFERRED]) == Recorded(applied=("a@one.test",), lost=())
    assert await states(store, qid) == [("a@one.test", "deferred", 1)]


async def test_a_late_record_of_a_lease_nobody_took_over_applies(
    store: AnyStore, clock: Clock
) -> None:
    qid = await store.put(message("a@one.test", "b@one.test"))
    (lease,) = await store.lease_due("node-a", 10, 60)
    clock.now += 3600
    recorded = await store.record(lease, [SENT, replace(SENT, address="b@one.test")], report())
    assert (recorded.applied, recorded.lost) == (("a@one.test", "b@one.test"), ())
    assert recorded.dsn_queue_id is not None
    assert await store.get_message(qid) is None
    assert [m.queue_id for m in await store.list_messages()] == [recorded.dsn_queue_id]


async def test_a_lease_with_another_owner_or_until_names_other_rows(store: AnyStore) -> None:
    qid = await store.put(message("a@one.test"))
    (lease,) = await store.lease_due("node-a", 10, 60)
    for impostor in (replace(lease, owner="node-b"), replace(lease, until=lease.until + 1)):
        assert await store.record(impostor, [SENT]) == Recorded((), ("a@one.test",))
        assert await store.renew(impostor, lease.until + 60) is None
        await store.release(impostor)
    assert await states(store, qid) == [("a@one.test", "queued", 0)]
    assert await store.lease_due("node-b", 10, 60) == []


async def test_one_lease_does_not_record_its_sibling_domain(store: AnyStore) -> None:
    qid = await store.put(message("a@one.test", "b@two.test"))
    one, two = sorted(await store.lease_due("node-a", 10, 60), key=lambda ls: ls.domain)
    assert (one.owner, one.until) == (two.owner, two.until)
    stray = RecipientResult("b@two.test", RcptState.SENT)
    assert await store.record(one, [SENT, stray]) == Recorded(("a@one.test",), ("b@two.test",))
    assert await states(store, qid) == [("a@one.test", "sent", 1), ("b@two.test", "queued", 0)]
    assert (await store.record(two, [stray])).applied == ("b@two.test",)


async def test_lease_due_needs_an_owner(store: AnyStore) -> None:
    with pytest.raises(ValueError, match="owner"):
        await store.lease_due("", 10, 60)


async def test_invalid_calls_store_nothing(store: AnyStore) -> None:
    qid = await store.put(message("a@one.test"))
    (lease,) = await store.lease_due("w", 10, 60)
    with pytest.raises(ValueError, match="one result per address"):
        await store.record(lease, [SENT, DEFERRED])
    with pytest.raises(ValueError, match="recipient"):
        await store.record(lease, [SENT], replace(report(), recipients=()))
    with pytest.raises(ValueError, match="SENT, BOUNCED or DEFERRED"):
        await store.record(lease, [replace(SENT, state=RcptState.QUEUED)])
    assert await states(store, qid) == [("a@one.test", "queued", 0)]
    assert (await store.record(lease, [SENT])).applied == ("a@one.test",)


async def test_renew_extends_a_lease_still_held(store: AnyStore, clock: Clock) -> None:
    await store.put(message("a@one.test", "b@one.test"))
    (lease,) = await store.lease_due("node-a", 10, 60)
    clock.now += 50
    renewed = await store.renew(lease, clock.now + 60)
    assert renewed == replace(lease, until=T0 + 110)
    assert await store.renew(lease, clock.now + 60) == renewed  # a retry answers the same
    assert await store.next_due_at() == T0 + 110
    clock.now = T0 + 100
    assert await store.lease_due("node-b", 10, 60) == []
    assert await store.record(lease, [SENT]) == Recorded((), ("a@one.test",))
    assert await store.renew(lease, clock.now + 60) is None
    recorded = await store.record(renewed, [SENT, replace(DEFERRED, address="b@one.test")])
    assert recorded.applied == ("a@one.test", "b@one.test")


async def test_renew_fails_for_a_stolen_lease(store: AnyStore, clock: Clock) -> None:
    await store.put(message("a@one.test"))
    (lease,) = await store.lease_due("node-a", 10, 60)
    clock.now += 60
    (thief,) = await store.lease_due("node-b", 10, 60)
    assert await store.renew(lease, clock.now + 600) is None
    assert await store.next_due_at() == thief.until
    assert await store.renew(thief, clock.now + 600) is not None


async def test_release_gives_back_only_our_own_lease(store: AnyStore) -> None:
    await store.put(message("a@one.test"))
    (lease,) = await store.lease_due("node-a", 10, 60)
    await store.release(replace(lease, owner="node-b"))
    assert await store.lease_due("node-b", 10, 60) == []
    await store.release(lease)
    (again,) = await store.lease_due("node-b", 10, 60)
    assert again.recipients[0].attempts == 0


# --- one commit, safe to retry ----------------------------------------------------------


async def test_a_dsn_that_cannot_be_inserted_stores_no_result(store: AnyStore) -> None:
    other = await store.put(message("x@two.test"))
    qid = await store.put(message("a@one.test"))
    lease = next(ls for ls in await store.lease_due("w", 10, 60) if ls.domain == "one.test")
    clashing = replace(report(), queue_id=other)  # a real uniqueness constraint fails
    with pytest.raises(StoreUnavailable):
        await store.record(lease, [BOUNCED], clashing)
    assert await states(store, qid) == [("a@one.test", "queued", 0)]
    assert await dsns(store) == []
    recorded = await store.record(lease, [BOUNCED], report())  # store-chosen id: no clash
    assert recorded.applied == ("a@one.test",)
    assert recorded.dsn_queue_id not in (None, other)


async def test_retrying_a_committed_record_changes_nothing(store: AnyStore, clock: Clock) -> None:
    qid = await store.put(message("a@one.test", "b@one.test"))
    (lease,) = await store.lease_due("w", 10, 60)
    results = [replace(DEFERRED, delay_notified=True), replace(SENT, address="b@one.test")]
    # The caller stops waiting (its reply is lost) while the commit goes ahead.
    task = asyncio.create_task(store.record(lease, results, report()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async with asyncio.timeout(30):  # the record commits although its caller left
        while (await states(store, qid))[1] != ("b@one.test", "sent", 1):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    clock.now += 5
    first = await store.record(lease, results, report())  # the retry: the same call
    assert first.applied == ("a@one.test", "b@one.test")
    assert first.dsn_queue_id is not None
    assert await store.record(lease, results, report()) == first
    assert len(await dsns(store)) == 1
    assert await states(store, qid) == [("a@one.test", "deferred", 1), ("b@one.test", "sent", 1)]


async def test_a_record_that_finishes_the_message_keeps_no_receipt(store: AnyStore) -> None:
    await store.put(message("a@one.test"))
    (lease,) = await store.lease_due("w", 10, 60)
    assert (await store.record(lease, [SENT], report())).applied == ("a@one.test",)
    again = await store.record(lease, [SENT], report())
    assert again == Recorded(applied=(), lost=("a@one.test",))
    assert len(await dsns(store)) == 1


async def test_a_new_lease_of_the_group_is_recorded_afresh(store: AnyStore) -> None:
    qid = await store.put(message("a@one.test"))
    (first,) = await store.lease_due("w", 10, 60)
    await store.record(first, [DEFERRED])
    assert await store.flush(qid) == 1
    (second,) = await store.lease_due("w", 10, 60)
    assert (second.owner, second.until) == (first.owner, first.until)
    assert (await store.record(second, [SENT])).applied == ("a@one.test",)
    assert await store.get_message(qid) is None


# --- two stores on one queue -------------------------------------------------------------


async def test_two_stores_never_hand_out_a_live_lease(open_store: AnyOpener, clock: Clock) -> None:
    node_a = await open_store()
    node_b = await open_store()  # a second opener: another process, or another node
    for i in range(30):
        await node_a.put(message(f"u{i}@one.test", f"v{i}@two.test", "w@three.test"))
    rng = random.Random(7)
    live: dict[tuple[str, str], Lease] = {}
    superseded: list[Lease] = []
    for _ in range(40):
        calls = [(s, o) for s, o in ((node_a, "a"), (node_b, "b")) for _ in range(3)]
        batches = await asyncio.gather(*(s.lease_due(o, 4, 60) for s, o in calls))
        for lease in (ls for batch in batches for ls in batch):
            key = (lease.queue_id, lease.domain)
            held = live.get(key)
            assert held is None or held.until <= clock.now, f"{key} handed out twice"
            if held is not None:
                superseded.append(held)
            live[key] = lease
        for key, lease in list(live.items()):
            if rng.random() < 0.3:
                state = rng.choice([RcptState.SENT, RcptState.DEFERRED])
                store = node_a if lease.owner == "a" else node_b
                results = [RecipientResult(r.address, state) for r in lease.recipients]
                assert (await store.record(lease, results)).lost == ()
                del live[key]
        clock.now += 25  # some leases run out and are taken over
    assert superseded, "no lease was taken over: the test proves nothing"
    for lease in superseded:
        results = [RecipientResult(r.address, RcptState.SENT) for r in lease.recipients]
        assert (await node_b.record(lease, results)).applied == ()


# --- administration ---------------------------------------------------------------------


async def admin_put(store: AnyStore, sender: str, *rcpts: str, notify: str | None = None) -> str:
    dsn = DsnRequest(notify={r: (notify,) for r in rcpts}) if notify else DsnRequest()
    body = b"Subject: held back\r\nMessage-ID: <m@src.test>\r\n\r\nbody\r\n"
    return await store.put(NewMessage(sender, rcpts, body, dsn=dsn))


async def defer_all(store: AnyStore) -> None:
    for lease in await store.lease_due("w", 10_000, 60):
        results = [
            RecipientResult(r.address, RcptState.DEFERRED, "451 later") for r in lease.recipients
        ]
        await store.record(lease, results)


def ids(messages: list[MessageRecord]) -> set[str]:
    return {m.queue_id for m in messages}


async def test_selections_combine_domain_sender_and_state(store: AnyStore) -> None:
    a = await admin_put(store, "app@src.test", "u@one.test", "v@two.test")
    b = await admin_put(store, "App@Src.test", "w@two.test")
    c = await admin_put(store, "", "x@one.test")
    await defer_all(store)
    d = await admin_put(store, "other@elsewhere.test", "y@one.test")
    assert ids(await store.select(Selection(domain="ONE.test."))) == {a, c, d}
    assert ids(await store.select(Selection(sender="app@src.test"))) == {a, b}
    assert ids(await store.select(Selection(sender="@src.test"))) == {a, b}
    assert ids(await store.select(Selection(sender="<>"))) == {c}
    assert ids(await store.select(Selection(state=Pick.DEFERRED))) == {a, b, c}
    assert ids(await store.select(Selection(state=Pick.QUEUED))) == {d}
    assert ids(await store.select(Selection(domain="one.test", state=Pick.DEFERRED))) == {a, c}
    assert ids(await store.select(Selection(everything=True))) == {a, b, c, d}
    assert ids(await store.select(Selection(queue_ids=(b, "NOSUCHID0000")))) == {b}
    assert await store.select(Selection()) == []
    result = await store.administer(AdminAction.HOLD, Selection(domain="two.test"), operator="op")
    assert (result.matched, result.count) == (2, 2)
    assert ids(await store.select(Selection(state=Pick.HELD))) == {a, b}
    assert ids(await store.select(Selection(state=Pick.DEFERRED))) == {c}
    again = await store.administer(AdminAction.HOLD, Selection(queue_ids=(a,)), operator="op")
    assert (again.matched, again.count, again.held) == (1, 0, 1)
    missing = await store.administer(
        AdminAction.RELEASE, Selection(queue_ids=(a, "NOSUCHID0000")), operator="op"
    )
    assert (missing.count, missing.missing) == (1, ("NOSUCHID0000",))


async def test_flush_and_bounce_touch_only_the_selected_recipients(
    store: AnyStore, clock: Clock
) -> None:
    both = await admin_put(store, "app@src.test", "u@one.test", "v@two.test")
    await defer_all(store)
    flushed = await store.administer(AdminAction.FLUSH, Selection(domain="two.test"), operator="op")
    assert flushed.count == 1
    (lease,) = await store.lease_due("w", 10, 60)
    assert [r.address for r in lease.recipients] == ["v@two.test"]
    await store.release(lease)
    bounce_report = operator_bounce_report(
        reporting_mta="relay.test", lifetime=86400.0, now=clock.now
    )
    bounced = await store.administer(
        AdminAction.BOUNCE,
        Selection(domain="one.test"),
        operator="op",
        reason=last_error(),
        report=bounce_report,
    )
    assert (bounced.matched, bounced.count, bounced.dsns) == (1, 1, 1)
    msg = await store.get_message(both)
    assert msg is not None
    assert [(r.address, r.state, r.last_error) for r in msg.recipients] == [
        ("u@one.test", RcptState.BOUNCED, "5.0.0 bounced by the operator"),
        ("v@two.test", RcptState.DEFERRED, "451 later"),
    ]
    (dsn,) = await dsns(store)
    data = await store.read_data(dsn.queue_id)
    assert b"Final-Recipient: rfc822; u@one.test" in data
    last = await store.administer(
        AdminAction.BOUNCE, Selection(queue_ids=(both,)), operator="op", report=bounce_report
    )
    assert last.count == 1
    assert await store.get_message(both) is None


async def test_operator_bounce_of_a_requiretls_message_reports_with_requiretls(
    store: AnyStore, clock: Clock
) -> None:
    body = b"Subject: secret plans\r\n\r\nthe body stays home\r\n"
    msg = NewMessage(SENDER, ("u@one.test",), body, dsn=DsnRequest(ret="FULL"), requiretls=True)
    await store.put(msg)
    await defer_all(store)
    bounce_report = operator_bounce_report(
        reporting_mta="relay.test", lifetime=86400.0, now=clock.now
    )
    bounced = await store.administer(
        AdminAction.BOUNCE, Selection(domain="one.test"), operator="op", report=bounce_report
    )
    assert bounced.dsns == 1
    (leased,) = await store.lease_due("w", 10, 60)
    assert (leased.sender, leased.requiretls) == ("", True)
    data = await store.read_data(leased.queue_id)
    assert b"Subject: secret plans" in data
    assert b"the body stays home" not in data


async def test_work_in_delivery_is_left_alone(store: AnyStore) -> None:
    queue_id = await admin_put(store, "app@src.test", "u@one.test", "v@two.test")
    leases = await store.lease_due("worker", 10, 600)
    await store.release(next(lease for lease in leases if lease.domain == "one.test"))
    assert ids(await store.select(Selection(state=Pick.ACTIVE))) == {queue_id}
    result = await store.administer(
        AdminAction.BOUNCE, Selection(queue_ids=(queue_id,)), operator="op", reason="5.0.0 x"
    )
    assert (result.count, result.in_flight) == (1, 1)
    msg = await store.get_message(queue_id)
    assert msg is not None
    assert {r.address: r.state for r in msg.recipients} == {
        "u@one.test": RcptState.BOUNCED,
        "v@two.test": RcptState.QUEUED,
    }


async def test_no_report_for_a_null_sender_or_notify_never(store: AnyStore) -> None:
    await admin_put(store, "", "u@one.test")
    await admin_put(store, "app@src.test", "v@one.test", notify="NEVER")
    asked: list[BounceCandidate] = []

    def bounce_report(candidate: BounceCandidate) -> NewMessage | None:
        asked.append(candidate)
        return operator_bounce_report(reporting_mta="r.test", lifetime=1.0, now=T0)(candidate)

    result = await store.administer(
        AdminAction.BOUNCE, Selection(everything=True), operator="op", report=bounce_report
    )
    assert (result.count, result.dsns) == (2, 0)
    assert len(asked) == 2
    assert await store.select(Selection(everything=True)) == []


async def test_each_change_is_journaled_once_in_its_transaction(
    store: AnyStore, clock: Clock
) -> None:
    a = await admin_put(store, "app@src.test", "u@one.test")
    assert await store.journal_head() == 0
    await store.administer(AdminAction.HOLD, Selection(queue_ids=(a,)), operator="alice")
    await store.administer(AdminAction.HOLD, Selection(queue_ids=(a,)), operator="alice")
    await store.administer(AdminAction.DELETE, Selection(domain="none.test"), operator="bob")
    await store.administer(AdminAction.DELETE, Selection(everything=True), operator="bob")
    entries = await store.journal(await store.journal_logged())
    assert await store.journal_head() == entries[-1].id  # logged or not
    assert [
        (e.action, e.queue_id, e.selection, e.matched, e.count, e.operator) for e in entries
    ] == [
        ("hold", a, f"id={a}", 1, 1, "alice"),
        ("delete", None, "all", 1, 1, "bob"),
    ]
    await store.mark_journal_logged(entries[0].id)
    assert await store.journal_logged() == entries[0].id
    assert [e.id for e in await store.journal(await store.journal_logged())] == [entries[1].id]
    clock.now += 91 * 86400
    await store.mark_journal_logged(entries[1].id)
    assert await store.journal(0) == []


async def test_thousands_of_messages_in_one_transaction(store: AnyStore) -> None:
    for first in range(0, 3000, 500):
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
