"""Overrides find every domain (issue 11, item 8), on a serving relay: an entry keyed
`bücher.example` decides for mail to `xn--bcher-kva.example`, and the other way round.

The entry is `require-verified` with MX patterns the domain's real MX does not match: when
it applies, the mail is deferred ("not permitted by the tls.overrides entry") and the MX
never hears from the relay; when it does not, the mail goes out in plaintext.
"""

from __future__ import annotations

import aiosmtplib
import pytest

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import RelayProcess
from tests.support.world import World

ULABEL, ALABEL = "bücher.example", "xn--bcher-kva.example"


async def send_utf8(relay: RelayProcess, rcpt: str) -> None:
    """One message; SMTPUTF8 (RFC 6531) since the address may have a U-label domain."""
    client = aiosmtplib.SMTP(hostname=relay.host, port=relay.port, start_tls=False, timeout=10)
    async with client:
        await client.sendmail(
            "app@src.test", [rcpt], b"Subject: idn\r\n\r\nhi\r\n", mail_options=["SMTPUTF8"]
        )


@pytest.mark.parametrize(("entry", "rcpt"), [(ULABEL, ALABEL), (ALABEL, ULABEL)])
async def test_an_override_applies_whichever_form_the_entry_and_the_mail_use(
    start_relay: StartRelay, world: World, entry: str, rcpt: str
) -> None:
    world.mx_record(ALABEL, (10, f"mx1.{ALABEL}"))
    sink = await world.add_mx(f"mx1.{ALABEL}", world.allocate_ip(), starttls=False)
    relay = await start_relay(
        tls={"overrides": [f"{entry}=require-verified match=mx.elsewhere.test"]}
    )

    await send_utf8(relay, f"u@{rcpt}")

    deferred = await relay.delivery(f"u@{rcpt}", "deferred")
    assert deferred["tls_policy"] == "override"
    assert "not permitted by the tls.overrides entry" in deferred["reason"]
    assert sink.connections == 0
    (override,) = relay.find(event="tls_override")
    assert override["override"] == "require-verified"
