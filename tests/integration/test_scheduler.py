"""The scheduler owns in-flight work: against real DNS, real MX servers and a real store.

- A tarpit MX that outlasts a shortened lease: the attempt is cut off at its deadline and
  deferred; no second attempt of the same work starts while the first runs.
- A store that fails after the MX's 250 (a real SQLITE_FULL, injected through a subclass of
  our own writer as tests/integration/test_listener_store.py does): the outcomes are kept
  and committed once the disk has room again; the message is not delivered twice and the
  bounced recipient is not bounced twice, although its lease ran out meanwhile.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from mailqueue.model import DsnRequest, NewMessage
from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite import SqliteStore
from mailqueue.writer import GroupCommitWriter
from tests.support.scheduler_lab import scheduler_over
from tests.support.waiting import eventually
from tests.support.world import World

MESSAGE = b"From: app@src.test\r\nTo: u@d.test\r\nSubject: hi\r\n\r\nHello.\r\n"


class Disk:
    """Whether the store's file may grow (False: a full disk)."""

    full = False


def store_on(disk: Disk, path: Path, retry: float = 300.0) -> SqliteStore:
    class FullDiskWriter(GroupCommitWriter):
        def _begin(self, conn: sqlite3.Connection) -> None:
            pages = conn.execute("PRAGMA page_count").fetchone()[0] if disk.full else 1 << 30
            conn.execute(f"PRAGMA max_page_count = {pages}")
            super()._begin(conn)

    class FullDiskStore(SqliteStore):
        writer_class = FullDiskWriter

    return FullDiskStore(path, schedule=RetrySchedule((retry,)), lifetime=86400)


class Tarpit:
    """An MX that takes the whole message, then answers the final dot only after `delay`."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.connections = 0
        self.bodies = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 tarpit.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    while await reader.readline() not in (b".\r\n", b""):
                        pass
                    self.bodies += 1
                    await asyncio.sleep(self.delay)
                    writer.write(b"250 2.0.0 queued, at last\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                elif verb == b"EHLO":
                    writer.write(b"250-tarpit.test\r\n250 8BITMIME\r\n")
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def until(check: Callable[[], bool]) -> None:
    await eventually(check, timeout=15.0)


async def test_a_tarpit_outlasting_the_lease_gets_one_attempt_cut_off_at_its_deadline(
    world: World, tmp_path: Path
) -> None:
    tarpit = Tarpit(delay=6.0)
    ip = world.allocate_ip()
    server = await asyncio.start_server(tarpit.serve, ip, world.delivery_port)
    world.dns.add("mx.tarpit.test", "A", ip)
    world.mx_record("tarpit.test", (10, "mx.tarpit.test"))
    store = SqliteStore(
        tmp_path / "queue.sqlite3", schedule=RetrySchedule((300.0,)), lifetime=86400
    )
    try:
        async with scheduler_over(world, tmp_path, store, lease_time=2.5, deadline=1.0) as lab:
            await store.put(NewMessage("app@src.test", ("u@tarpit.test",), MESSAGE))
            lab.scheduler.wake()
            await until(lambda: bool(lab.events("delivery", rcpt="u@tarpit.test")))
            # Stay past the lease's end: the work must not be leased and attempted again.
            await asyncio.sleep(3.0)
            (event,) = lab.events("delivery", rcpt="u@tarpit.test")
            assert event["status"] == "deferred"
            assert "attempt cut off after 1 s (delivery.attempt_deadline)" in event["reason"]
            assert tarpit.connections == 1
            assert tarpit.bodies == 1
            (message,) = await store.list_messages()
            (rcpt,) = message.recipients
            assert rcpt.state.value == "deferred"
            assert rcpt.next_attempt_at is not None
            assert rcpt.next_attempt_at > event_time(event) + 200
    finally:
        server.close()


def event_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


async def test_a_store_failure_after_the_mx_accepted_never_delivers_or_bounces_twice(
    world: World, tmp_path: Path
) -> None:
    sink = await world.sts_domain(
        "full.test",
        mode=None,
        rcpt_replies={
            "gone@full.test": "550 5.1.1 no such user",
            "later@full.test": "450 4.2.1 mailbox busy",  # keeps the message (and its pages)
        },
    )
    disk = Disk()
    store = store_on(disk, tmp_path / "queue.sqlite3")
    async with scheduler_over(world, tmp_path, store, lease_time=1.5, deadline=0.5) as lab:
        # RET=FULL: the DSN returns the whole 300 KiB message, which a full disk cannot take.
        big = MESSAGE + (b"y" * 78 + b"\r\n") * 4000
        queue_id = await store.put(
            NewMessage(
                "app@src.test",
                ("ok@full.test", "gone@full.test", "later@full.test"),
                big,
                dsn=DsnRequest(ret="FULL"),
            )
        )
        disk.full = True  # the DSN for gone@ cannot be stored with the outcomes
        lab.scheduler.wake()
        await until(lambda: bool(lab.events("store_error")))
        assert len(sink.messages) == 1
        # The lease runs out while the disk is full; the work must not be attempted again.
        await asyncio.sleep(3.0)
        assert len(sink.messages) == 1
        assert lab.scheduler.in_flight == 1  # its outcomes, kept in memory
        disk.full = False
        await until(lambda: bool(lab.events("bounce_queued", queue_id=queue_id)))
        await until(lambda: len(world.bounce_sink.messages) == 1)
        await asyncio.sleep(1.0)
        assert len(sink.messages) == 1
        assert sink.messages[0].rcpt_tos == ["ok@full.test"]
        assert len(lab.events("bounce_queued", queue_id=queue_id)) == 1
        assert len(world.bounce_sink.messages) == 1
        assert b"gone@full.test" in world.bounce_sink.messages[0].data
        assert len(world.bounce_sink.messages[0].data) > 300_000  # the message came back
        record = await store.get_message(queue_id)
        assert record is not None
        states = {r.address: r.state.value for r in record.recipients}
        assert states == {
            "ok@full.test": "sent",
            "gone@full.test": "bounced",
            "later@full.test": "deferred",
        }
        deliveries = lab.events("delivery", queue_id=queue_id)
        assert sorted((e["rcpt"], e["status"]) for e in deliveries) == [
            ("gone@full.test", "bounced"),
            ("later@full.test", "deferred"),
            ("ok@full.test", "sent"),
        ]
        assert lab.scheduler.in_flight == 0
