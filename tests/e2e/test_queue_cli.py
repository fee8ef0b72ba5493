"""`sts-relay queue ...` against a running relay: list, show, flush, hold, release, delete.

The relay runs as a subprocess; the queue commands run as other subprocesses on the same
state directory, as an operator would run them (`docker exec ... sts-relay queue list`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import RelayProcess, run_cli
from tests.support.smtp import MxSink
from tests.support.world import World

DOMAIN = "queue.test"
LATER = "451 4.3.0 come back later"


@dataclass
class Run:
    status: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def summary(self) -> dict[str, Any]:
        """What a change says in JSON, without its details (matched, held, in_flight, ...)."""
        return {k: v for k, v in self.json().items() if k in ("action", "queue_id", "count")}

    def admin_events(self) -> list[dict[str, Any]]:
        lines = (json.loads(line) for line in self.err.splitlines() if line.startswith("{"))
        return [e for e in lines if e.get("event") == "queue_admin"]


async def queue(relay: RelayProcess, *args: str) -> Run:
    done = await run_cli(relay.config_path, "queue", *args)
    return Run(done.code, done.stdout, done.stderr)


async def deferred_relay(world: World, start_relay: StartRelay) -> tuple[RelayProcess, MxSink]:
    sink = await world.sts_domain(DOMAIN, mode=None, starttls=False, data_reply=LATER)
    relay = await start_relay(queue={"retry_schedule": [3600]})
    return relay, sink


async def send_deferred(relay: RelayProcess, rcpt: str) -> str:
    reply = await relay.send([rcpt], body=f"Subject: for {rcpt}\r\n\r\nhi\r\n".encode())
    queue_id = reply.rsplit(" ", 1)[1]
    await relay.delivery(rcpt, "deferred")
    return queue_id


async def test_list_and_show_give_each_recipients_state_attempts_and_last_error(
    world: World, start_relay: StartRelay
) -> None:
    relay, _ = await deferred_relay(world, start_relay)
    queue_id = await send_deferred(relay, f"a@{DOMAIN}")

    listed = await queue(relay, "list", "--json")
    assert listed.status == 0, listed.err
    (msg,) = listed.json()
    assert msg["queue_id"] == queue_id
    assert msg["sender"] == "app@src.test"
    assert msg["held"] is False
    (rcpt,) = msg["recipients"]
    assert rcpt["address"] == f"a@{DOMAIN}"
    assert rcpt["state"] == "deferred"
    assert rcpt["attempts"] == 1
    assert rcpt["next_attempt_at"] > msg["received_at"]  # ISO 8601 UTC strings sort
    assert LATER in rcpt["last_error"]

    shown = await queue(relay, "show", queue_id, "--json")
    assert shown.status == 0
    assert shown.json() == msg
    text = await queue(relay, "list")
    assert queue_id in text.out
    assert "deferred  attempts=1" in text.out
    assert LATER in text.out


async def test_flush_delivers_at_once_while_the_relay_runs(
    world: World, start_relay: StartRelay
) -> None:
    relay, sink = await deferred_relay(world, start_relay)
    queue_id = await send_deferred(relay, f"b@{DOMAIN}")
    sink.data_reply = None  # the receiver is fine again; the next retry is an hour away

    flushed = await queue(relay, "flush", queue_id, "--json")
    assert flushed.status == 0, flushed.err
    assert flushed.summary() == {"action": "flush", "queue_id": queue_id, "count": 1}
    assert flushed.admin_events()[0]["queue_id"] == queue_id
    event = await relay.delivery(f"b@{DOMAIN}", "sent", within=10)
    assert event["attempt"] == 2
    assert [m.rcpt_tos for m in sink.messages] == [[f"b@{DOMAIN}"]]
    assert (await queue(relay, "list", "--json")).json() == []


async def test_hold_keeps_mail_back_until_release_and_is_logged(
    world: World, start_relay: StartRelay
) -> None:
    relay, sink = await deferred_relay(world, start_relay)
    queue_id = await send_deferred(relay, f"c@{DOMAIN}")
    sink.data_reply = None

    held = await queue(relay, "hold", queue_id, "--json")
    assert held.status == 0, held.err
    assert held.summary() == {"action": "hold", "queue_id": queue_id, "count": 1}
    (event,) = held.admin_events()
    assert (event["action"], event["queue_id"], event["level"]) == ("hold", queue_id, "info")
    assert (await queue(relay, "show", queue_id, "--json")).json()["held"] is True
    # A held message is not made due by a flush (all, or this one).
    assert (await queue(relay, "flush", "--json")).json()["count"] == 0
    assert (await queue(relay, "flush", queue_id, "--json")).json()["count"] == 0

    released = await queue(relay, "release", queue_id)
    assert released.status == 0
    assert f"{queue_id}: release done" in released.out
    assert released.admin_events()[0]["action"] == "release"
    assert (await queue(relay, "flush", queue_id, "--json")).json()["count"] == 1
    await relay.delivery(f"c@{DOMAIN}", "sent", within=10)
    assert len(sink.messages) == 1


async def test_delete_removes_mail_for_good_and_is_logged(
    world: World, start_relay: StartRelay
) -> None:
    relay, sink = await deferred_relay(world, start_relay)
    keep = await send_deferred(relay, f"d@{DOMAIN}")
    gone = await send_deferred(relay, f"e@{DOMAIN}")

    deleted = await queue(relay, "delete", gone, "--json")
    assert deleted.status == 0, deleted.err
    assert deleted.summary() == {"action": "delete", "queue_id": gone, "count": 1}
    assert deleted.admin_events()[0]["action"] == "delete"
    assert [m["queue_id"] for m in (await queue(relay, "list", "--json")).json()] == [keep]

    sink.data_reply = None
    assert (await queue(relay, "flush", "--json")).json()["count"] == 1
    await relay.delivery(f"d@{DOMAIN}", "sent", within=10)
    assert [m.rcpt_tos for m in sink.messages] == [[f"d@{DOMAIN}"]]
    assert not relay.find(event="delivery", rcpt=f"e@{DOMAIN}", status="sent")


@pytest.mark.parametrize("action", ["show", "flush", "delete", "hold", "release"])
async def test_unknown_id_is_a_clear_error(
    world: World, start_relay: StartRelay, action: str
) -> None:
    relay, _ = await deferred_relay(world, start_relay)
    run = await queue(relay, action, "NOSUCHID0000", "--json")
    assert run.status == 1
    assert run.err.strip() == "sts-relay: no message NOSUCHID0000 in the queue"
    assert run.json()["error"] == "no message NOSUCHID0000 in the queue"  # --json: errors too
    assert "Traceback" not in run.err


async def test_user_mistakes_end_without_traceback(world: World, start_relay: StartRelay) -> None:
    relay, _ = await deferred_relay(world, start_relay)
    missing = await queue(relay, "delete")
    assert missing.status == 2
    assert "Traceback" not in missing.err
    assert "ID" in missing.err
    unknown = await queue(relay, "purge")
    assert unknown.status == 2
    assert "Traceback" not in unknown.err
