"""No failing open on our own errors: a serving relay whose policy cache cannot be read.

An `enforce` policy is cached; then the cache table is renamed away through a second SQLite
connection (a real read error in the running relay) and the TXT record and policy host fail,
so nothing can be learnt afresh. Delivering "as without MTA-STS" would hand the mail to
whoever answers for the MX, possibly in the clear; the relay must defer instead, without
contacting the MX at all.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from relay.app import DB_NAME
from tests.e2e.conftest import StartRelay
from tests.support.world import World

DOMAIN = "cached-enforce.test"


def _rename(db: Path, sql: str) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.execute(sql)
        conn.commit()
    finally:
        conn.close()


async def test_unreadable_policy_cache_defers_an_enforce_domain_and_contacts_no_mx(
    world: World, start_relay: StartRelay, tmp_path: Path
) -> None:
    sink = await world.sts_domain(DOMAIN)
    relay = await start_relay()
    await relay.send([f"first@{DOMAIN}"])
    first = await relay.delivery(f"first@{DOMAIN}", "sent")
    assert first["sts_mode"] == "enforce"
    connections = sink.connections

    _rename(tmp_path / "state" / DB_NAME, "ALTER TABLE sts_policies RENAME TO hidden_policies")
    world.dns.fail(f"_mta-sts.{DOMAIN}", "TXT", "servfail")
    # The relay keeps a cached policy in memory and re-reads the cache after 5 s
    # (policy/cache.py); from then on the read fails.
    await asyncio.sleep(6.0)
    await relay.send([f"second@{DOMAIN}"])

    event = await relay.delivery(f"second@{DOMAIN}", "deferred", within=30.0)
    assert "policy cache unreadable" in event["reason"]
    assert event["tls_policy"] == "sts"
    assert sink.connections == connections
    assert [m.rcpt_tos for m in sink.messages] == [[f"first@{DOMAIN}"]]
    assert relay.find(event="delivery", rcpt=f"second@{DOMAIN}", status="sent") == []
