"""Policy change journal: a fetched policy that differs from the cached one is logged as
`policy_changed` by the running relay and kept in the store for `policy history`."""

from __future__ import annotations

import json

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import run_cli
from tests.support.world import World

DOMAIN = "enforce-changes.test"


async def test_a_policy_change_is_logged_and_shown_in_history(
    world: World, start_relay: StartRelay
) -> None:
    await world.sts_domain(DOMAIN)
    world.dns.add(f"mx2.{DOMAIN}", "A", world.sink(f"mx1.{DOMAIN}").ip)
    relay = await start_relay()
    await relay.send([f"a@{DOMAIN}"])
    await relay.delivery(f"a@{DOMAIN}", "sent")
    assert relay.find(event="policy_changed") == []  # a first policy is no change

    # The domain publishes a new policy: new id, testing, one more MX pattern, shorter max_age.
    world.publish_policy(
        DOMAIN, mode="testing", mx=[f"mx1.{DOMAIN}", f"mx2.{DOMAIN}"], max_age=3600, policy_id="2"
    )
    await relay.send([f"b@{DOMAIN}"])
    await relay.delivery(f"b@{DOMAIN}", "sent")
    changed = await relay.wait_for(lambda e: e["event"] == "policy_changed", within=5)
    assert changed["level"] == "warning"  # enforce is no longer in force
    assert changed["domain"] == DOMAIN
    assert changed["changed"] == ["policy_id", "mode", "mx", "max_age"]
    assert (changed["old_policy_id"], changed["old_mode"]) == ("1", "enforce")
    assert (changed["old_mx"], changed["old_max_age"]) == ([f"mx1.{DOMAIN}"], 86400)
    assert (changed["policy_id"], changed["mode"], changed["max_age"]) == ("2", "testing", 3600)
    assert changed["mx"] == [f"mx1.{DOMAIN}", f"mx2.{DOMAIN}"]

    # A new id over the same content is a change too: of the id alone.
    world.publish_policy(
        DOMAIN, mode="testing", mx=[f"mx1.{DOMAIN}", f"mx2.{DOMAIN}"], max_age=3600, policy_id="3"
    )
    await relay.send([f"c@{DOMAIN}"])
    await relay.delivery(f"c@{DOMAIN}", "sent")
    await relay.wait_for(
        lambda e: e["event"] == "policy_changed" and e["policy_id"] == "3", within=5
    )
    assert relay.find(event="policy_changed")[-1]["changed"] == ["policy_id"]

    history = await run_cli(relay.config_path, "policy", "history", DOMAIN.upper(), "--json")
    assert history.code == 0, history.stderr
    shown = json.loads(history.stdout)
    assert shown["domain"] == DOMAIN
    assert "50" in shown["kept"]
    assert "400 days" in shown["kept"]
    first, second, third = shown["changes"]
    assert (first["old"], first["changed"]) == (None, None)
    assert first["new"] == {
        "policy_id": "1",
        "mode": "enforce",
        "mx": [f"mx1.{DOMAIN}"],
        "max_age": 86400,
    }
    assert second["changed"] == ["policy_id", "mode", "mx", "max_age"]
    assert second["old"] == first["new"]
    assert second["new"]["mode"] == "testing"
    assert third["changed"] == ["policy_id"]
    assert first["changed_at"] <= second["changed_at"] <= third["changed_at"]

    text = await run_cli(relay.config_path, "policy", "history", DOMAIN)
    lines = text.stdout.splitlines()
    assert "first seen: id=1 mode=enforce" in lines[0]
    assert "changed policy_id, mode, mx, max_age" in lines[1]
    assert lines[2].strip().startswith("was: id=1 mode=enforce")
    assert lines[3].strip().startswith("now: id=2 mode=testing")
    assert "kept: the newest 50 changes per domain" in text.stderr
