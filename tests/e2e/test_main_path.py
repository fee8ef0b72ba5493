"""The main path end to end: accept, queue durably, deliver under MTA-STS.

Each test runs `sts-relay serve` as a subprocess against the lab (real DNS, HTTPS policy
host and STARTTLS MX servers on loopback) and reads its JSON log lines.
"""

from __future__ import annotations

import email
from typing import Any

import aiosmtplib
import pytest

from tests.e2e.conftest import StartRelay
from tests.support.waiting import eventually
from tests.support.world import World


async def test_enforce_with_valid_certificate_delivers_over_verified_tls(
    world: World, start_relay: StartRelay
) -> None:
    sink = await world.sts_domain("enforce-ok.test")
    relay = await start_relay()

    reply = await relay.send(["u@enforce-ok.test"])

    assert "queued as" in reply
    event = await relay.delivery("u@enforce-ok.test", "sent")
    assert event["verified"] is True
    assert event["tls"] in ("TLSv1.2", "TLSv1.3")
    assert event["sts_mode"] == "enforce"
    assert event["policy_id"] == "1"
    assert event["mx"] == "mx1.enforce-ok.test"
    assert event["tlsrpt_result"] is None
    assert event["attempt"] == 1
    (message,) = sink.messages
    assert message.rcpt_tos == ["u@enforce-ok.test"]
    assert message.tls_version is not None
    assert message.sni == "mx1.enforce-ok.test"
    received = relay.find(event="received")
    assert received[0]["rcpts"] == ["u@enforce-ok.test"]
    assert received[0]["message_id"]
    headers = email.message_from_bytes(message.data)
    assert headers["Received"] is not None
    assert headers["Message-ID"] == received[0]["message_id"]
    fetched = relay.find(event="policy_fetched", domain="enforce-ok.test")
    assert fetched[0]["mode"] == "enforce"


ENFORCE_FAILURES: list[tuple[str, dict[str, Any], str]] = [
    ("enforce-wrong-name.test", {"cert_names": ["other.test"]}, "certificate-host-mismatch"),
    ("enforce-untrusted.test", {"cert_kind": "self"}, "certificate-not-trusted"),
    ("enforce-expired.test", {"cert_kind": "expired"}, "certificate-expired"),
    ("enforce-no-starttls.test", {"starttls": False}, "starttls-not-supported"),
]


@pytest.mark.parametrize(("domain", "mx_options", "result"), ENFORCE_FAILURES)
async def test_enforce_failures_defer_and_nothing_reaches_the_mx(
    world: World, start_relay: StartRelay, domain: str, mx_options: dict[str, Any], result: str
) -> None:
    host = f"mx1.{domain}"
    world.mx_record(domain, (10, host))
    sink = await world.add_mx(host, world.allocate_ip(), **mx_options)
    world.publish_policy(domain)
    relay = await start_relay()

    await relay.send([f"u@{domain}"])

    event = await relay.delivery(f"u@{domain}", "deferred")
    assert event["tlsrpt_result"] == result
    assert event["sts_mode"] == "enforce"
    assert event["verified"] is False
    assert sink.messages == []
    assert sink.mail_commands == 0
    assert relay.find(event="delivery", status="sent") == []


async def test_enforce_mx_not_listed_in_policy_is_never_contacted(
    world: World, start_relay: StartRelay
) -> None:
    domain = "enforce-wrong-mx.test"
    sink = await world.sts_domain(domain)
    world.publish_policy(domain, mx=["mx.elsewhere.test"])
    relay = await start_relay()

    await relay.send([f"u@{domain}"])

    event = await relay.delivery(f"u@{domain}", "deferred")
    assert event["tlsrpt_result"] == "validation-failure"
    assert sink.connections == 0


async def test_enforce_bad_preferred_mx_falls_through_to_good_second(
    world: World, start_relay: StartRelay
) -> None:
    domain = "enforce-second-mx.test"
    bad = await world.add_mx(f"mx1.{domain}", world.allocate_ip(), cert_kind="self")
    good = await world.add_mx(f"mx2.{domain}", world.allocate_ip())
    world.mx_record(domain, (10, f"mx1.{domain}"), (20, f"mx2.{domain}"))
    world.publish_policy(domain, mx=[f"mx1.{domain}", f"mx2.{domain}"])
    relay = await start_relay()

    await relay.send([f"u@{domain}"])

    event = await relay.delivery(f"u@{domain}", "sent")
    assert event["mx"] == f"mx2.{domain}"
    assert event["verified"] is True
    assert len(good.messages) == 1
    assert bad.messages == []


async def test_testing_mode_with_bad_certificate_delivers_and_reports(
    world: World, start_relay: StartRelay
) -> None:
    sink = await world.sts_domain("testing-bad-cert.test", mode="testing", cert_kind="self")
    relay = await start_relay()

    await relay.send(["u@testing-bad-cert.test"])

    event = await relay.delivery("u@testing-bad-cert.test", "sent")
    assert event["sts_mode"] == "testing"
    assert event["tlsrpt_result"] == "certificate-not-trusted"
    assert event["verified"] is False
    assert len(sink.messages) == 1


async def test_no_policy_plaintext_mx_delivers(world: World, start_relay: StartRelay) -> None:
    sink = await world.sts_domain("no-policy.test", mode=None, starttls=False)
    relay = await start_relay()

    await relay.send(["u@no-policy.test"])

    event = await relay.delivery("u@no-policy.test", "sent")
    assert event["tls"] is None
    assert event["sts_mode"] is None
    assert event["tlsrpt_result"] is None
    assert sink.messages[0].tls_version is None


async def test_policy_fetch_failure_with_nothing_cached_delivers_opportunistically(
    world: World, start_relay: StartRelay
) -> None:
    domain = "policy-unreachable.test"
    sink = await world.sts_domain(domain, cert_kind="self")
    world.policy_server.misbehave(domain, "refuse")
    relay = await start_relay()

    await relay.send([f"u@{domain}"])

    event = await relay.delivery(f"u@{domain}", "sent")
    assert event["sts_mode"] is None
    assert event["tlsrpt_result"] == "sts-policy-fetch-error"
    assert event["verified"] is False
    assert len(sink.messages) == 1
    failed = relay.find(event="policy_fetch_failed", domain=domain)
    assert failed[0]["result"] == "sts-policy-fetch-error"


async def test_cached_policy_survives_restart_when_txt_and_policy_host_are_gone(
    world: World, start_relay: StartRelay
) -> None:
    domain = "cache-survives.test"
    await world.sts_domain(domain)
    relay = await start_relay()
    await relay.send([f"u@{domain}"])
    await relay.delivery(f"u@{domain}", "sent")
    assert await relay.stop() == 0

    # The attacker's view: TXT gone, policy host gone, an impostor MX with a bad certificate.
    world.dns.remove(f"_mta-sts.{domain}")
    world.policy_server.forget(domain)
    ip = world.sink(f"mx1.{domain}").ip
    await world.remove_mx(f"mx1.{domain}")
    impostor = await world.add_mx(f"mx1.{domain}", ip, cert_kind="self")
    relay = await start_relay()

    await relay.send([f"v@{domain}"])

    event = await relay.delivery(f"v@{domain}", "deferred")
    assert event["tlsrpt_result"] == "certificate-not-trusted"
    assert event["sts_mode"] == "enforce"
    assert impostor.messages == []


async def test_client_outside_trusted_networks_is_refused_and_nothing_queued(
    world: World, start_relay: StartRelay
) -> None:
    await world.sts_domain("refused.test")
    relay = await start_relay(listen={"trusted_networks": ["10.0.0.0/8"]})

    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await relay.send(["u@refused.test"])

    (error,) = refused.value.recipients
    assert error.code == 554
    assert "5.7.1" in error.message
    await relay.wait_for(lambda e: e["event"] == "rejected")
    assert relay.find(event="received") == []
    assert world.messages() == []


async def test_mail_queued_at_restart_is_delivered_after_it(
    world: World, start_relay: StartRelay
) -> None:
    domain = "restart-queue.test"
    world.mx_record(domain, (10, f"mx1.{domain}"))
    ip = world.allocate_ip()
    world.dns.add(f"mx1.{domain}", "A", ip)  # no server yet: connections are refused
    relay = await start_relay(queue={"retry_schedule": [1]})
    await relay.send([f"u@{domain}"])
    await relay.delivery(f"u@{domain}", "deferred")
    assert await relay.stop() == 0

    sink = await world.add_mx(f"mx1.{domain}", ip)
    relay = await start_relay()

    event = await relay.delivery(f"u@{domain}", "sent", within=20)
    assert event["attempt"] >= 2
    assert len(sink.messages) == 1


async def test_permanent_failure_sends_a_dsn_to_the_sender_with_null_sender(
    world: World, start_relay: StartRelay
) -> None:
    domain = "rejects.test"
    await world.sts_domain(domain, rcpt_replies={"gone@rejects.test": "550 5.1.1 no such user"})
    relay = await start_relay()

    await relay.send(["gone@rejects.test"], sender="app@src.test")

    event = await relay.delivery("gone@rejects.test", "bounced")
    assert event["reason"].startswith("550 5.1.1")
    bounce = world.bounce_sink
    await eventually(lambda: bounce.messages, message="no DSN reached the sender's MX")
    dsn = bounce.messages[0]
    assert dsn.mail_from == "<>"
    assert dsn.rcpt_tos == ["app@src.test"]
    parsed = email.message_from_bytes(dsn.data)
    assert parsed.get_content_type() == "multipart/report"
    assert b"Status: 5.1.1" in dsn.data
    assert b"Final-Recipient: rfc822; gone@rejects.test" in dsn.data
