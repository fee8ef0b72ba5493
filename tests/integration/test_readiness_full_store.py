"""`/readyz` while the store cannot take writes (issue 11, item 3): a real SQLITE_FULL.

The relay runs in this process against the lab; a full disk is `PRAGMA max_page_count`
held at the file's current size, injected through a subclass of our own writer (as in
test_listener_store.py), since the suite cannot mount a small filesystem. Readiness must
follow what the store meets: 503 once a write failed for want of space, 200 again once a
write would succeed, without waiting for mail to prove it.
"""

from __future__ import annotations

import asyncio
import io
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailqueue.writer import GroupCommitWriter
from relay.app import GatedStore, serve
from relay.config import Config, load_config
from relay.events import EventLog
from tests.support.waiting import eventually, read_events
from tests.support.world import World, to_toml


class Disk:
    full = False


class FullDiskWriter(GroupCommitWriter):
    def _begin(self, conn: sqlite3.Connection) -> None:
        pages = conn.execute("PRAGMA page_count").fetchone()[0] if Disk.full else 1 << 30
        conn.execute(f"PRAGMA max_page_count = {pages}")
        super()._begin(conn)


class Lab:
    def __init__(self, cfg: Config, log: io.StringIO) -> None:
        self.cfg, self.log = cfg, log

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in read_events(self.log.getvalue().splitlines()) if e["event"] == name]

    async def readyz(self) -> tuple[int, str]:
        host, _, port = self.events("metrics_listening")[0]["address"].rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: relay\r\n\r\n")
            async with asyncio.timeout(10):
                raw = await reader.read()
        finally:
            writer.close()
        head, _, body = raw.decode().partition("\r\n\r\n")
        return int(head.split()[1]), body

    async def send(self, body: bytes) -> int:
        host, _, port = self.cfg.listen.addresses[0].rpartition(":")
        async with aiosmtplib.SMTP(hostname=host, port=int(port), start_tls=False) as smtp:
            try:
                await smtp.sendmail("app@src.test", ["u@parked.test"], body)
            except aiosmtplib.SMTPResponseException as exc:
                return exc.code
        return 250


@pytest.fixture
async def lab(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Lab]:
    monkeypatch.setattr(GatedStore, "writer_class", FullDiskWriter)
    monkeypatch.setattr(Disk, "full", False)
    world.dns.fail("parked.test", "MX", "servfail")  # the mail stays queued: no deletes
    path = tmp_path / "relay.toml"
    config = world.relay_config(tmp_path / "state", queue={"retry_schedule": [3600]})
    path.write_text(to_toml(config), encoding="utf-8")
    cfg = load_config(path, {})
    log = io.StringIO()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(cfg, EventLog(log), stop))
    running = Lab(cfg, log)
    await eventually(lambda: running.events("listening"))
    yield running
    stop.set()
    async with asyncio.timeout(30):
        await task


async def test_readyz_is_503_while_the_disk_is_full_and_200_once_it_is_not(lab: Lab) -> None:
    assert await lab.send(b"Subject: small\r\n\r\nhi\r\n") == 250
    assert await lab.readyz() == (200, "ready\n")

    Disk.full = True
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 300
    assert await lab.send(big) == 451
    assert lab.events("store_error")
    status, reason = await lab.readyz()
    assert status == 503
    assert "full" in reason
    assert (await lab.readyz())[0] == 503  # the store's own probe fails too: still full

    Disk.full = False  # space comes back; no mail is needed to notice
    assert await lab.readyz() == (200, "ready\n")
    assert await lab.send(big) == 250
