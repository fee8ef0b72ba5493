"""Several nodes, one queue: `sts-relay serve` twice on one PostgreSQL database
(`state.url`), each with a state directory of its own, against a real server.

- two nodes starting at once on an empty database both serve (the schema is made once);
- `queue flush` on one node is delivered by the other within a second (NOTIFY);
- a node SIGKILLed in the middle of a stream loses no acknowledged message: the other
  delivers what it had once its leases run out; duplicates only of what was in delivery;
- one attempt at a time for a piece of work across nodes, with short leases;
- the database stopped under load: 451 to clients, nothing lost, recovery without restart;
- one TLS report for a domain both nodes delivered to.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import signal
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests.e2e.relay_process import RelayProcess, run_cli
from tests.e2e.test_crash import Ledger, crash_world, ids_for, submit
from tests.e2e.test_processes import SINK_SOCKETS, HoldingMx, sent_events
from tests.support.postgres import PostgresServer
from tests.support.waiting import eventually
from tests.support.world import World, to_toml

Node = Callable[..., Awaitable[RelayProcess]]


@pytest.fixture
async def node(world: World, tmp_path: Path, pg_url: str) -> AsyncIterator[Node]:
    """`await node("a", **overrides)`: a relay on the test's database with its own state
    directory and port; stopped at the end."""
    started: list[RelayProcess] = []

    async def start(name: str, **overrides: dict[str, Any]) -> RelayProcess:
        relay = configured(world, tmp_path, pg_url, name, **overrides)
        started.append(relay)
        await relay.start()
        return relay

    yield start
    for relay in started:
        await relay.stop()


def configured(
    world: World, tmp_path: Path, pg_url: str, name: str, **overrides: dict[str, Any]
) -> RelayProcess:
    state = overrides.pop("state", {})
    config = world.relay_config(
        tmp_path / f"state-{name}", state={"url": pg_url, **state}, **overrides
    )
    path = tmp_path / f"relay-{name}.toml"
    path.write_text(to_toml(config), encoding="utf-8")
    return RelayProcess(path, config["listen"]["addresses"][0])


@SINK_SOCKETS
async def test_two_nodes_start_at_once_on_an_empty_database(
    world: World, tmp_path: Path, pg_url: str
) -> None:
    sink = await world.sts_domain("both.test")
    a = configured(world, tmp_path, pg_url, "a")
    b = configured(world, tmp_path, pg_url, "b", serve={"processes": 2})  # a node of 2
    try:
        await asyncio.gather(a.start(), b.start())
        await eventually(lambda: len(b.find(event="process_started")) == 2)
        for i in range(6):
            await (a if i % 2 else b).send([f"u{i}@both.test"])
        await eventually(lambda: len(sink.messages) == 6, timeout=30)
        # A process of node b dies: its leases are returned through the shared store.
        pid = b.find(event="process_started")[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        exited = await b.wait_for(lambda e: e["event"] == "process_exited")
        assert exited["status"] == "SIGKILL"
        assert not b.find(event="store_error")
        await b.wait_for(lambda e: e["event"] == "process_started" and e["pid"] != pid, 40)
        await b.send(["after@both.test"])
        await eventually(
            lambda: len(sink.messages) >= 7,
            timeout=30,
            message="the message sent after the process was replaced arrives",
        )
    finally:
        assert await a.stop() == 0
        assert await b.stop() == 0


async def test_flush_on_one_node_is_delivered_by_the_other_within_a_second(
    world: World, node: Node
) -> None:
    sink = await world.sts_domain("later.test")
    await sink.stop()  # the MX is down: the first attempt defers
    a = await node("a", queue={"retry_schedule": [3600]})
    b = await node("b", queue={"retry_schedule": [3600]})
    await a.send(["u@later.test"])
    # Either node may lease it first (b hears of it through NOTIFY): wait for whichever did.
    deferred = {"event": "delivery", "rcpt": "u@later.test", "status": "deferred"}
    await eventually(lambda: bool(a.find(**deferred) or b.find(**deferred)), timeout=30)
    assert await a.stop() == 0  # node a is gone; its command line still works
    await sink.start()
    done = await run_cli(a.config_path, "queue", "flush", "--all")
    assert done.code == 0, done.stderr
    flushed = asyncio.get_running_loop().time()
    await b.delivery("u@later.test", "sent", within=5)
    assert asyncio.get_running_loop().time() - flushed < 1.0
    assert len(sink.messages) == 1
    # The change is logged once, by the node that claims it from the journal.
    await eventually(lambda: len(b.find(event="queue_admin")) == 1, timeout=5)


@SINK_SOCKETS
async def test_a_node_killed_mid_stream_loses_no_accepted_message(world: World, node: Node) -> None:
    mx = await crash_world(world, delay=0.2)
    short = {"attempt_deadline": 2, "lease_time": 4}
    a = await node("a", delivery=short)
    b = await node("b", delivery=short)
    rng = random.Random(5)
    ledger = Ledger()
    clients = [
        asyncio.create_task(submit(relay, ledger, ids, random.Random(rng.random())))
        for relay, ids in zip([a, b] * 3, ids_for("n", 6, 25), strict=True)
    ]
    await eventually(lambda: len(mx.received) >= 20, timeout=30)
    await a.kill()
    before_kill = {msg_id for msg_id, _ in mx.received}
    await asyncio.gather(*clients)

    await eventually(
        lambda: ledger.acked <= {m for m, _ in mx.received},
        timeout=60,
        message="every 250'd message arrives (b takes a's work once its leases run out)",
    )
    arrived = Counter(m for m, _ in mx.received)
    assert set(arrived) <= ledger.acked | ledger.in_doubt
    duplicates = {m for m, n in arrived.items() if n > 1}
    assert duplicates <= before_kill, "a duplicate of something not in delivery at the kill"
    assert max(sent_events(b.events).values(), default=1) == 1
    await mx.stop()
    gc.collect()  # what the killed node left in the test's sink is finalized here


async def test_one_attempt_at_a_time_across_nodes(world: World, node: Node) -> None:
    mx = HoldingMx(world.allocate_ip(), world.delivery_port, hold=30.0)
    await mx.start()
    world.dns.add("mx.hold.test", "A", mx.ip)
    world.mx_record("hold.test", (10, "mx.hold.test"))
    try:
        short = {"attempt_deadline": 1, "lease_time": 2.2}
        a = await node("a", delivery=short, queue={"retry_schedule": [1]})
        await node("b", delivery=short, queue={"retry_schedule": [1]})
        await a.send(["u@hold.test"])
        await asyncio.sleep(8)
        assert mx.attempts >= 2
        assert mx.most_active == 1, "two attempts of the same work at once"
    finally:
        await mx.stop()


async def _send_counting(relay: RelayProcess, n: int) -> tuple[list[str], int]:
    """Send `n` messages one by one; the ones accepted (250) and how many got a 451."""
    accepted: list[str] = []
    codes: list[int] = []
    for i in range(n):
        rcpt = f"m{i}@steady.test"
        try:
            await relay.send([rcpt])
            accepted.append(rcpt)
        except aiosmtplib.SMTPResponseException as exc:
            codes.append(exc.code)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes += [r.code for r in exc.recipients]
        await asyncio.sleep(0.05)
    assert set(codes) <= {451}, codes  # a temporary failure, never a permanent one
    return accepted, len(codes)


async def test_the_database_going_away_under_load_gives_451_and_loses_nothing(
    world: World, node: Node, postgres: PostgresServer
) -> None:
    sink = await world.sts_domain("steady.test")
    a = await node("a")
    sending = asyncio.create_task(_send_counting(a, 120))
    await eventually(lambda: len(a.find(event="received")) >= 10, timeout=30)
    postgres.stop()
    await asyncio.sleep(2)
    postgres.start()
    accepted, refused = await sending
    assert refused >= 1, "the database was away: some messages must have been refused"
    assert a.find(event="store_error")
    await eventually(
        lambda: {r for m in sink.messages for r in m.rcpt_tos} >= set(accepted),
        timeout=60,
        message="every accepted message delivered once the database is back",
    )


async def test_one_tls_report_for_a_domain_both_nodes_delivered_to(
    world: World, node: Node
) -> None:
    await world.sts_domain("rpt.test")
    world.dns.txt("_smtp._tls.rpt.test", "v=TLSRPTv1; rua=mailto:reports@rua.test")
    world.mx_record("rua.test", (10, "mx1.rua.test"))
    mailbox = await world.add_mx("mx1.rua.test", world.allocate_ip())
    # One connection per message: each delivery is one TLS session (RFC 8460 counts
    # sessions; messages over a reused connection share one).
    a = await node("a", delivery={"max_messages_per_connection": 1})
    b = await node("b", delivery={"max_messages_per_connection": 1})
    for i in range(3):
        await a.send([f"a{i}@rpt.test"])
        await b.send([f"b{i}@rpt.test"])
    await eventually(lambda: sum(sent_events(a.events + b.events).values()) == 6, timeout=45)
    assert await a.stop() == 0
    assert await b.stop() == 0  # counters written at the clean stops
    assert not a.find(event="store_error") + b.find(event="store_error")

    shown = await run_cli(b.config_path, "tlsrpt", "show", "--day", "today", "--json")
    assert shown.code == 0, shown.stderr
    (entry,) = [e for e in json.loads(shown.stdout) if e["domain"] == "rpt.test"]

    policies = entry["report"]["policies"]
    assert sum(p["summary"]["total-successful-session-count"] for p in policies) == 6

    first = await run_cli(a.config_path, "tlsrpt", "send", "--day", "today", "--json")
    second = await run_cli(b.config_path, "tlsrpt", "send", "--day", "today", "--json")
    assert first.code == 0, first.stderr
    assert second.code == 0, second.stderr
    queued = [json.loads(d.stdout)["deliveries"] for d in (first, second)]
    assert sum(len(d) for d in queued) == 1, queued  # one report for the cluster
    b2 = await node("b2")
    await eventually(lambda: len(mailbox.messages) == 1, timeout=45)
    await asyncio.sleep(1)
    assert len(mailbox.messages) == 1
    assert b2.find(event="started")
