"""Bulk queue work as postsuper/exiqgrep users expect, and admin changes in the relay's log.

The queue commands run as subprocesses on a store holding thousands of messages; the
relay runs as another subprocess where its log stream is the point: every change made
from the command line shows up there as a `queue_admin` event (from the store's journal),
and a flush, release or bounce takes effect at once.
"""

from __future__ import annotations

import asyncio
import getpass
import json
from pathlib import Path
from typing import Any

from mailqueue.model import NewMessage, RcptState, RecipientResult
from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite import SqliteStore
from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import Done, RelayProcess, run_cli
from tests.support.waiting import eventually, read_events
from tests.support.world import World, to_toml

DOMAIN = "queue.test"
LATER = "451 4.3.0 come back later"
PER_DOMAIN = 750
DOMAINS = ("d0.test", "d1.test", "d2.test", "d3.test")


def out(done: Done) -> Any:
    assert "Traceback" not in done.stderr
    return json.loads(done.stdout)


def admin_events(done: Done) -> list[dict[str, Any]]:
    lines = read_events(done.stderr.splitlines(), strict=False)
    return [e for e in lines if e["event"] == "queue_admin"]


async def fill(db: Path) -> None:
    """PER_DOMAIN messages per domain, from two senders; half of them deferred once."""
    store = SqliteStore(db, schedule=RetrySchedule((3600.0,)), lifetime=86400.0)
    await store.open()
    try:
        for n, domain in enumerate(DOMAINS):
            sender = "app@src.test" if n % 2 == 0 else "batch@other.test"
            await asyncio.gather(
                *(
                    store.put(NewMessage(sender, (f"u{i}@{domain}",), b"Subject: x\r\n\r\nx\r\n"))
                    for i in range(PER_DOMAIN)
                )
            )
            if domain in ("d0.test", "d1.test"):
                leases = await store.lease_due("filler", 10 * PER_DOMAIN, 60)
                await asyncio.gather(
                    *(
                        store.record(
                            lease,
                            [
                                RecipientResult(r.address, RcptState.DEFERRED, LATER)
                                for r in lease.recipients
                            ],
                        )
                        for lease in leases
                    )
                )
    finally:
        await store.close()


async def test_bulk_selections_on_thousands_of_messages(
    world: World, tmp_path: Path, start_relay: StartRelay
) -> None:
    state = tmp_path / "state"
    await fill(state / "relay.sqlite3")
    config = tmp_path / "relay.toml"
    config.write_text(to_toml(world.relay_config(state)), encoding="utf-8")

    async def queue(*args: str) -> Done:
        return await run_cli(config, "queue", *args)

    listed = await queue("list", "--domain", "d1.test", "--json")
    assert listed.code == 0
    assert len(out(listed)) == PER_DOMAIN
    assert "750 message(s) match domain=d1.test" in listed.stderr
    deferred = await queue("list", "--state", "deferred", "--json")
    assert len(out(deferred)) == 2 * PER_DOMAIN

    held = await queue("hold", "--domain", "d1.test", "--json")
    assert held.code == 0, held.stderr
    assert {k: out(held)[k] for k in ("selection", "matched", "count")} == {
        "selection": "domain=d1.test",
        "matched": PER_DOMAIN,
        "count": PER_DOMAIN,
    }
    (event,) = admin_events(held)
    assert (event["action"], event["count"], event["queue_id"]) == ("hold", PER_DOMAIN, None)
    assert len(out(await queue("list", "--state", "held", "--json"))) == PER_DOMAIN

    flush_held = await queue("flush", "--state", "held", "--json")
    assert (flush_held.code, out(flush_held)["count"], out(flush_held)["held"]) == (
        0,
        0,
        PER_DOMAIN,
    )
    assert "750 held message(s) left alone" in flush_held.stderr
    released = await queue("release", "--state", "held")
    assert released.code == 0
    assert "750 message(s) released (750 message(s) matched state=held)" in released.stdout

    flushed = await queue("flush", "--all", "--json")
    assert out(flushed)["count"] == 2 * PER_DOMAIN  # the deferred ones; queued ones are due

    deleted = await queue("delete", "--sender", "batch@other.test", "--json")
    assert (out(deleted)["matched"], out(deleted)["count"]) == (2 * PER_DOMAIN, 2 * PER_DOMAIN)
    by_domain = await queue("list", "--sender", "@src.test", "--json")
    assert {m["recipients"][0]["domain"] for m in out(by_domain)} == {"d0.test", "d2.test"}

    bounced = await queue("bounce", "--domain", "d0.test", "--json")
    assert bounced.code == 0, bounced.stderr
    assert (out(bounced)["count"], out(bounced)["dsns"]) == (PER_DOMAIN, PER_DOMAIN)
    reports = out(await queue("list", "--sender", "<>", "--json"))
    assert len(reports) == PER_DOMAIN
    assert {m["recipients"][0]["address"] for m in reports} == {"app@src.test"}
    assert out(await queue("list", "--domain", "d0.test", "--json")) == []

    nothing = await queue("delete", "--domain", "nowhere.test", "--json")
    assert nothing.code == 1
    assert out(nothing)["error"] == "no message matches domain=nowhere.test"
    assert nothing.stderr.strip() == "sts-relay: no message matches domain=nowhere.test"
    empty_list = await queue("list", "--domain", "nowhere.test")
    assert empty_list.code == 1
    assert "no message matches domain=nowhere.test" in empty_list.stderr
    mixed = await queue("delete", "0123456789AB", "--domain", "d2.test")
    assert mixed.code == 2
    bare = await queue("bounce")
    assert (bare.code, "--all" in bare.stderr) == (2, True)

    last = await queue("hold", "--all", "--json")  # nothing is delivered when the relay starts
    assert out(last)["count"] == 2 * PER_DOMAIN

    # Every change above was journaled; a relay started now logs them all, once, in order.
    relay = await start_relay()
    logged = await eventually(lambda: len(relay.find(event="queue_admin")) >= 6 or None)
    assert logged
    actions = [(e["action"], e["selection"], e["count"]) for e in relay.find(event="queue_admin")]
    assert actions == [
        ("hold", "domain=d1.test", PER_DOMAIN),
        ("release", "state=held", PER_DOMAIN),
        ("flush", "all", 2 * PER_DOMAIN),
        ("delete", "sender=batch@other.test", 2 * PER_DOMAIN),
        ("bounce", "domain=d0.test", PER_DOMAIN),
        ("hold", "all", 2 * PER_DOMAIN),
    ]
    assert {e["operator"] for e in relay.find(event="queue_admin")} == {getpass.getuser()}
    assert await relay.stop() == 0
    again = await start_relay()
    await again.wait_for(lambda e: e["event"] == "listening")
    await asyncio.sleep(1.0)
    assert again.find(event="queue_admin") == []  # logged once, not at every start


async def deferred_relay(world: World, start_relay: StartRelay) -> tuple[RelayProcess, Any]:
    sink = await world.sts_domain(DOMAIN, mode=None, starttls=False, data_reply=LATER)
    relay = await start_relay(queue={"retry_schedule": [3600]})
    return relay, sink


async def send_deferred(relay: RelayProcess, rcpt: str) -> str:
    reply = await relay.send([rcpt], body=f"Subject: for {rcpt}\r\n\r\nhi\r\n".encode())
    queue_id = reply.rsplit(" ", 1)[1]
    await relay.delivery(rcpt, "deferred")
    return queue_id


async def test_admin_changes_appear_in_the_running_relays_log_and_act_at_once(
    world: World, start_relay: StartRelay
) -> None:
    relay, sink = await deferred_relay(world, start_relay)
    queue_id = await send_deferred(relay, f"a@{DOMAIN}")
    sink.data_reply = None

    held = await run_cli(relay.config_path, "queue", "hold", queue_id)
    assert held.code == 0
    event = await relay.wait_for(lambda e: e["event"] == "queue_admin", within=5)
    assert event["level"] == "info"
    assert {k: event[k] for k in ("action", "queue_id", "selection", "matched", "count")} == {
        "action": "hold",
        "queue_id": queue_id,
        "selection": f"id={queue_id}",
        "matched": 1,
        "count": 1,
    }
    assert event["operator"] == getpass.getuser()
    assert event["requested_at"] <= event["ts"].replace("Z", "+00:00")
    assert admin_events(held)[0]["queue_id"] == queue_id  # and on the command's stderr

    flush_held = await run_cli(relay.config_path, "queue", "flush", queue_id)
    assert flush_held.code == 1
    assert f"message {queue_id} is held" in flush_held.stderr
    assert f"sts-relay queue release {queue_id}" in flush_held.stderr

    released = await run_cli(relay.config_path, "queue", "release", "--domain", DOMAIN)
    assert released.code == 0
    flushed = await run_cli(relay.config_path, "queue", "flush", "--domain", DOMAIN)
    assert flushed.code == 0
    # The next retry was an hour away: the flush makes it now, within a second or so.
    sent = await relay.delivery(f"a@{DOMAIN}", "sent", within=5)
    assert sent["attempt"] == 2
    logged = [(e["action"], e["selection"]) for e in relay.find(event="queue_admin")]
    assert logged == [
        ("hold", f"id={queue_id}"),
        ("release", f"domain={DOMAIN}"),
        ("flush", f"domain={DOMAIN}"),
    ]


async def test_bounce_gives_up_now_and_reports_to_the_sender(
    world: World, start_relay: StartRelay
) -> None:
    relay, _ = await deferred_relay(world, start_relay)
    queue_id = await send_deferred(relay, f"b@{DOMAIN}")

    bounced = await run_cli(relay.config_path, "queue", "bounce", queue_id, "--json")
    assert bounced.code == 0, bounced.stderr
    assert {k: out(bounced)[k] for k in ("count", "dsns")} == {"count": 1, "dsns": 1}
    event = await relay.wait_for(lambda e: e["event"] == "queue_admin", within=5)
    assert (event["action"], event["queue_id"]) == ("bounce", queue_id)

    await eventually(lambda: world.bounce_sink.messages, timeout=15, message="DSN delivered")
    (dsn,) = world.bounce_sink.messages
    assert dsn.mail_from == "<>"
    assert dsn.rcpt_tos == ["app@src.test"]
    assert b"report-type=delivery-status" in dsn.data
    assert f"Final-Recipient: rfc822; b@{DOMAIN}".encode() in dsn.data
    assert b"Status: 5.0.0" in dsn.data
    assert b"bounced by the operator" in dsn.data
    shown = await run_cli(relay.config_path, "queue", "show", queue_id, "--json")
    assert shown.code == 1  # gone: nothing left to deliver
