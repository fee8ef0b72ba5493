"""REQUIRETLS (RFC 8689) end to end: `sts-relay serve` takes a REQUIRETLS message over TLS
and hands it on only to an MX authenticated by DANE or MTA-STS that offers REQUIRETLS
after STARTTLS, passing the option on; else the mail waits and finally bounces with
5.7.30, in a report that carries no body and travels with REQUIRETLS itself.

The lab is the DANE one (`dane.test` signed, unbound validating in front of the lab DNS):
DANE and MTA-STS domains side by side. IDs refer to /work/shared/RFC-CHECKLIST.md.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import RelayProcess
from tests.support.dane_lab import DaneWorld, self_signed, tlsa
from tests.support.waiting import eventually

BODY = b"Subject: for your eyes only\r\n\r\nthe secret body line\r\n"
SHORT_LIFE = {"queue": {"retry_schedule": [1], "lifetime": 3}}


@pytest.fixture
async def world(dane_world: DaneWorld) -> DaneWorld:
    """`start_relay` builds on `world`: here, the DANE lab."""
    return dane_world


def _listener_tls(world: DaneWorld, tmp_path: Path) -> dict[str, Any]:
    """The relay's own certificate (relay.test, from the lab CA): STARTTLS on its port."""
    leaf = world.pki.ca.issue_cert("relay.test")
    cert, key = tmp_path / "relay-cert.pem", tmp_path / "relay-key.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return {"cert_file": str(cert), "key_file": str(key)}


async def _start(
    world: DaneWorld, start_relay: StartRelay, tmp_path: Path, **overrides: dict[str, Any]
) -> RelayProcess:
    return await start_relay(tls=_listener_tls(world, tmp_path), **overrides)


async def _submit(
    world: DaneWorld,
    relay: RelayProcess,
    rcpts: Sequence[str],
    *,
    sender: str = "app@src.test",
    body: bytes = BODY,
    options: Sequence[str] = ("REQUIRETLS",),
) -> None:
    """Submit over STARTTLS, as an application demanding REQUIRETLS does."""
    client = aiosmtplib.SMTP(hostname=relay.host, port=relay.port, start_tls=False, timeout=10)
    async with client:
        await client.starttls(tls_context=world.pki.client_context(), server_hostname="relay.test")
        await client.ehlo()
        assert client.supports_extension("requiretls")
        await client.sendmail(sender, list(rcpts), body, mail_options=list(options))


def _report(data: bytes) -> tuple[list[email.message.EmailMessage], str]:
    msg = email.message_from_bytes(data, policy=email.policy.SMTP)
    assert isinstance(msg, email.message.EmailMessage)
    parts = [p for p in msg.iter_parts() if isinstance(p, email.message.EmailMessage)]
    assert parts[1].get_content_type() == "message/delivery-status"
    return parts, re.sub(r"\r?\n[ \t]+", " ", parts[1].as_string())


async def test_cleartext_client_is_refused_and_starttls_offers_requiretls(
    world: DaneWorld, start_relay: StartRelay, tmp_path: Path
) -> None:
    # RTLS-02: EHLO in cleartext does not offer it, MAIL ... REQUIRETLS gets 530 5.7.10;
    # after STARTTLS it is offered.
    relay = await _start(world, start_relay, tmp_path)
    client = aiosmtplib.SMTP(hostname=relay.host, port=relay.port, start_tls=False, timeout=10)
    async with client:
        await client.ehlo()
        assert client.supports_extension("starttls")
        assert not client.supports_extension("requiretls")
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await client.mail("app@src.test", options=["REQUIRETLS"])
        assert refused.value.code == 530
        assert refused.value.message.startswith("5.7.10 ")
        await client.starttls(tls_context=world.pki.client_context(), server_hostname="relay.test")
        await client.ehlo()
        assert client.supports_extension("requiretls")
    (rejected,) = relay.find(event="rejected", stage="mail")
    assert rejected["code"] == "530 5.7.10"
    assert relay.find(event="received") == []


async def test_dane_mx_offering_requiretls_gets_the_message_with_the_option(
    world: DaneWorld, start_relay: StartRelay, tmp_path: Path
) -> None:
    # RTLS-03 under DANE: the MX name is DNSSEC-secure, the chain matches its TLSA record.
    domain = "rtls-dane.dane.test"
    cert = self_signed([f"mx1.{domain}"], world.certs_dir())
    sink = await world.dane_mx(domain, cert, [tlsa(cert.leaf)], requiretls=True)
    relay = await _start(world, start_relay, tmp_path)
    await _submit(world, relay, [f"u@{domain}"])
    sent = await relay.delivery(f"u@{domain}", "sent")
    assert (sent["tls_policy"], sent["verified"], sent["requiretls"]) == ("dane", True, True)
    (message,) = sink.messages
    assert "REQUIRETLS" in message.mail_options
    assert message.tls_version is not None


async def test_sts_enforce_mx_offering_requiretls_gets_it_on_its_own_connection(
    world: DaneWorld, start_relay: StartRelay, tmp_path: Path
) -> None:
    # RTLS-03 under MTA-STS enforce; a REQUIRETLS message never rides the connection that
    # other mail to the same MX left open in the pool.
    domain = "rtls-sts.test"
    sink = await world.sts_domain(domain, requiretls=True)
    relay = await _start(world, start_relay, tmp_path)
    await _submit(world, relay, [f"plain@{domain}"], options=())
    plain = await relay.delivery(f"plain@{domain}", "sent")
    assert plain["requiretls"] is False
    await _submit(world, relay, [f"u@{domain}"])
    sent = await relay.delivery(f"u@{domain}", "sent")
    assert (sent["tls_policy"], sent["sts_mode"], sent["verified"]) == ("sts", "enforce", True)
    assert sent["requiretls"] is True
    first, second = sink.messages
    assert "REQUIRETLS" not in first.mail_options
    assert "REQUIRETLS" in second.mail_options
    assert sink.connections == 2
    assert not any("REQUIRETLS" in c for c in sink.sessions[0].commands)
    assert any(c.startswith("MAIL") and "REQUIRETLS" in c for c in sink.sessions[1].commands)


async def test_mx_without_requiretls_defers_then_bounces_5_7_30_with_a_report_without_body(
    world: DaneWorld, start_relay: StartRelay, tmp_path: Path
) -> None:
    # RTLS-04, RTLS-07: enforce policy, verified TLS, but no REQUIRETLS after STARTTLS:
    # nothing is sent; at the end of the lifetime, 5.7.30. The report returns headers only
    # (RET=FULL disregarded) and goes out with REQUIRETLS to the sender's own domain,
    # whose MX (DANE) offers it.
    domain = "rtls-missing.test"
    sink = await world.sts_domain(domain)  # STARTTLS and a good certificate; no REQUIRETLS
    sender_domain = "snd.dane.test"
    cert = self_signed([f"mx1.{sender_domain}"], world.certs_dir())
    home = await world.dane_mx(sender_domain, cert, [tlsa(cert.leaf)], requiretls=True)
    relay = await _start(world, start_relay, tmp_path, **SHORT_LIFE)
    sender = f"app@{sender_domain}"
    await _submit(world, relay, [f"u@{domain}"], sender=sender, options=("REQUIRETLS", "RET=FULL"))

    deferred = await relay.delivery(f"u@{domain}", "deferred")
    assert deferred["requiretls"] is True
    assert "REQUIRETLS" in deferred["reason"]
    assert "not offered after STARTTLS" in deferred["reason"]
    assert deferred["tlsrpt_result"] is None  # the TLS session itself was as it should be
    bounced = await relay.delivery(f"u@{domain}", "bounced", within=30)
    assert bounced["reason"].startswith("REQUIRETLS support required")
    assert sink.messages == []
    assert sink.mail_commands == 0
    assert sink.connections >= 1  # it was asked (EHLO after STARTTLS), never given MAIL

    await eventually(lambda: home.messages, timeout=20, message="no report")
    (dsn,) = home.messages
    assert (dsn.mail_from, dsn.rcpt_tos) == ("<>", [sender])
    assert "REQUIRETLS" in dsn.mail_options
    parts, status = _report(dsn.data)
    assert "Action: failed" in status
    assert "Status: 5.7.30" in status
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert b"Subject: for your eyes only" in dsn.data
    assert b"the secret body line" not in dsn.data
    assert world.bounce_sink.messages == []


async def test_opportunistic_only_domain_is_never_contacted_even_with_tls_required_no(
    world: DaneWorld, start_relay: StartRelay, tmp_path: Path
) -> None:
    # RTLS-04, RTLS-06: no MTA-STS, no DANE: no MX qualifies, whatever it offers; the
    # message's TLS-Required: No does not weaken REQUIRETLS.
    domain = "rtls-opportunistic.test"
    sink = await world.sts_domain(domain, mode=None, requiretls=True)
    relay = await _start(world, start_relay, tmp_path)
    body = b"Subject: both\r\nTLS-Required: No\r\n\r\nbody\r\n"
    await _submit(world, relay, [f"u@{domain}"], body=body)
    deferred = await relay.delivery(f"u@{domain}", "deferred")
    assert (deferred["requiretls"], deferred["tls_policy"]) == (True, "none")
    assert deferred["reason"].startswith(f"REQUIRETLS: mx1.{domain} not used")
    assert deferred["mx"] == f"mx1.{domain}"
    assert deferred["ip"] is None
    assert sink.connections == 0
    assert relay.find(event="tls_override") == []


async def test_requiretls_survives_a_restart(
    world: DaneWorld, start_relay: StartRelay, tmp_path: Path
) -> None:
    # RTLS-08: deferred, the relay restarted, the MX now offers REQUIRETLS: the message
    # still goes out only with the option.
    domain = "rtls-restart.test"
    sink = await world.sts_domain(domain)
    relay = await _start(world, start_relay, tmp_path)
    await _submit(world, relay, [f"u@{domain}"])
    await relay.delivery(f"u@{domain}", "deferred")
    assert await relay.stop() == 0
    sink.requiretls = True
    relay = await start_relay()
    sent = await relay.delivery(f"u@{domain}", "sent", within=20)
    assert sent["requiretls"] is True
    (message,) = sink.messages
    assert "REQUIRETLS" in message.mail_options
