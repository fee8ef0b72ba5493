"""Crash safety: SIGKILL the relay at random moments; no 250'd message is ever lost.

Each test runs `sts-relay serve` as a subprocess, submits uniquely numbered messages from
several concurrent clients, kills the relay with SIGKILL at a seeded random moment,
restarts it on the same state directory and checks what the receiving MX got:

- every message that got 250 arrives, intact;
- a message arrives only if it got 250, or if its whole DATA (final dot included) had
  been written when the relay died (the client cannot know whether the commit happened:
  RFC 5321 §6.1 accepts that duplicate, never a loss); a message cut short in DATA, or
  refused, never arrives;
- a message arrives twice only if it was in delivery at the kill: the MX had it, and the
  killed relay had not yet logged it as sent (it logs only after recording the outcome).

One message has one unique recipient, so delivery events map to messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import Event, RelayProcess
from tests.support.waiting import eventually
from tests.support.world import World

DOMAIN = "crash.test"
MX_HOST = f"mx1.{DOMAIN}"
IO_TIMEOUT = 10.0
_ID = re.compile(rb"\r\nX-Crash-Id: (\S+)\r\n")


def body_of(msg_id: str, lines: int) -> bytes:
    """The body a message must arrive with: a chain of hashes of its id, 64 hex a line."""
    digest = hashlib.sha256(msg_id.encode()).digest()
    out = []
    for _ in range(lines):
        digest = hashlib.sha256(digest).digest()
        out.append(digest.hex().encode() + b"\r\n")
    return b"".join(out)


def message_of(msg_id: str, lines: int) -> bytes:
    head = (
        f"From: app@src.test\r\nTo: {msg_id}@{DOMAIN}\r\nSubject: crash {msg_id}\r\n"
        f"X-Crash-Id: {msg_id}\r\nX-Crash-Lines: {lines}\r\n\r\n"
    )
    return head.encode() + body_of(msg_id, lines)


class CrashMx:
    """A plain receiving MX that records each message, then waits `delay` before its 250."""

    def __init__(self, ip: str, port: int, delay: float) -> None:
        self.ip, self.port, self.delay = ip, port, delay
        self.received: list[tuple[str, bytes]] = []  # (crash id, data) in arrival order
        self._server: asyncio.Server | None = None
        self._sessions: list[SMTP] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = bytes(envelope.original_content or b"")
        found = _ID.search(data)
        self.received.append((found.group(1).decode() if found else "?", data))
        if self.delay:
            await asyncio.sleep(self.delay)  # stored on the MX, its 250 not yet sent
        return "250 2.0.0 OK"

    def _session(self) -> SMTP:
        smtp = SMTP(self, hostname=MX_HOST, decode_data=False)
        self._sessions.append(smtp)
        return smtp

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._session, self.ip, self.port)

    async def stop(self) -> None:
        """Stop listening and end the sessions still open (a killed relay's among them:
        none is left for the collector to find unclosed in a later test)."""
        for smtp in self._sessions:
            if smtp.transport is not None:
                smtp.transport.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()


@dataclass
class Ledger:
    """What each client knows about each message it tried."""

    lines: dict[str, int] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)  # 250 after DATA
    in_doubt: set[str] = field(default_factory=set)  # final dot written, no reply seen
    refused: set[str] = field(default_factory=set)  # any other reply after DATA


async def _reply(reader: asyncio.StreamReader) -> str:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line.decode()


async def _command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str, expect: str
) -> None:
    writer.write(line.encode() + b"\r\n")
    await writer.drain()
    reply = await _reply(reader)
    if not reply.startswith(expect):
        raise ConnectionError(f"{line}: {reply}")


async def submit(
    relay: RelayProcess, ledger: Ledger, msg_ids: list[str], rng: random.Random
) -> None:
    """Send `msg_ids` in one session until done or the relay dies; record what happened."""
    async with asyncio.timeout(IO_TIMEOUT * 3):
        reader, writer = await asyncio.open_connection(relay.host, relay.port)
    try:
        async with asyncio.timeout(IO_TIMEOUT * 3):
            await _reply(reader)
            await _command(reader, writer, "EHLO crash-client.test", "250")
            for msg_id in msg_ids:
                await _send_one(reader, writer, ledger, msg_id, rng)
    except (ConnectionError, OSError):
        pass  # the relay was killed
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            async with asyncio.timeout(2):
                await writer.wait_closed()


async def _send_one(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    ledger: Ledger,
    msg_id: str,
    rng: random.Random,
) -> None:
    lines = rng.randint(2, 900)  # up to ~60 KiB: a kill can land in the middle of DATA
    ledger.lines[msg_id] = lines
    await _command(reader, writer, "MAIL FROM:<app@src.test>", "250")
    await _command(reader, writer, f"RCPT TO:<{msg_id}@{DOMAIN}>", "250")
    await _command(reader, writer, "DATA", "354")
    data = message_of(msg_id, lines)
    for start in range(0, len(data), 16384):
        writer.write(data[start : start + 16384])
        await writer.drain()
        await asyncio.sleep(0)
    ledger.in_doubt.add(msg_id)
    writer.write(b".\r\n")
    await writer.drain()
    reply = await _reply(reader)
    ledger.in_doubt.discard(msg_id)
    (ledger.acked if reply.startswith("250") else ledger.refused).add(msg_id)


def sent_rcpts(events: list[Event]) -> set[str]:
    return {e["rcpt"] for e in events if e["event"] == "delivery" and e["status"] == "sent"}


def queued_messages(state: Path) -> int:
    conn = sqlite3.connect(f"file:{state / 'relay.sqlite3'}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM queue_messages").fetchone()[0])
    finally:
        conn.close()


async def crash_world(world: World, delay: float) -> CrashMx:
    mx = CrashMx(world.allocate_ip(), world.delivery_port, delay)
    await mx.start()
    world.mx_record(DOMAIN, (10, MX_HOST))
    world.dns.add(MX_HOST, "A", mx.ip)
    return mx


async def check_after_restart(
    start_relay: StartRelay,
    mx: CrashMx,
    ledger: Ledger,
    killed: RelayProcess,
    before_kill: list[tuple[str, bytes]],
    state: Path,
) -> None:
    relay = await start_relay()
    assert relay.find(event="started")

    def all_acked_arrived() -> bool:
        return ledger.acked <= {msg_id for msg_id, _ in mx.received}

    await eventually(all_acked_arrived, timeout=30, message="every 250'd message arrives")
    await eventually(lambda: queued_messages(state) == 0, timeout=30, message="queue drains")
    await mx.stop()  # nothing arrives after this point

    arrived = Counter(msg_id for msg_id, _ in mx.received)
    assert set(arrived) <= ledger.acked | ledger.in_doubt, "a message without 250 arrived"
    assert not set(arrived) & ledger.refused
    for msg_id, data in mx.received:
        head, sep, body = data.partition(b"\r\n\r\n")
        assert sep, f"{msg_id}: no header/body separator"
        assert body.rstrip(b"\r\n") == body_of(msg_id, ledger.lines[msg_id]).rstrip(b"\r\n"), (
            f"{msg_id} arrived cut short or altered"
        )
        assert f"\r\nX-Crash-Id: {msg_id}\r\n".encode() in head

    pre = Counter(msg_id for msg_id, _ in before_kill)
    post = arrived - pre
    assert max(pre.values(), default=1) == 1, "duplicate before the kill"
    assert max(post.values(), default=1) == 1, "duplicate after the restart"
    sent_by_killed = sent_rcpts(killed.events)
    in_delivery = {m for m in pre if f"{m}@{DOMAIN}" not in sent_by_killed}
    duplicates = {m for m, n in arrived.items() if n > 1}
    assert duplicates <= in_delivery, "a message recorded as sent was delivered again"
    assert not sent_rcpts(relay.events) & sent_by_killed


def ids_for(tag: str, clients: int, per_client: int) -> list[list[str]]:
    return [[f"{tag}{c:02d}n{n:04d}" for n in range(per_client)] for c in range(clients)]


@pytest.mark.parametrize("seed", [11, 22, 33])
async def test_kill_during_ingest_loses_no_accepted_message(
    world: World, start_relay: StartRelay, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    mx = await crash_world(world, delay=0.0)
    relay = await start_relay()
    ledger = Ledger()
    clients = [
        asyncio.create_task(submit(relay, ledger, ids, random.Random(rng.random())))
        for ids in ids_for(f"i{seed}c", clients=8, per_client=400)
    ]
    await eventually(lambda: len(ledger.acked) >= 5, timeout=20)
    await asyncio.sleep(rng.uniform(0.0, 1.0))  # a random point in the middle of the load
    await relay.kill()
    before_kill = list(mx.received)
    await asyncio.gather(*clients)
    assert ledger.acked

    await check_after_restart(start_relay, mx, ledger, relay, before_kill, tmp_path / "state")


@pytest.mark.parametrize("seed", [44, 55, 66])
async def test_kill_during_delivery_loses_nothing_and_duplicates_only_in_flight(
    world: World, start_relay: StartRelay, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    mx = await crash_world(world, delay=0.3)  # slow 250s: many deliveries in flight
    relay = await start_relay()
    ledger = Ledger()
    batches = ids_for(f"d{seed}c", clients=5, per_client=12)
    await asyncio.gather(
        *(submit(relay, ledger, ids, random.Random(rng.random())) for ids in batches)
    )
    assert len(ledger.acked) == 60
    target = rng.randint(1, 45)
    await eventually(lambda: len(mx.received) >= target, timeout=20)
    await relay.kill()
    before_kill = list(mx.received)
    assert len(sent_rcpts(relay.events)) < 60  # the kill did land during delivery

    await check_after_restart(start_relay, mx, ledger, relay, before_kill, tmp_path / "state")
