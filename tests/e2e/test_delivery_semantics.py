"""Delivery semantics end to end (issue 4): expiry after a fresh policy check, RFC 3461
NOTIFY/RET/ENVID/ORCPT honoured, delay notices, a stalled MX not holding up others.

`sts-relay serve` runs as a subprocess against the lab; assertions read its JSON log, the
DNS server's query log and what the MX sinks (and the sender's MX, the bounce sink) got.
IDs refer to /work/shared/RFC-CHECKLIST.md.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import re
from collections.abc import Sequence

import aiosmtplib

from tests.conftest import SilentHost
from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import RelayProcess
from tests.support.smtp import ReceivedMessage
from tests.support.waiting import eventually
from tests.support.world import World

SENDER = "app@src.test"
BODY = b"Subject: semantics\r\n\r\nhello\r\n"


async def _submit(
    relay: RelayProcess,
    rcpts: Sequence[str],
    *,
    mail_options: Sequence[str] = (),
    rcpt_options: Sequence[str] = (),
) -> None:
    client = aiosmtplib.SMTP(hostname=relay.host, port=relay.port, start_tls=False, timeout=10)
    async with client:
        await client.sendmail(
            SENDER,
            list(rcpts),
            BODY,
            mail_options=list(mail_options),
            rcpt_options=list(rcpt_options),
        )


def _report(dsn: ReceivedMessage) -> tuple[email.message.EmailMessage, str]:
    msg = email.message_from_bytes(dsn.data, policy=email.policy.SMTP)
    assert isinstance(msg, email.message.EmailMessage)
    parts = list(msg.iter_parts())
    assert parts[1].get_content_type() == "message/delivery-status"
    # Unfold: the fields are header-like and long ones are folded when re-serialised.
    return msg, re.sub(r"\r?\n[ \t]+", " ", parts[1].as_string())


def _last_index(queries: list[tuple[str, str]], name: str, rtype: str) -> int:
    hits = [i for i, q in enumerate(queries) if q == (name, rtype)]
    return hits[-1] if hits else -1


# --- lifetime, bounce and the policy re-check (RFC 8461 §5.1) -----------------------

SHORT_LIFE = {"queue": {"retry_schedule": [1], "lifetime": 3}}


async def test_policy_changed_to_none_before_expiry_delivers_without_dsn(
    world: World, start_relay: StartRelay
) -> None:
    domain = "recheck-none.test"
    sink = await world.sts_domain(domain, cert_kind="self")
    relay = await start_relay(**SHORT_LIFE)
    await relay.send([f"u@{domain}"])
    deferred = await relay.delivery(f"u@{domain}", "deferred")
    assert deferred["tlsrpt_result"] == "certificate-not-trusted"
    assert sink.messages == []

    world.publish_policy(domain, mode="none", policy_id="2")

    sent = await relay.delivery(f"u@{domain}", "sent", within=20)
    assert sent["sts_mode"] == "none"
    assert sent["policy_id"] == "2"
    assert len(sink.messages) == 1
    assert relay.find(event="delivery", rcpt=f"u@{domain}", status="bounced") == []
    assert relay.find(event="bounce_queued") == []
    assert world.bounce_sink.messages == []


async def test_expiry_under_enforce_bounces_4_4_7_after_a_fresh_txt_lookup(
    world: World, start_relay: StartRelay
) -> None:
    # DSN-14, STS-xx (§5.1): the DSN names the MTA-STS failure.
    domain = "recheck-same.test"
    sink = await world.sts_domain(domain, cert_kind="self")
    relay = await start_relay(**SHORT_LIFE)
    await relay.send([f"u@{domain}"])

    bounced = await relay.delivery(f"u@{domain}", "bounced", within=30)

    assert bounced["tlsrpt_result"] == "certificate-not-trusted"
    assert bounced["sts_mode"] == "enforce"
    assert bounced["attempt"] >= 2
    assert sink.messages == []
    # The last thing done before the bounce was a TXT lookup after the last MX contact.
    queries = world.dns.queries
    last_txt = _last_index(queries, f"_mta-sts.{domain}", "TXT")
    last_mx_address = _last_index(queries, f"mx1.{domain}", "A")
    assert last_txt > last_mx_address >= 0
    await eventually(lambda: world.bounce_sink.messages, message="no DSN")
    (dsn,) = world.bounce_sink.messages
    assert dsn.mail_from == "<>"
    assert dsn.rcpt_tos == [SENDER]
    _, status = _report(dsn)
    assert "Action: failed" in status
    assert "Status: 4.4.7" in status
    assert f"MTA-STS: certificate-not-trusted for mx1.{domain}" in status


# --- NOTIFY, RET, ENVID, ORCPT (RFC 3461) -------------------------------------------


async def test_notify_never_sends_no_dsn(world: World, start_relay: StartRelay) -> None:
    # DSN-02
    domain = "never.test"
    await world.sts_domain(domain, rcpt_replies={f"gone@{domain}": "550 5.1.1 no such user"})
    relay = await start_relay()
    await _submit(relay, [f"gone@{domain}"], rcpt_options=["NOTIFY=NEVER"])
    event = await relay.delivery(f"gone@{domain}", "bounced")
    assert event["reason"].startswith("550 5.1.1")
    assert relay.find(event="bounce_queued") == []
    assert world.bounce_sink.messages == []


async def test_failure_dsn_carries_envid_orcpt_and_full_message(
    world: World, start_relay: StartRelay
) -> None:
    # DSN-06, DSN-07, DSN-08, DSN-12
    domain = "full.test"
    await world.sts_domain(domain, rcpt_replies={f"gone@{domain}": "550 5.1.1 no such user"})
    relay = await start_relay()
    await _submit(
        relay,
        [f"gone@{domain}"],
        mail_options=["RET=FULL", "ENVID=abc+2Bdef"],
        rcpt_options=["NOTIFY=FAILURE", f"ORCPT=rfc822;orig@{domain}"],
    )
    await eventually(lambda: world.bounce_sink.messages, message="no DSN")
    msg, status = _report(world.bounce_sink.messages[0])
    assert "Original-Envelope-Id: abc+def" in status
    assert f"Original-Recipient: rfc822;orig@{domain}" in status
    assert f"Remote-MTA: dns; mx1.{domain}" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user" in status
    returned = list(msg.iter_parts())[2]
    assert returned.get_content_type() == "message/rfc822"
    assert "hello" in returned.as_string()


async def test_notify_success_to_mx_without_dsn_sends_a_relayed_dsn(
    world: World, start_relay: StartRelay
) -> None:
    # DSN-04
    domain = "relayed.test"
    await world.sts_domain(domain)
    relay = await start_relay()
    await _submit(relay, [f"u@{domain}"], rcpt_options=["NOTIFY=SUCCESS"])
    await relay.delivery(f"u@{domain}", "sent")
    await eventually(lambda: world.bounce_sink.messages, message="no relayed DSN")
    (dsn,) = world.bounce_sink.messages
    assert dsn.mail_from == "<>"
    _, status = _report(dsn)
    assert "Action: relayed" in status
    assert "Status: 2.0.0" in status


async def test_notify_success_to_mx_with_dsn_passes_parameters_on(
    world: World, start_relay: StartRelay
) -> None:
    # DSN-04
    domain = "passes-on.test"
    sink = await world.sts_domain(domain, dsn=True)
    relay = await start_relay()
    await _submit(
        relay,
        [f"u@{domain}"],
        mail_options=["RET=HDRS", "ENVID=e1"],
        rcpt_options=["NOTIFY=SUCCESS,DELAY", f"ORCPT=rfc822;orig@{domain}"],
    )
    await relay.delivery(f"u@{domain}", "sent")
    (message,) = sink.messages
    assert {"RET=HDRS", "ENVID=e1"} <= set(message.mail_options)
    assert message.rcpt_options == ["NOTIFY=SUCCESS,DELAY", f"ORCPT=rfc822;orig@{domain}"]
    assert relay.find(event="bounce_queued") == []
    assert world.bounce_sink.messages == []


# --- delay notices (RFC 3461 §4.1, DSN-05) ------------------------------------------

DELAYS = {"queue": {"retry_schedule": [1], "lifetime": 600, "delay_notice_after": 1}}


async def _refused_domain(world: World, domain: str) -> None:
    world.mx_record(domain, (10, f"mx1.{domain}"))
    world.dns.add(f"mx1.{domain}", "A", world.allocate_ip())  # nothing listens there


async def test_one_delay_notice_per_recipient(world: World, start_relay: StartRelay) -> None:
    domain = "delayed.test"
    await _refused_domain(world, domain)
    relay = await start_relay(**DELAYS)
    await _submit(relay, [f"u@{domain}"], rcpt_options=["NOTIFY=DELAY,FAILURE"])
    await relay.wait_for(
        lambda e: e["event"] == "delivery" and e["rcpt"] == f"u@{domain}" and e["attempt"] >= 4,
        within=30,
    )
    assert len(relay.find(event="bounce_queued")) == 1
    await eventually(lambda: world.bounce_sink.messages, message="no delay DSN")
    msg, status = _report(world.bounce_sink.messages[0])
    assert msg["Subject"].startswith("Delayed Mail")
    assert "Action: delayed" in status
    assert "Status: 4.4.1" in status
    assert "Will-Retry-Until: " in status
    assert len(world.bounce_sink.messages) == 1


async def test_no_delay_notice_without_delay_in_notify(
    world: World, start_relay: StartRelay
) -> None:
    domain = "not-delayed.test"
    await _refused_domain(world, domain)
    relay = await start_relay(**DELAYS)
    await _submit(relay, [f"u@{domain}"], rcpt_options=["NOTIFY=FAILURE"])
    await relay.wait_for(
        lambda e: e["event"] == "delivery" and e["rcpt"] == f"u@{domain}" and e["attempt"] >= 3,
        within=30,
    )
    assert relay.find(event="bounce_queued") == []


# --- a stalled MX does not hold up other deliveries (issue 4 §5, SMTP-13) ------------


async def test_stalled_mx_does_not_hold_up_another_domain(
    world: World, start_relay: StartRelay, silent_ip: SilentHost
) -> None:
    ip, _ = silent_ip
    world.mx_record("stalled.test", (10, "mx1.stalled.test"))
    world.dns.add("mx1.stalled.test", "A", ip)
    good = await world.sts_domain("flowing.test")
    relay = await start_relay(delivery={"connect_timeout": 3})
    for i in range(5):
        await relay.send([f"u{i}@stalled.test"])
    await relay.send(["u@flowing.test"])

    await relay.delivery("u@flowing.test", "sent")
    await relay.wait_for(
        lambda e: e["event"] == "delivery" and e["domain"] == "stalled.test", within=20
    )
    order = [e for e in relay.events if e["event"] == "delivery"]
    first_stalled = next(i for i, e in enumerate(order) if e["domain"] == "stalled.test")
    sent = next(i for i, e in enumerate(order) if e["rcpt"] == "u@flowing.test")
    assert sent < first_stalled
    assert len(good.messages) == 1
