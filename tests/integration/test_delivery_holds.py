"""Unreachable destinations are held (relay/delivery/holds.py): real DNS, real MX hosts, a
real store and the relay's own pipeline under a real scheduler.

- A domain whose only MX refuses connections (or closes them before any greeting): its
  first message is attempted; the next ones, while the hold lasts, are deferred without a
  DNS query or a connection, with a reason that says so; after the hold one is tried again.
- A flush ends the hold; so does a delivery. Expired mail is always attempted.
- A 4xx greeting, or one MX refusing while another answers 4xx, starts no hold.

The scheduler's clock runs ahead of the wall clock on demand: a hold ends without a sleep.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from mailqueue.admin import AdminAction, JournalEntry, Selection
from mailqueue.model import NewMessage
from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite import SqliteStore
from tests.support.scheduler_lab import SchedulerLab, scheduler_over
from tests.support.waiting import eventually
from tests.support.world import World

HOLD = 30.0
RETRY = 300.0


class Clock:
    """The wall clock, `ahead` seconds on."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead


class Host:
    """An MX address that refuses connections (nothing listens), closes them before any
    greeting, or greets with `greeting` and closes; counts the connections it took."""

    def __init__(self, ip: str, port: int, behaviour: str, greeting: bytes = b"") -> None:
        self.ip, self.port, self.behaviour, self.greeting = ip, port, behaviour, greeting
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        if self.behaviour != "refused":
            self._server = await asyncio.start_server(self._serve, self.ip, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.greeting:
            writer.write(self.greeting)
            await writer.drain()
        writer.close()


@asynccontextmanager
async def host(
    world: World, name: str, behaviour: str, greeting: bytes = b""
) -> AsyncIterator[Host]:
    ip = world.allocate_ip()
    world.dns.add(name, "A", ip)
    mx = Host(ip, world.delivery_port, behaviour, greeting)
    await mx.start()
    try:
        yield mx
    finally:
        await mx.stop()


def store_for(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "queue.sqlite3", schedule=RetrySchedule((RETRY,)), lifetime=86400)


@asynccontextmanager
async def one_mx(
    world: World,
    tmp_path: Path,
    domain: str,
    behaviour: str,
    greeting: bytes = b"",
    *,
    store: SqliteStore | None = None,
    unreachable_hold: float = HOLD,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[tuple[Host, SchedulerLab]]:
    """`domain` with one MX, `mx.<domain>`, that behaves as `behaviour` (see Host), and a
    scheduler over `store` (a new one in `tmp_path` unless given) holding for
    `unreachable_hold` seconds."""
    world.mx_record(domain, (10, f"mx.{domain}"))
    store = store if store is not None else store_for(tmp_path)
    async with (
        host(world, f"mx.{domain}", behaviour, greeting) as mx,
        scheduler_over(
            world, tmp_path, store, unreachable_hold=unreachable_hold, clock=clock
        ) as lab,
    ):
        yield mx, lab


def dns_queries(world: World, domain: str) -> int:
    return sum(1 for name, _ in world.dns.queries if name == domain or name.endswith("." + domain))


async def send(lab: SchedulerLab, rcpt: str) -> dict[str, Any]:
    """Queue a message for `rcpt` and return its `delivery` event."""
    data = f"From: app@src.test\r\nTo: {rcpt}\r\nSubject: hi\r\n\r\nHello.\r\n".encode()
    await lab.store.put(NewMessage("app@src.test", (rcpt,), data))
    lab.scheduler.wake()
    await eventually(lambda: bool(lab.events("delivery", rcpt=rcpt)), timeout=15.0)
    (event,) = lab.events("delivery", rcpt=rcpt)
    return event


@pytest.mark.parametrize("behaviour", ["refused", "closed"])
async def test_an_unreachable_domain_is_held_without_dns_or_connections_then_tried_again(
    world: World, tmp_path: Path, behaviour: str
) -> None:
    domain = f"{behaviour}.test"
    clock = Clock()
    store = store_for(tmp_path)
    async with one_mx(world, tmp_path, domain, behaviour, store=store, clock=clock) as (mx, lab):
        first = await send(lab, f"a@{domain}")
        assert (first["status"], first["held"]) == ("deferred", False)
        assert f"mx.{domain}[{mx.ip}]: connect to {mx.ip}" in first["reason"]
        queried, connections = dns_queries(world, domain), mx.connections
        assert world.dns.queried(domain, "MX")
        assert world.dns.queried(f"_mta-sts.{domain}", "TXT")
        (began,) = lab.events("destination_held")
        assert (began["domain"], began["reason"], began["level"]) == (
            domain,
            first["reason"],
            "warning",
        )

        # Within the hold: deferred at once, no DNS query, no connection.
        for n in range(5):
            held = await send(lab, f"held{n}@{domain}")
            assert (held["status"], held["held"]) == ("deferred", True)
            assert held["reason"].startswith(f"not tried: {domain} unreachable since ")
            assert f"({first['reason']}); held until " in held["reason"]
            assert (held["mx"], held["ip"], held["tls_policy"]) == (None, None, None)
        assert dns_queries(world, domain) == queried
        assert mx.connections == connections
        assert len(lab.events("destination_held")) == 1  # one line per hold
        # Each held recipient keeps to its retry schedule, as if tried.
        for message in await store.list_messages():
            (rcpt,) = message.recipients
            assert (rcpt.state.value, rcpt.attempts) == ("deferred", 1)
            assert rcpt.next_attempt_at is not None
            assert rcpt.next_attempt_at > time.time() + RETRY - 30

        # The hold is over: the next message is tried, fails alike, and a new hold begins.
        clock.ahead += HOLD
        again = await send(lab, f"b@{domain}")
        assert (again["status"], again["held"]) == ("deferred", False)
        assert dns_queries(world, domain) > queried
        if behaviour == "closed":
            assert mx.connections > connections
        assert len(lab.events("destination_held")) == 2
        assert (await send(lab, f"c@{domain}"))["held"] is True


async def test_a_flush_ends_the_hold_and_delivers_at_once(world: World, tmp_path: Path) -> None:
    domain = "flushed.test"
    store = store_for(tmp_path)
    async with one_mx(world, tmp_path, domain, "refused", store=store) as (mx, lab):
        assert (await send(lab, f"a@{domain}"))["held"] is False
        sink = await world.add_mx(f"mx.{domain}", mx.ip, starttls=False)  # the MX is back
        assert (await send(lab, f"b@{domain}"))["held"] is True  # the hold stands

        await store.administer(AdminAction.FLUSH, Selection(everything=True), operator="test")
        lab.scheduler.wake()
        await eventually(lambda: len(lab.events("delivery", status="sent")) == 2, timeout=15.0)
        assert sorted(r for m in sink.messages for r in m.rcpt_tos) == [
            f"a@{domain}",
            f"b@{domain}",
        ]
        assert (await send(lab, f"c@{domain}"))["status"] == "sent"


async def test_a_flush_another_process_logged_first_still_ends_the_hold(
    world: World, tmp_path: Path
) -> None:
    domain = "flushed-logged.test"
    store = store_for(tmp_path)
    async with one_mx(world, tmp_path, domain, "refused", store=store) as (mx, lab):
        assert (await send(lab, f"a@{domain}"))["held"] is False  # tried: the hold begins
        sink = await world.add_mx(f"mx.{domain}", mx.ip, starttls=False)
        # Process 0 logs the journal (`queue_admin`): here it has logged the flush before
        # this scheduler looked at the journal at all.
        await store.administer(AdminAction.FLUSH, Selection(everything=True), operator="test")
        await store.mark_journal_logged(await store.journal_head())
        lab.scheduler.wake()
        await eventually(lambda: len(lab.events("delivery", status="sent")) == 1, timeout=15.0)
        assert [r for m in sink.messages for r in m.rcpt_tos] == [f"a@{domain}"]


async def test_expired_mail_is_tried_while_held_and_a_delivery_ends_the_hold(
    world: World, tmp_path: Path
) -> None:
    domain = "expiring.test"
    store = store_for(tmp_path)
    async with one_mx(world, tmp_path, domain, "refused", store=store) as (mx, lab):
        first = await send(lab, f"a@{domain}")
        queried = dns_queries(world, domain)

        # Its lifetime over, a message is attempted, held domain or not, and bounces with
        # the failure it met itself; the hold stays.
        store.lifetime = 0.001
        last = await send(lab, f"old@{domain}")
        store.lifetime = 86400
        assert (last["status"], last["held"]) == ("bounced", False)
        assert last["reason"].startswith("delivery time expired; last error: ")
        assert f"connect to {mx.ip}" in last["reason"]
        assert dns_queries(world, domain) > queried
        assert (await send(lab, f"b@{domain}"))["held"] is True

        # The MX is back: an expired message's delivery ends the hold.
        await world.add_mx(f"mx.{domain}", mx.ip, starttls=False)
        store.lifetime = 0.001
        assert (await send(lab, f"late@{domain}"))["status"] == "sent"
        store.lifetime = 86400
        after = await send(lab, f"c@{domain}")
        assert (after["status"], after["held"]) == ("sent", False)
        assert len(lab.events("destination_held")) == 1
        assert first["held"] is False


async def test_a_4xx_greeting_starts_no_hold(world: World, tmp_path: Path) -> None:
    domain = "busy.test"
    async with one_mx(
        world, tmp_path, domain, "greets", b"421 4.3.2 busy, come back later\r\n"
    ) as (mx, lab):
        for n in range(3):
            event = await send(lab, f"u{n}@{domain}")
            assert (event["status"], event["held"]) == ("deferred", False)
            assert "421 4.3.2 busy" in event["reason"]
        assert mx.connections == 3
        assert lab.events("destination_held") == []


async def test_one_mx_refusing_and_another_answering_4xx_starts_no_hold(
    world: World, tmp_path: Path
) -> None:
    domain = "half.test"
    world.mx_record(domain, (10, f"mx1.{domain}"), (20, f"mx2.{domain}"))
    store = store_for(tmp_path)
    async with (
        host(world, f"mx1.{domain}", "refused"),
        host(world, f"mx2.{domain}", "greets", b"421 4.3.2 busy\r\n") as answering,
        scheduler_over(world, tmp_path, store, unreachable_hold=HOLD) as lab,
    ):
        for n in range(3):
            event = await send(lab, f"u{n}@{domain}")
            assert (event["status"], event["held"]) == ("deferred", False)
        assert answering.connections == 3
        assert lab.events("destination_held") == []


async def test_no_hold_when_turned_off(world: World, tmp_path: Path) -> None:
    domain = "nohold.test"
    async with one_mx(world, tmp_path, domain, "closed", unreachable_hold=0) as (mx, lab):
        for n in range(3):
            assert (await send(lab, f"u{n}@{domain}"))["held"] is False
        assert mx.connections == 3
        assert lab.events("destination_held") == []


class JournalCountingStore(SqliteStore):
    """The store, counting its journal reads (the scheduler's looks for a flush)."""

    reads = 0

    async def journal(self, after: int, limit: int = 500) -> list[JournalEntry]:
        self.reads += 1
        return await super().journal(after, limit)


async def test_mail_never_tried_is_held_without_reading_the_journal(
    world: World, tmp_path: Path
) -> None:
    # A flush only makes tried mail due earlier: new mail held behind a down destination
    # costs no journal read; tried mail leased again while held still looks for a flush.
    domain = "quiet-journal.test"
    store = JournalCountingStore(
        tmp_path / "queue.sqlite3", schedule=RetrySchedule((RETRY,)), lifetime=86400
    )
    async with one_mx(world, tmp_path, domain, "refused", store=store) as (mx, lab):
        assert (await send(lab, f"a@{domain}"))["held"] is False  # tried: the hold begins
        reads = store.reads
        for n in range(3):
            assert (await send(lab, f"new{n}@{domain}"))["held"] is True
        assert store.reads == reads
        sink = await world.add_mx(f"mx.{domain}", mx.ip, starttls=False)
        await store.administer(AdminAction.FLUSH, Selection(everything=True), operator="test")
        lab.scheduler.wake()
        await eventually(lambda: len(lab.events("delivery", status="sent")) == 4, timeout=15.0)
        assert store.reads > reads
        assert len(sink.messages) == 4
