"""`serve` with several processes (`serve.processes`): a supervisor and its processes on one
store, one port, one log and one metrics endpoint.

- SIGKILL of one process mid-ingest or mid-delivery loses no acknowledged message: the
  supervisor returns its leases at once and starts another, which (or the other process)
  delivers; a message arrives twice only if the MX had it when its process died, and no
  recipient is logged `sent` twice;
- one attempt at a time for a piece of work across processes, even when leases run out;
- SIGHUP reaches every process, SIGTERM stops them all (exit 0), the endpoint adds up the
  processes' figures;
- when the supervisor itself is killed, its processes stop by themselves and the state is
  free for the next `serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import signal
import socket
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import Event, RelayProcess
from tests.e2e.test_crash import (
    CrashMx,
    Ledger,
    body_of,
    crash_world,
    ids_for,
    queued_messages,
    submit,
)
from tests.e2e.test_posture_report import scrape
from tests.e2e.test_service import refuses_connections
from tests.support.waiting import eventually
from tests.support.world import World

TWO = {"processes": 2}


def worker_pids(relay: RelayProcess) -> dict[int, int]:
    """{index: pid} of the processes serving now (the latest start of each index)."""
    pids: dict[int, int] = {}
    for event in relay.events:
        if event["event"] == "process_started":
            pids[event["index"]] = event["pid"]
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def sent_events(events: list[Event]) -> Counter[str]:
    return Counter(e["rcpt"] for e in events if e["event"] == "delivery" and e["status"] == "sent")


async def check_nothing_lost(
    relay: RelayProcess, mx: CrashMx, ledger: Ledger, before_kill: list[tuple[str, bytes]]
) -> None:
    """The relay that lost a process delivers every acknowledged message, intact."""

    def all_acked_arrived() -> bool:
        return ledger.acked <= {msg_id for msg_id, _ in mx.received}

    await eventually(all_acked_arrived, timeout=60, message="every 250'd message arrives")
    state = Path(relay.find(event="started")[0]["state_path"])
    await eventually(lambda: queued_messages(state) == 0, timeout=30, message="queue drains")
    await mx.stop()
    gc.collect()  # what the killed process left in the test's sink is finalized here

    arrived = Counter(msg_id for msg_id, _ in mx.received)
    assert set(arrived) <= ledger.acked | ledger.in_doubt, "a message without 250 arrived"
    assert not set(arrived) & ledger.refused
    for msg_id, data in mx.received:
        body = data.partition(b"\r\n\r\n")[2]
        assert body.rstrip(b"\r\n") == body_of(msg_id, ledger.lines[msg_id]).rstrip(b"\r\n")
    # A second copy only of what the MX had when the process died (SMTP's window).
    pre = {msg_id for msg_id, _ in before_kill}
    duplicates = {m for m, n in arrived.items() if n > 1}
    assert duplicates <= pre, "a message delivered twice that was not in delivery at the kill"
    assert max(arrived.values()) <= 2
    # What a process recorded as sent is never attempted again.
    assert max(sent_events(relay.events).values(), default=1) == 1


async def kill_one_process(relay: RelayProcess, rng: random.Random) -> int:
    index, pid = rng.choice(sorted(worker_pids(relay).items()))
    os.kill(pid, signal.SIGKILL)
    exited = await relay.wait_for(
        lambda e: e["event"] == "process_exited" and e["pid"] == pid, within=10
    )
    assert exited["status"] == "SIGKILL"
    assert exited["restart_in"] is not None
    await relay.wait_for(
        lambda e: e["event"] == "process_started" and e["index"] == index and e["pid"] != pid,
        within=40,
    )
    return pid


# A relay process killed mid-conversation leaves the test's own MX (aiosmtpd, in this
# process) with a connection it may finalize unclosed: a warning about the test's sink, not
# about the relay (which runs in other processes).
SINK_SOCKETS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@SINK_SOCKETS
@pytest.mark.parametrize("seed", [7, 8])
async def test_killing_one_process_mid_ingest_loses_no_accepted_message(
    world: World, start_relay: StartRelay, seed: int
) -> None:
    rng = random.Random(seed)
    mx = await crash_world(world, delay=0.0)
    relay = await start_relay(serve=TWO)
    await eventually(lambda: len(worker_pids(relay)) == 2)
    ledger = Ledger()
    clients = [
        asyncio.create_task(submit(relay, ledger, ids, random.Random(rng.random())))
        for ids in ids_for(f"p{seed}c", clients=8, per_client=60)
    ]
    await eventually(lambda: len(ledger.acked) >= 20, timeout=20)
    await asyncio.sleep(rng.uniform(0.0, 0.5))
    killed = await kill_one_process(relay, rng)
    before_kill = list(mx.received)
    await asyncio.gather(*clients)
    assert ledger.acked
    await check_nothing_lost(relay, mx, ledger, before_kill)
    assert not alive(killed)


def connected_to(pid: int, ip: str, port: int) -> bool:
    """Whether process `pid` holds an established TCP connection to (ip, port): its socket
    inodes (/proc/PID/fd) among the namespace's IPv4 connections (/proc/PID/net/tcp)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    remote = f"{socket.inet_aton(ip)[::-1].hex().upper()}:{port:04X}"
    with contextlib.suppress(OSError), open(f"/proc/{pid}/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if fields[2] == remote and fields[3] == "01" and fields[9] in inodes:
                return True
    return False


@SINK_SOCKETS
async def test_killing_one_process_mid_delivery_loses_nothing(
    world: World, start_relay: StartRelay
) -> None:
    rng = random.Random(9)
    mx = await crash_world(world, delay=1.0)  # slow 250s: deliveries in flight in both
    relay = await start_relay(serve=TWO)
    await eventually(lambda: len(worker_pids(relay)) == 2)
    ledger = Ledger()
    await asyncio.gather(
        *(submit(relay, ledger, ids, random.Random(rng.random())) for ids in ids_for("q", 5, 12))
    )
    assert len(ledger.acked) == 60
    # Both processes in delivery (either may be the one killed), well within the MX's
    # first 1 s hold: no attempt of theirs has ended yet, so each holds leases.
    await eventually(
        lambda: all(connected_to(pid, mx.ip, mx.port) for pid in worker_pids(relay).values()),
        timeout=20,
    )
    await eventually(lambda: len(mx.received) >= 15, timeout=20)
    await kill_one_process(relay, rng)
    before_kill = list(mx.received)
    assert sum(sent_events(relay.events).values()) < 60  # the kill landed during delivery
    exited = relay.find(event="process_exited")[0]
    assert exited["released_leases"] >= 1  # its work went back to the queue at once
    await check_nothing_lost(relay, mx, ledger, before_kill)


class HoldingMx:
    """A plain MX that holds every DATA for `hold` seconds and counts overlapping ones."""

    def __init__(self, ip: str, port: int, hold: float) -> None:
        self.ip, self.port, self.hold = ip, port, hold
        self.active = 0
        self.most_active = 0
        self.attempts = 0
        self._server: asyncio.Server | None = None
        self._released = asyncio.Event()
        self._sessions: list[SMTP] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.attempts += 1
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.hold):
                    await self._released.wait()
        finally:
            self.active -= 1
        return "250 2.0.0 OK"

    def _session(self) -> SMTP:
        smtp = SMTP(self, hostname="mx.hold.test", decode_data=False)
        self._sessions.append(smtp)
        return smtp

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._session, self.ip, self.port)

    async def stop(self) -> None:
        """Stop listening and end every held session (none is left to the collector)."""
        self._released.set()
        if self._server is not None:
            self._server.close()
        for smtp in self._sessions:
            if smtp.transport is not None:
                smtp.transport.close()
        await asyncio.sleep(0)


@pytest.fixture
async def holding(world: World) -> AsyncIterator[HoldingMx]:
    mx = HoldingMx(world.allocate_ip(), world.delivery_port, hold=30.0)
    await mx.start()
    world.dns.add("mx.hold.test", "A", mx.ip)
    world.mx_record("hold.test", (10, "mx.hold.test"))
    yield mx
    await mx.stop()


async def test_one_attempt_at_a_time_across_processes_when_leases_run_out(
    start_relay: StartRelay, holding: HoldingMx
) -> None:
    # Attempts are cut off after 1 s, leases run out after 2.2 s, retries come after 1 s:
    # over 8 s the work is leased again and again, by either process.
    relay = await start_relay(serve=TWO, delivery={"attempt_deadline": 1, "lease_time": 2.2})
    await eventually(lambda: len(worker_pids(relay)) == 2)
    await relay.send(["u@hold.test"])
    await asyncio.sleep(8)
    assert holding.attempts >= 2, "the work was attempted again"
    assert holding.most_active == 1, "two attempts of the same work at once"
    cut = relay.find(event="delivery", rcpt="u@hold.test", status="deferred")
    assert cut
    assert all("delivery.attempt_deadline" in e["reason"] for e in cut)


async def test_signals_reach_every_process_and_the_endpoint_adds_them_up(
    world: World, start_relay: StartRelay
) -> None:
    sink = await world.sts_domain("many.test")
    relay = await start_relay(serve=TWO)
    await eventually(lambda: len(worker_pids(relay)) == 2)
    pids = worker_pids(relay)
    assert relay.find(event="started")[0]["processes"] == 2
    for n in range(12):
        await relay.send([f"u{n}@many.test"])
    await eventually(lambda: len(sink.messages) == 12, timeout=30)
    await eventually(lambda: sum(sent_events(relay.events).values()) == 12)

    metrics = await scrape(relay)
    assert metrics[("sts_relay_messages_received_total", ())] == 12
    assert metrics[("sts_relay_deliveries_total", (("status", "sent"),))] == 12
    assert metrics[("sts_relay_processes", ())] == 2
    # The queue gauges come from one process: not doubled.
    assert metrics[("sts_relay_queue_messages", ())] == 0

    os.kill(relay.pid, signal.SIGHUP)
    await eventually(lambda: len(relay.find(event="reloaded")) == 2, timeout=10)

    assert await relay.stop() == 0
    exits = relay.find(event="process_exited")
    assert {e["pid"] for e in exits} == set(pids.values())
    assert all(e["restart_in"] is None and e["status"] == "exit 0" for e in exits)
    assert relay.find(event="stopped")[0]["abandoned"] == 0
    assert relay.events[-1]["event"] == "stopped"  # the last word, after every exit
    assert not any(alive(pid) for pid in pids.values())


async def test_processes_stop_by_themselves_when_the_supervisor_is_killed(
    world: World, start_relay: StartRelay
) -> None:
    await world.sts_domain("orphan.test")
    relay = await start_relay(serve=TWO, delivery={"shutdown_grace": 2})
    await eventually(lambda: len(worker_pids(relay)) == 2)
    pids = list(worker_pids(relay).values())
    await relay.kill()  # SIGKILL of the supervisor: nothing of it runs
    await eventually(
        lambda: not any(alive(pid) for pid in pids), timeout=20, message="processes exit"
    )
    assert refuses_connections(relay)
    again = await start_relay()  # the state directory is free again
    await again.send(["u@orphan.test"])
    await again.delivery("u@orphan.test", "sent")
