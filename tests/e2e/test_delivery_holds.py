"""`sts-relay serve` holds an unreachable destination (delivery.unreachable_hold), and an
operator's `sts-relay queue flush`, run as its own process, ends the hold: mail deferred
while the MX was down is delivered at once after the MX came back.
"""

from __future__ import annotations

import json

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import run_cli
from tests.support.world import World

DOMAIN = "comes-back.test"


async def test_a_held_domain_is_flushed_after_its_mx_came_back(
    world: World, start_relay: StartRelay
) -> None:
    ip = world.allocate_ip()
    world.dns.add(f"mx.{DOMAIN}", "A", ip)  # nothing listens there yet: refused
    world.mx_record(DOMAIN, (10, f"mx.{DOMAIN}"))
    # The documented default hold (60 s) under an hour-long first retry step. One process:
    # each process learns of an unreachable domain on its own (holds.py).
    relay = await start_relay(queue={"retry_schedule": [3600]}, serve={"processes": 1})

    await relay.send([f"a@{DOMAIN}"])
    first = await relay.delivery(f"a@{DOMAIN}", "deferred")
    assert first["held"] is False
    held = await relay.wait_for(lambda e: e["event"] == "destination_held")
    assert (held["domain"], held["level"]) == (DOMAIN, "warning")
    assert f"connect to {ip}" in held["reason"]

    await relay.send([f"b@{DOMAIN}"])
    second = await relay.delivery(f"b@{DOMAIN}", "deferred")
    assert second["held"] is True
    assert second["reason"].startswith(f"not tried: {DOMAIN} unreachable since ")

    sink = await world.add_mx(f"mx.{DOMAIN}", ip, starttls=False)  # back, an hour early
    flushed = await run_cli(relay.config_path, "queue", "flush", "--all", "--json")
    assert (flushed.code, json.loads(flushed.stdout)["count"]) == (0, 2), flushed.stderr
    for rcpt in (f"a@{DOMAIN}", f"b@{DOMAIN}"):
        sent = await relay.delivery(rcpt, "sent", within=10)
        assert sent["attempt"] == 2
    assert sorted(r for m in sink.messages for r in m.rcpt_tos) == [
        f"a@{DOMAIN}",
        f"b@{DOMAIN}",
    ]
    assert len(relay.find(event="destination_held")) == 1
