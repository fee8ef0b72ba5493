"""`dns.max_ttl` on a serving relay (issue 11, item 7): an MX answer published with TTL
2^31-1 steers delivery for at most the cap; after it, the changed MX gets the mail."""

from __future__ import annotations

import asyncio

from tests.e2e.conftest import StartRelay
from tests.support.world import World

DOMAIN = "ttl-cap.test"


async def test_a_changed_mx_gets_the_mail_once_the_cap_has_passed(
    start_relay: StartRelay, world: World
) -> None:
    old = await world.add_mx(f"mx-a.{DOMAIN}", world.allocate_ip(), starttls=False)
    new = await world.add_mx(f"mx-b.{DOMAIN}", world.allocate_ip(), starttls=False)
    world.dns.add(DOMAIN, "MX", f"10 mx-a.{DOMAIN}.", ttl=2**31 - 1)
    relay = await start_relay(dns={"max_ttl": 1})

    await relay.send([f"one@{DOMAIN}"])
    assert (await relay.delivery(f"one@{DOMAIN}", "sent"))["mx"] == f"mx-a.{DOMAIN}"

    world.dns.remove(DOMAIN, "MX")
    world.dns.add(DOMAIN, "MX", f"10 mx-b.{DOMAIN}.", ttl=2**31 - 1)
    await asyncio.sleep(1.5)
    await relay.send([f"two@{DOMAIN}"])

    assert (await relay.delivery(f"two@{DOMAIN}", "sent"))["mx"] == f"mx-b.{DOMAIN}"
    assert [m.rcpt_tos for m in old.messages] == [[f"one@{DOMAIN}"]]
    assert [m.rcpt_tos for m in new.messages] == [[f"two@{DOMAIN}"]]
