"""PostgresStore on a real PostgreSQL server (tests/support/postgres.py): what sharing one
queue between nodes asks beyond the QueueStore contract (test_queue_store_engines.py runs
that on both engines). Two stores on one database stand for two relay nodes.

Leases across nodes (never the same group twice while live, taken over once expired or
released for a dead owner), the journal logged by exactly one node, NOTIFY waking the
other node, the schema created once by nodes starting together, every commit synchronous,
counts that follow every change without counting rows, and the database going away and
coming back: StoreUnavailable meanwhile, never a psycopg exception, then the same store
working again with every acknowledged message there.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from typing import Any

import psycopg
import pytest

from mailqueue.admin import AdminAction, Pick, Selection
from mailqueue.ids import QueueIds
from mailqueue.model import Lease, NewMessage, RcptState, RecipientResult, Recorded
from mailqueue.postgres import PostgresStore
from mailqueue.postgres_admin import apply_admin
from mailqueue.postgres_leases import GROUP_ROWS, LOCK_DUE_MESSAGES
from mailqueue.postgres_schema import SCHEMA_VERSION
from mailqueue.schedule import RetrySchedule
from mailqueue.store import StoreUnavailable
from relay.cli.queue_bounce import last_error, operator_bounce_report
from tests.support.postgres import PASSWORD, PostgresServer
from tests.support.queue_store import T0, Clock
from tests.support.waiting import eventually

SCHEDULE = RetrySchedule((300.0, 600.0))
LIFETIME = 86400.0
SENDER = "app@src.test"
# What counts() returned by scanning the rows: the reference the counters must equal.
_SCANNED = (
    "SELECT count(*) FILTER (WHERE held <> 2 AND state = 'queued'),"
    " count(*) FILTER (WHERE held <> 2 AND state = 'deferred'),"
    " count(*) FILTER (WHERE held <> 2 AND state = 'sent'),"
    " count(*) FILTER (WHERE held <> 2 AND state = 'bounced'),"
    " count(*) FILTER (WHERE held = 1), count(*),"
    " (SELECT count(*) FROM queue_messages) FROM queue_recipients"
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def open_store(pg_url: str, clock: Clock) -> AsyncIterator[Any]:
    """`await open_store(**overrides)`: a store on the test's database (a node); all are
    closed at the end."""
    opened: list[PostgresStore] = []

    async def opener(**kw: Any) -> PostgresStore:
        args: dict[str, Any] = {
            "schedule": SCHEDULE,
            "lifetime": LIFETIME,
            "clock": clock,
            "maintenance_every": None,
            "connect_timeout": 3.0,
        }
        store = PostgresStore(pg_url, **(args | kw))
        await store.open()
        opened.append(store)
        return store

    yield opener
    for store in opened:
        await store.close()


async def sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement in a session of its own (as an operator's psql would)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(statement, params)
        return await cur.fetchall() if cur.description is not None else []


def message(*rcpts: str, data: bytes = b"Subject: t\r\n\r\nhello\r\n") -> NewMessage:
    return NewMessage(sender=SENDER, recipients=rcpts, data=data, client="127.0.0.1")


def sent(lease: Lease) -> list[RecipientResult]:
    return [RecipientResult(r.address, RcptState.SENT, "250 ok") for r in lease.recipients]


# --- schema and sessions ---------------------------------------------------------------


async def test_nodes_starting_at_once_on_an_empty_database_create_the_schema_once(
    open_store: Any, pg_url: str
) -> None:
    stores = await asyncio.gather(*(open_store() for _ in range(4)))
    assert sorted(s.migrated_from or 0 for s in stores) == [0] + [SCHEMA_VERSION] * 3
    rows = await sql(pg_url, "SELECT value FROM queue_meta WHERE key = 'schema_version'")
    assert rows == [(str(SCHEMA_VERSION),)]
    # Every node works on the one schema.
    queue_ids = await asyncio.gather(*(s.put(message("a@one.test")) for s in stores))
    assert (await stores[0].counts())["messages"] == len(set(queue_ids)) == 4


async def test_a_newer_schema_is_refused(open_store: Any, pg_url: str) -> None:
    await (await open_store()).close()
    await sql(pg_url, "UPDATE queue_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreUnavailable, match="schema version 99"):
        await open_store()


async def test_every_commit_is_synchronous_whatever_the_database_default(
    open_store: Any, pg_url: str
) -> None:
    database = pg_url.rsplit("/", 1)[1]
    await sql(pg_url, f"ALTER DATABASE {database} SET synchronous_commit = off")
    assert await sql(pg_url, "SHOW synchronous_commit") == [("off",)]  # a plain session
    store = await open_store()
    # Each put's transaction writes down the setting it ran with.
    await sql(pg_url, "CREATE TABLE seen (setting TEXT)")
    await sql(
        pg_url,
        "CREATE FUNCTION note_setting() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " INSERT INTO seen VALUES (current_setting('synchronous_commit')); RETURN NULL; END $$",
    )
    await sql(
        pg_url,
        "CREATE TRIGGER note AFTER INSERT ON queue_messages FOR EACH STATEMENT"
        " EXECUTE FUNCTION note_setting()",
    )
    await asyncio.gather(*(store.put(message(f"u{i}@one.test")) for i in range(20)))
    (lease, *_) = await store.lease_due("w", 1, 60)
    await store.record(lease, sent(lease), message("report@src.test"))  # a DSN: an insert
    settings = await sql(pg_url, "SELECT DISTINCT setting FROM seen")
    assert settings == [("on",)]


async def test_open_fails_clearly_and_never_shows_the_password(
    postgres: PostgresServer, clock: Clock
) -> None:
    wrong_password = postgres.url().replace(PASSWORD, "not-the-password")
    closed_port = "postgresql://relay:secret-pw@127.0.0.1:1/postgres"
    for url in (wrong_password, closed_port, "postgresql://relay@[bad"):
        store = PostgresStore(
            url, schedule=SCHEDULE, lifetime=LIFETIME, clock=clock, connect_timeout=2.0
        )
        with pytest.raises(StoreUnavailable) as caught:
            await store.open()
        assert "secret-pw" not in str(caught.value)
        assert "not-the-password" not in str(caught.value)
        assert not isinstance(caught.value, psycopg.Error)


async def test_due_work_is_found_through_the_partial_index(open_store: Any, pg_url: str) -> None:
    store = await open_store()
    for _ in range(10):
        await asyncio.gather(
            *(store.put(message(*(f"u{i}@d{i}.test" for i in range(10)))) for _ in range(200))
        )
    # Most of the queue waits for later, as on a relay with a backlog of deferrals.
    await sql(
        pg_url, "UPDATE queue_recipients SET next_attempt_at = %s WHERE id %% 50 <> 0", (T0 + 9e6,)
    )
    await sql(pg_url, "ANALYZE")
    plans = []
    for statement, params in (
        (LOCK_DUE_MESSAGES, (T0, 40, 10)),
        (GROUP_ROWS, ([1, 2, 3],)),
        (
            "SELECT min(next_attempt_at) FROM queue_recipients"
            " WHERE state IN ('queued', 'deferred') AND held = 0",
            (),
        ),
    ):
        rows = await sql(pg_url, "EXPLAIN " + statement, params)
        plans.append("\n".join(str(r[0]) for r in rows))
    assert "queue_recipients_due" in plans[0], plans[0]
    assert all("Seq Scan on queue_recipients" not in plan for plan in plans), plans
    assert "queue_recipients_due" in plans[2], plans[2]


# --- counts ----------------------------------------------------------------------------


async def scanned(url: str) -> dict[str, int]:
    ((q, d, s, b, held, total, messages),) = await sql(url, _SCANNED)
    out = {"queued": q, "deferred": d, "sent": s, "bounced": b, "held": held}
    return out | {"set_aside": total - q - d - s - b, "messages": messages}


async def test_counts_follow_every_change_without_counting_rows(
    open_store: Any, pg_url: str, clock: Clock
) -> None:
    store = await open_store()
    other = await open_store()
    steps: list[str] = []

    async def check(step: str) -> None:
        steps.append(step)
        assert await store.counts() == await scanned(pg_url), step

    ids = await asyncio.gather(
        *(store.put(message(f"u{i}@one.test", f"v{i}@two.test")) for i in range(30))
    )
    await check("puts")
    leases = await other.lease_due("w", 20, 60)
    await check("leases")  # leasing changes no counter
    for lease in leases[:10]:
        await other.record(lease, sent(lease))
    for lease in leases[10:]:
        results = [RecipientResult(r.address, RcptState.DEFERRED) for r in lease.recipients]
        await other.record(lease, results, message("sender@src.test"))
    await check("records")
    assert await store.maintain() is True
    assert await sql(pg_url, "SELECT count(*) FROM queue_count_deltas") == [(0,)]
    await check("folded")
    await store.administer(AdminAction.HOLD, Selection(domain="two.test"), operator="t")
    await check("hold")
    await store.administer(
        AdminAction.BOUNCE, Selection(domain="one.test"), operator="t", reason="5.0.0 x"
    )
    await check("bounce")
    await store.administer(AdminAction.RELEASE, Selection(state=Pick.HELD), operator="t")
    await store.delete(ids[-1])
    await check("release, delete")
    await other.maintain()
    await check("folded again")
    await store.administer(AdminAction.DELETE, Selection(everything=True), operator="t")
    await store.maintain()
    assert await store.counts() == dict.fromkeys(
        ("queued", "deferred", "sent", "bounced", "held", "set_aside", "messages"), 0
    )


# --- leases across nodes ---------------------------------------------------------------


async def test_many_concurrent_lease_calls_from_two_nodes_never_share_a_group(
    open_store: Any,
) -> None:
    node_a = await open_store()
    node_b = await open_store()
    for _ in range(2):
        await asyncio.gather(
            *(node_a.put(message("a@one.test", "b@two.test", "c@three.test")) for _ in range(100))
        )
    everything: list[tuple[str, str]] = []
    rounds = 0
    while True:
        rounds += 1
        calls = [(node, owner) for node, owner in ((node_a, "a"), (node_b, "b")) for _ in range(15)]
        batches = await asyncio.gather(*(node.lease_due(owner, 7, 600) for node, owner in calls))
        leased = [(ls.queue_id, ls.domain) for batch in batches for ls in batch]
        assert len(leased) == len(set(leased)), "a group leased twice at once"
        everything += leased
        if not leased:
            break
    assert len(everything) == len(set(everything)) == 600  # every group, each once
    assert rounds > 2  # several rounds of 30 concurrent calls did the work


async def test_record_by_another_owner_changes_nothing(open_store: Any) -> None:
    node_a = await open_store()
    node_b = await open_store()
    qid = await node_a.put(message("a@one.test"))
    (lease,) = await node_a.lease_due("node-a", 10, 60)
    impostor = replace(lease, owner="node-b")
    assert await node_b.record(impostor, sent(lease)) == Recorded((), ("a@one.test",))
    assert await node_b.renew(impostor, lease.until + 60) is None
    found = await node_b.get_message(qid)
    assert found is not None
    assert found.recipients[0].state is RcptState.QUEUED
    assert (await node_b.record(lease, sent(lease))).applied == ("a@one.test",)  # the owner's


async def test_an_expired_lease_is_taken_over_by_the_other_node(
    open_store: Any, clock: Clock
) -> None:
    node_a = await open_store()
    node_b = await open_store()
    qid = await node_a.put(message("a@one.test", "b@one.test"))
    (dead,) = await node_a.lease_due("node-a", 10, 60)
    clock.now += 59
    assert await node_b.lease_due("node-b", 10, 60) == []  # still live
    clock.now += 1
    (taken,) = await node_b.lease_due("node-b", 10, 60)
    assert (taken.queue_id, taken.domain) == (qid, "one.test")
    assert await node_a.record(dead, sent(dead)) == Recorded((), ("a@one.test", "b@one.test"))
    assert (await node_b.record(taken, sent(taken))).applied == ("a@one.test", "b@one.test")
    assert await node_b.get_message(qid) is None


async def test_release_owner_returns_a_dead_owners_leases_at_once(open_store: Any) -> None:
    node_a = await open_store()
    node_b = await open_store()
    for i in range(3):
        await node_a.put(message(f"u{i}@one.test", f"v{i}@two.test"))
    mine = await node_b.lease_due("node-b", 1, 600)
    dead = await node_a.lease_due("node-a-7f3e", 10, 600)
    assert len(dead) == 5
    assert await node_b.lease_due("node-b", 10, 600) == []
    assert await node_b.release_owner("node-a-7f3e") == 5
    assert await node_b.release_owner("node-a-7f3e") == 0
    taken = await node_b.lease_due("node-b", 10, 600)  # at once: no waiting for lease_until
    assert {(ls.queue_id, ls.domain) for ls in taken} == {(ls.queue_id, ls.domain) for ls in dead}
    assert (await node_a.record(dead[0], sent(dead[0]))).applied == ()
    assert (await node_b.record(mine[0], sent(mine[0]))).applied != ()  # others' kept


# --- the journal and notifications ------------------------------------------------------


async def test_each_journal_entry_is_claimed_by_exactly_one_node(open_store: Any) -> None:
    node_a = await open_store()
    node_b = await open_store()
    ids = [await node_a.put(message(f"u{i}@one.test")) for i in range(40)]
    claimed: dict[str, list[int]] = {"a": [], "b": []}
    done = asyncio.Event()

    async def claim(node: PostgresStore, name: str) -> None:
        while True:
            finished = done.is_set()
            got = [e.id for e in await node.claim_journal(limit=3)]
            claimed[name] += got
            if finished and not got:
                return
            await asyncio.sleep(0)

    async def change(node: PostgresStore, queue_id: str) -> None:
        await node.administer(AdminAction.HOLD, Selection(queue_ids=(queue_id,)), operator="o")

    claimers = [asyncio.create_task(claim(n, k)) for n, k in ((node_a, "a"), (node_b, "b"))]
    await asyncio.gather(*(change(node_a if i % 2 else node_b, q) for i, q in enumerate(ids)))
    done.set()
    await asyncio.gather(*claimers)
    entries = await node_a.journal(0, limit=1000)
    every = claimed["a"] + claimed["b"]
    assert len(every) == len(set(every)) == len(entries) == 40
    assert set(every) == {e.id for e in entries}
    assert claimed["a"], "node b claimed everything: the test proves little"
    assert claimed["b"], "node a claimed everything: the test proves little"
    assert await node_b.claim_journal() == []
    assert await node_a.journal_logged() == max(every)


async def next_wakeup(wakeups: AsyncGenerator[None, None]) -> None:
    async with asyncio.timeout(30):  # a guard against hanging, not a timing assertion
        await anext(wakeups)


async def test_a_change_on_one_node_wakes_the_other(open_store: Any) -> None:
    node_a = await open_store()
    node_b = await open_store()
    qid = await node_a.put(message("a@one.test"))
    wakeups = node_b.notifications()
    await next_wakeup(wakeups)  # the first: the LISTEN session is up
    assert node_b.listening
    assert await node_a.hold(qid)
    await next_wakeup(wakeups)
    assert await node_a.release_hold(qid)
    await next_wakeup(wakeups)
    (lease,) = await node_a.lease_due("node-a", 10, 60)
    await node_a.record(lease, [RecipientResult("a@one.test", RcptState.DEFERRED, "451")])
    flush = Selection(everything=True)
    assert (await node_a.administer(AdminAction.FLUSH, flush, operator="o")).count == 1
    await next_wakeup(wakeups)
    await node_a.lease_due("node-a", 10, 60)
    assert await node_a.release_owner("node-a") == 1
    await next_wakeup(wakeups)
    await wakeups.aclose()


# --- the database goes away and comes back ---------------------------------------------


async def test_database_away_then_back_loses_nothing_acknowledged(
    postgres: PostgresServer, open_store: Any
) -> None:
    store = await open_store(connect_timeout=2.0)
    watcher = await open_store(connect_timeout=2.0)
    wakeups = watcher.notifications()
    await next_wakeup(wakeups)
    acked: list[str] = []
    refused: list[BaseException] = []
    stop = asyncio.Event()

    async def client(i: int) -> None:
        # An SMTP client: sends, and after a 451 tries again later.
        while not stop.is_set():
            try:
                acked.append(await store.put(message(f"u{i}@one.test", data=b"x" * 2000)))
            except StoreUnavailable as exc:
                refused.append(exc)
                await asyncio.sleep(0.05)

    clients = [asyncio.create_task(client(i)) for i in range(8)]
    try:
        await eventually(lambda: len(acked) >= 200, timeout=60)
        postgres.stop()
        await eventually(lambda: refused, timeout=60)
        acked_before_restart = len(acked)
        for call in (
            store.put(message("a@one.test")),
            store.lease_due("w", 10, 60),
            store.counts(),
            store.next_due_at(),
            store.administer(AdminAction.FLUSH, Selection(everything=True), operator="o"),
        ):
            with pytest.raises(StoreUnavailable) as caught:
                await call
            assert not isinstance(caught.value, psycopg.Error)
        assert await store.writable() is not None
        assert all(isinstance(exc, StoreUnavailable) for exc in refused)
    finally:
        postgres.start()
    # The same objects, no restart: puts are acknowledged again.
    await eventually(lambda: len(acked) >= acked_before_restart + 100, timeout=60)
    stop.set()
    await asyncio.gather(*clients)
    assert await store.writable() is None
    stored = {m.queue_id for m in await store.list_messages()}
    assert set(acked) <= stored  # every 250 is in the queue
    leases = await store.lease_due("w", 10_000, 60)
    assert {ls.queue_id for ls in leases} == stored
    # The other node's LISTEN session came back by itself (it says so with a wake-up)...
    await eventually(lambda: watcher.listening, timeout=60)
    await next_wakeup(wakeups)
    # ...and hears this node's changes again.
    await store.release_owner("w")
    await next_wakeup(wakeups)
    with contextlib.suppress(StopAsyncIteration):
        await wakeups.aclose()


async def test_a_restart_between_calls_costs_no_call(
    postgres: PostgresServer, open_store: Any
) -> None:
    store = await open_store()
    qid = await store.put(message("a@one.test"))
    await store.counts()  # several sessions are idle in the pool now
    await asyncio.gather(*(store.counts() for _ in range(5)))
    postgres.stop()
    postgres.start()
    # Sessions that died with the server are replaced, not reported as failures.
    assert await store.read_data(qid) == b"Subject: t\r\n\r\nhello\r\n"
    assert (await asyncio.gather(*(store.counts() for _ in range(5))))[0]["messages"] == 1


# --- one message's fault is its own ------------------------------------------------------


async def test_a_message_the_database_refuses_fails_alone_in_its_batch(open_store: Any) -> None:
    store = await open_store()
    bad = NewMessage("nul\x00@src.test", ("a@one.test",), b"x\r\n")  # text cannot hold NUL
    outcomes = await asyncio.gather(
        *(store.put(message(f"u{i}@one.test")) for i in range(10)),
        store.put(bad),
        *(store.put(message(f"v{i}@one.test")) for i in range(10)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[10], StoreUnavailable)
    good = [o for i, o in enumerate(outcomes) if i != 10]
    assert all(isinstance(o, str) for o in good)
    assert {m.queue_id for m in await store.list_messages()} == set(good)
    assert await store.writable() is None  # the database itself is fine


async def test_old_receipts_are_dropped_by_maintenance(
    open_store: Any, clock: Clock, pg_url: str
) -> None:
    store = await open_store(schedule=RetrySchedule((86400.0,)))
    qid = await store.put(message("a@one.test"))
    (lease,) = await store.lease_due("w", 10, 60)
    deferred = [RecipientResult("a@one.test", RcptState.DEFERRED, "451")]
    first = await store.record(lease, deferred)
    assert await store.record(lease, deferred) == first  # the receipt answers
    clock.now += 3601
    assert await store.maintain() is True
    assert await sql(pg_url, "SELECT count(*) FROM queue_receipts") == [(0,)]
    assert await store.record(lease, deferred) == Recorded((), ("a@one.test",))
    found = await store.get_message(qid)
    assert found is not None
    assert found.recipients[0].attempts == 1  # one attempt, not two


async def test_a_read_only_database_is_not_writable(open_store: Any, pg_url: str) -> None:
    store = await open_store()
    qid = await store.put(message("a@one.test"))
    assert await store.writable() is None
    database = pg_url.rsplit("/", 1)[1]
    await sql(pg_url, f"ALTER DATABASE {database} SET default_transaction_read_only = on")
    # Its sessions end (as at a failover to a standby); the store opens new ones.
    await sql(
        pg_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'sts-relay'",
    )
    assert await store.read_data(qid) == b"Subject: t\r\n\r\nhello\r\n"
    assert "read-only" in (await store.writable() or "")
    with pytest.raises(StoreUnavailable):
        await store.put(message("b@one.test"))
    writer = pg_url + "?options=-c%20default_transaction_read_only%3Doff"  # an operator's
    await sql(writer, f"ALTER DATABASE {database} SET default_transaction_read_only = off")
    await sql(
        pg_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'sts-relay'",
    )
    assert await store.writable() is None
    assert len(await store.put(message("b@one.test"))) == 12


async def test_a_report_prepared_before_a_change_is_built_again(
    open_store: Any, pg_url: str
) -> None:
    """Reports are built before the write transaction; one whose recipients changed in
    between (another node delivered one, say) is not used."""
    store = await open_store()
    queue_id = await store.put(message("u@one.test"))
    ((msg_id,),) = await sql(
        pg_url, "SELECT id FROM queue_messages WHERE queue_id = %s", (queue_id,)
    )
    stale = NewMessage("", ("stale@old.test",), b"Subject: stale\r\n\r\n")
    report = operator_bounce_report(reporting_mta="r.test", lifetime=86400.0, now=T0)
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        result = await apply_admin(
            conn,
            QueueIds(random.Random(1)),
            AdminAction.BOUNCE,
            Selection(queue_ids=(queue_id,)),
            now=T0,
            operator="op",
            reason=last_error(),
            report=report,
            prepared={msg_id: (frozenset({-1}), stale)},  # other rows than those bounced now
            channel="sts_relay_queue",
        )
        await conn.commit()
    assert (result.count, result.dsns) == (1, 1)
    # The report built now (to the sender), not the stale one; the message is gone.
    assert await sql(pg_url, "SELECT address FROM queue_recipients") == [(SENDER,)]


async def test_a_group_in_delivery_is_not_leased_again_for_a_sibling_come_due(
    open_store: Any, clock: Clock
) -> None:
    """Recipients of one group deferred together come due at slightly different times (the
    schedule's jitter). One that comes due while a sibling is in delivery must not start a
    second attempt to that domain beside it (nor be polled for meanwhile): it waits for
    that lease to end."""
    node_a = await open_store(rng=random.Random(1))
    node_b = await open_store()
    qid = await node_a.put(message("u@one.test", "v@one.test"))
    (lease,) = await node_a.lease_due("node-a", 10, 60)
    deferred = [RecipientResult(r.address, RcptState.DEFERRED, "451") for r in lease.recipients]
    await node_a.record(lease, deferred)
    found = await node_a.get_message(qid)
    assert found is not None
    first, second = sorted(found.recipients, key=lambda r: r.next_attempt_at or 0)
    assert first.next_attempt_at is not None
    assert second.next_attempt_at is not None
    assert first.next_attempt_at < second.next_attempt_at  # the jitter split them
    clock.now = first.next_attempt_at
    (alone,) = await node_a.lease_due("node-a", 10, 600)
    assert [r.address for r in alone.recipients] == [first.address]
    clock.now = second.next_attempt_at
    assert await node_b.lease_due("node-b", 10, 600) == []
    assert await node_b.next_due_at() == alone.until  # no polling while it waits
    await node_a.record(alone, [RecipientResult(first.address, RcptState.SENT)])
    clock.now = alone.until
    (after,) = await node_b.lease_due("node-b", 10, 600)
    assert [r.address for r in after.recipients] == [second.address]
