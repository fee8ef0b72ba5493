"""The real listener over the real SqliteStore: ids that agree, and storage failures.

A full disk is a real SQLITE_FULL (the file may not grow: `PRAGMA max_page_count`), injected
through a subclass of our own writer, since the suite cannot mount a small filesystem.
"""

from __future__ import annotations

import asyncio
import email
import io
import json
import re
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailqueue.ids import is_queue_id
from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite import SqliteStore
from mailqueue.writer import GroupCommitWriter
from relay.config import load_config, parse_hostport
from relay.events import EventLog
from relay.inbound.listener import Listener

MESSAGE = b"From: app@src.test\r\nTo: u@d.test\r\nSubject: hi\r\n\r\nHello.\r\n"
STORE_FAILED = "4.3.0 Temporary storage failure, try again later"


class Disk:
    """Whether the store's file may grow (False: a full disk)."""

    full = False


def store_on(disk: Disk, path: Path) -> SqliteStore:
    class FullDiskWriter(GroupCommitWriter):
        def _begin(self, conn: sqlite3.Connection) -> None:
            pages = conn.execute("PRAGMA page_count").fetchone()[0] if disk.full else 1 << 30
            conn.execute(f"PRAGMA max_page_count = {pages}")
            super()._begin(conn)

    class FullDiskStore(SqliteStore):
        writer_class = FullDiskWriter

    return FullDiskStore(path, schedule=RetrySchedule((60.0,)), lifetime=3600)


class Lab:
    def __init__(self, listener: Listener, log: io.StringIO) -> None:
        self.listener = listener
        self.log = log

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = (json.loads(line) for line in self.log.getvalue().splitlines())
        return [e for e in lines if e["event"] == name]

    async def send(self, body: bytes = MESSAGE, rcpts: tuple[str, ...] = ("u@d.test",)) -> str:
        """One SMTP session; the reply to DATA ("250 ..." or the error's code and text)."""
        host, port = parse_hostport(self.listener.bound_addresses[0])
        client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)
        async with client:
            try:
                _, reply = await client.sendmail("app@src.test", list(rcpts), body)
            except aiosmtplib.SMTPResponseException as exc:
                return f"{exc.code} {exc.message}"
        return f"250 {reply}"


@asynccontextmanager
async def running(store: SqliteStore) -> AsyncIterator[Lab]:
    environ = {
        "STS_RELAY_LISTEN_ADDRESSES": "127.0.0.1:0",
        "STS_RELAY_LISTEN_HOSTNAME": "relay.test",
    }
    cfg = load_config(None, environ, fqdn=lambda: "relay.test")
    log = io.StringIO()
    listener = Listener(cfg, store=store, events=EventLog(log), on_queued=lambda: None)
    await store.open()
    await listener.start()
    try:
        yield Lab(listener, log)
    finally:
        await listener.stop()
        await store.close()


async def test_received_id_message_id_and_queue_id_agree(tmp_path: Path) -> None:
    store = store_on(Disk(), tmp_path / "q.sqlite3")
    async with running(store) as lab:
        reply = await lab.send()
        queue_id = reply.rsplit(" ", 1)[1]
        data = await store.read_data(queue_id)
    assert is_queue_id(queue_id)
    headers = email.message_from_bytes(data)
    assert re.search(rf"\bid {queue_id}\b", str(headers["Received"]))
    assert str(headers["Message-ID"]).startswith(f"<{queue_id}.")
    assert str(headers["Message-ID"]).endswith("@relay.test>")
    assert lab.events("received")[0]["message_id"] == headers["Message-ID"]


async def test_full_disk_gives_451_stores_nothing_and_recovers(tmp_path: Path) -> None:
    disk = Disk()
    store = store_on(disk, tmp_path / "q.sqlite3")
    async with running(store) as lab:
        kept = (await lab.send()).rsplit(" ", 1)[1]
        disk.full = True
        big = MESSAGE + b"x" * 998 + b"\r\n"
        big = big * 300  # ~300 KiB: needs new pages
        replies = await asyncio.gather(*(lab.send(big, ("a@d.test", "b@e.test")) for _ in range(8)))
        assert replies == [f"451 {STORE_FAILED}"] * 8
        assert [m.queue_id for m in await store.list_messages()] == [kept]
        counts = await store.counts()
        assert (counts["messages"], counts["queued"]) == (1, 1)  # nothing half-stored
        assert len(lab.events("store_error")) == 8
        assert len(lab.events("received")) == 1

        disk.full = False  # space returns: the same running listener accepts again
        reply = await lab.send(big, ("a@d.test", "b@e.test"))
        assert reply.startswith("250 2.0.0 Ok: queued as ")
        queue_id = reply.rsplit(" ", 1)[1]
        assert (await store.read_data(queue_id)).endswith(big[len(MESSAGE) - 8 :])
        record = await store.get_message(queue_id)
        assert record is not None
        assert [r.address for r in record.recipients] == ["a@d.test", "b@e.test"]


async def test_store_that_fails_outright_gives_451_and_the_listener_lives_on(
    tmp_path: Path,
) -> None:
    store = store_on(Disk(), tmp_path / "q.sqlite3")
    async with running(store) as lab:
        await store.close()  # every put now fails: StoreUnavailable
        assert await lab.send() == f"451 {STORE_FAILED}"
        assert lab.events("store_error")[0]["error"] == "queue store is not open"
        await store.open()
        assert (await lab.send()).startswith("250 2.0.0 Ok: queued as ")
        assert (await store.counts())["messages"] == 1


@pytest.mark.parametrize("rcpts", [1, 3])
async def test_concurrent_sessions_each_get_their_own_id(tmp_path: Path, rcpts: int) -> None:
    store = store_on(Disk(), tmp_path / "q.sqlite3")
    to = tuple(f"u{i}@d{i}.test" for i in range(rcpts))
    async with running(store) as lab:
        replies = await asyncio.gather(*(lab.send(MESSAGE, to) for _ in range(20)))
        ids = [r.rsplit(" ", 1)[1] for r in replies]
        assert len(set(ids)) == 20
        assert {m.queue_id for m in await store.list_messages()} == set(ids)
