"""RFC 8689 `TLS-Required: No` end to end: the message's own waiver of the recipient
domain's MTA-STS policy, for application mail and for the relay's TLS reports.
IDs refer to /work/shared/RFC-CHECKLIST.md (RTLS-05, RTLS-06).
"""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import run_cli
from tests.support.waiting import eventually
from tests.support.world import World


def _body(tls_required: str) -> bytes:
    return f"Subject: waiver\r\nTLS-Required: {tls_required}\r\n\r\nhello\r\n".encode()


async def test_tls_required_no_delivers_over_unverified_tls_and_logs_the_override(
    world: World, start_relay: StartRelay
) -> None:
    # RTLS-05: enforce policy, self-signed certificate: delivered, TLS but not verified.
    domain = "rtls-self.test"
    sink = await world.sts_domain(domain, cert_kind="self")
    relay = await start_relay()

    await relay.send([f"u@{domain}"], body=_body("no"))

    event = await relay.delivery(f"u@{domain}", "sent")
    assert event["tls"] in ("TLSv1.2", "TLSv1.3")
    assert event["verified"] is False
    assert event["sts_mode"] == "enforce"
    (override,) = relay.find(event="tls_override", domain=domain)
    assert override["override"] == "tls-required-no"
    assert override["decision"] == "opportunistic"
    assert override["queue_id"] == event["queue_id"]
    (message,) = sink.messages
    assert message.tls_version is not None
    assert b"\r\nTLS-Required: no\r\n" in message.data


async def test_tls_required_no_delivers_in_plaintext_without_starttls(
    world: World, start_relay: StartRelay
) -> None:
    # RTLS-05: the MX offers no STARTTLS at all: still delivered, in plaintext.
    domain = "rtls-plain.test"
    sink = await world.sts_domain(domain, starttls=False)
    relay = await start_relay()

    await relay.send([f"u@{domain}"], body=_body("No"))

    event = await relay.delivery(f"u@{domain}", "sent")
    assert event["tls"] is None
    assert event["verified"] is False
    assert len(sink.messages) == 1
    assert relay.find(event="tls_override", domain=domain)


async def test_tls_required_other_value_is_not_honoured(
    world: World, start_relay: StartRelay
) -> None:
    # RTLS-06: only "No" waives the policy; "maybe" leaves enforce in force.
    domain = "rtls-maybe.test"
    sink = await world.sts_domain(domain, cert_kind="self")
    relay = await start_relay()

    await relay.send([f"u@{domain}"], body=_body("maybe"))

    event = await relay.delivery(f"u@{domain}", "deferred")
    assert event["tlsrpt_result"] == "certificate-not-trusted"
    assert sink.messages == []
    assert relay.find(event="tls_override") == []


async def test_tls_report_reaches_a_reporting_domain_whose_tls_is_broken(
    world: World, start_relay: StartRelay, tmp_path: Path
) -> None:
    # RFC 8460 §3: reports carry TLS-Required: No so that they reach a domain whose TLS
    # is broken; here the reporting mailbox sits behind the very MX that fails enforce.
    domain = "rtls-report.test"
    mailbox = await world.sts_domain(domain, cert_kind="self")
    world.dns.txt(f"_smtp._tls.{domain}", f"v=TLSRPTv1; rua=mailto:tlsrpt@{domain}")
    relay = await start_relay()
    await relay.send([f"u@{domain}"])
    await relay.delivery(f"u@{domain}", "deferred")
    assert await relay.stop() == 0

    sent_now = await run_cli(tmp_path / "relay.toml", "tlsrpt", "send", "--day", "today")
    assert sent_now.code == 0, sent_now.stdout + sent_now.stderr
    relay = await start_relay()

    await eventually(lambda: len(mailbox.messages) == 1, timeout=20)
    (report,) = mailbox.messages
    assert report.rcpt_tos == [f"tlsrpt@{domain}"]
    assert report.tls_version is not None
    sent = await relay.delivery(f"tlsrpt@{domain}", "sent")
    assert sent["verified"] is False
    assert relay.find(event="tls_override", override="tls-required-no", domain=domain)
