"""Large messages to slow MX hosts (issue 11, item 10), on a serving relay.

`delivery.attempt_deadline` is shortened below the time the MX needs to read the message:
the attempt is given the message's time on the wire at 32 KiB/s on top, its lease is renewed
to cover that, and the message arrives in one attempt. A transfer slower than even that is
cut off mid-body, deferred, and not sent again before the retry back-off.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import run_cli
from tests.support.slow_mx import SlowMx
from tests.support.world import World

DOMAIN = "slow-mx.test"
SHORT = {"attempt_deadline": 2, "lease_time": 4}  # lease_time >= deadline * 1.1 + 1


def message(size: int) -> bytes:
    line = b"y" * 78 + b"\r\n"
    return b"Subject: large\r\n\r\n" + line * (size // len(line))


async def slow_mx_at(world: World, rate: int) -> SlowMx:
    mx = SlowMx(world.allocate_ip(), world.delivery_port, rate=rate)
    await mx.start()
    world.dns.add(f"mx.{DOMAIN}", "A", mx.ip)
    world.mx_record(DOMAIN, (10, f"mx.{DOMAIN}"))
    return mx


@pytest.fixture
async def stop_later() -> AsyncIterator[list[SlowMx]]:
    servers: list[SlowMx] = []
    yield servers
    for server in servers:
        await server.stop()


async def test_a_large_message_to_a_slow_mx_arrives_in_one_attempt(
    start_relay: StartRelay, world: World, stop_later: list[SlowMx]
) -> None:
    mx = await slow_mx_at(world, rate=256 * 1024)  # 1.5 MiB: about 6 s, 3 times the deadline
    stop_later.append(mx)
    relay = await start_relay(delivery=SHORT)

    await relay.send([f"u@{DOMAIN}"], body=message(3 * 512 * 1024))

    sent = await relay.delivery(f"u@{DOMAIN}", "sent", within=60)
    assert sent["attempt"] == 1
    assert relay.find(event="delivery", status="deferred") == []
    assert mx.sessions == 1
    (transfer,) = mx.transfers
    assert transfer.complete
    assert transfer.received > 3 * 512 * 1024 - 100


async def test_a_transfer_cut_off_mid_body_waits_for_the_retry_back_off(
    start_relay: StartRelay, world: World, stop_later: list[SlowMx]
) -> None:
    mx = await slow_mx_at(world, rate=8 * 1024)  # 128 KiB at 8 KiB/s: 16 s, granted 6
    stop_later.append(mx)
    relay = await start_relay(delivery=SHORT, queue={"retry_schedule": [600]})

    await relay.send([f"u@{DOMAIN}"], body=message(128 * 1024))

    deferred = await relay.delivery(f"u@{DOMAIN}", "deferred", within=30)
    assert deferred["attempt"] == 1
    assert deferred["reason"].startswith("attempt cut off after 6 s (delivery.attempt_deadline")
    (transfer,) = mx.transfers
    assert not transfer.complete
    assert 0 < transfer.received < 128 * 1024

    done = await run_cli(relay.config_path, "queue", "show", deferred["queue_id"], "--json")
    assert done.code == 0, done.stderr
    (rcpt,) = json.loads(done.stdout)["recipients"]
    assert rcpt["state"] == "deferred"
    cut_at = datetime.fromisoformat(deferred["ts"])
    next_attempt = datetime.fromisoformat(rcpt["next_attempt_at"])
    assert next_attempt >= cut_at + timedelta(seconds=500)  # the back-off, not at once
    await asyncio.sleep(2)  # past the lease: nobody sends it again meanwhile
    assert mx.sessions == 1
    assert len(relay.find(event="delivery")) == 1
