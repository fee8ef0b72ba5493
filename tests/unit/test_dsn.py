"""The DSN writer (RFC 3464 / RFC 6522) and the NOTIFY rules (RFC 3461 §4.1), parsed back
with the standard library. IDs refer to /work/shared/RFC-CHECKLIST.md."""

from __future__ import annotations

import email
import email.policy
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from mailqueue.model import DsnRequest, Lease, LeasedRecipient
from policy.model import TlsRptResult
from relay.delivery.bounce import BounceSettings, bounce_for
from relay.delivery.dsn import MAX_RETURNED_MESSAGE, Action, DsnEntry, build_dsn
from relay.delivery.notify import notices, wants
from relay.delivery.outcome import Bounced, Deferred, Delivered, Hop, Outcome, Reason

ORIGINAL = (
    b"Received: from app by relay\r\nFrom: app@src.test\r\nTo: u@d.test\r\n"
    b"Subject: hello\r\n\r\nsecret body\r\n"
)
WHEN = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
HOP = Hop(mx="mx1.d.test", ip="127.0.0.11", tls="TLSv1.3", verified=True)
REJECTED = Reason("550 5.1.1 no such user", "5.1.1", "550 5.1.1 no such user", HOP)


def _dsn(
    *entries: DsnEntry,
    original: bytes = ORIGINAL,
    envid: str | None = None,
    ret: str | None = None,
    requiretls: bool = False,
) -> email.message.EmailMessage:
    raw = build_dsn(
        reporting_mta="relay.test",
        original_sender="app@src.test",
        original=original,
        entries=entries,
        arrival=WHEN,
        now=WHEN,
        envid=envid,
        ret=ret,
        requiretls=requiretls,
    )
    assert b"\n" not in raw.replace(b"\r\n", b"")
    msg = email.message_from_bytes(raw, policy=email.policy.SMTP)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def _failed(address: str, reason: Reason, orcpt: str | None = None) -> DsnEntry:
    return DsnEntry(address, Action.FAILED, reason, orcpt)


def _status_part(msg: email.message.EmailMessage) -> str:
    return list(msg.iter_parts())[1].as_string()


def test_report_has_three_parts_in_rfc_3464_order() -> None:
    # DSN-11, DSN-12
    msg = _dsn(_failed("u@d.test", REJECTED))
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "app@src.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    status = parts[1].as_string()
    assert "Reporting-MTA: dns; relay.test" in status
    assert "Arrival-Date: " in status
    assert "Final-Recipient: rfc822; u@d.test" in status
    assert "Action: failed" in status
    assert "Status: 5.1.1" in status
    assert "Remote-MTA: dns; mx1.d.test" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user" in status
    assert "Last-Attempt-Date: " in status
    assert "Original-Envelope-Id" not in status
    assert "Will-Retry-Until" not in status
    returned = parts[2].get_payload()
    assert "Subject: hello" in str(returned)
    assert "secret body" not in msg.as_string()


def test_no_remote_mta_when_no_host_was_contacted() -> None:
    # DSN-15
    reason = Reason(text="null.test accepts no mail (null MX)", status="5.1.10")
    status = _status_part(_dsn(_failed("u@null.test", reason)))
    assert "Status: 5.1.10" in status
    assert "Remote-MTA" not in status


def test_every_failed_recipient_is_listed_once() -> None:
    a = _failed("a@d.test", Reason(text="550 no", status="5.0.0", reply="550 no"))
    b = _failed("b@d.test", Reason(text="expired", status="4.4.7"))
    status = _status_part(_dsn(a, b))
    assert status.count("Final-Recipient:") == 2
    assert "Status: 4.4.7" in status


def test_envid_and_orcpt_come_back() -> None:
    # DSN-07, DSN-08
    msg = _dsn(_failed("u@d.test", REJECTED, "rfc822;orig@d.test"), envid="abc+def")
    status = _status_part(msg)
    assert "Original-Envelope-Id: abc+def" in status
    assert "Original-Recipient: rfc822;orig@d.test" in status


def test_envid_cannot_inject_header_lines() -> None:
    status = _status_part(_dsn(_failed("u@d.test", REJECTED), envid="x\r\nAction: delivered"))
    assert "\nAction: delivered" not in status
    assert status.count("\r\nAction:") == 1


@pytest.mark.parametrize("ret", [None, "HDRS"])
def test_default_and_hdrs_return_headers_only(ret: str | None) -> None:
    # DSN-06
    parts = list(_dsn(_failed("u@d.test", REJECTED), ret=ret).iter_parts())
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert "secret body" not in parts[2].as_string()


def test_ret_full_returns_the_whole_message() -> None:
    # DSN-06
    parts = list(_dsn(_failed("u@d.test", REJECTED), ret="FULL").iter_parts())
    assert parts[2].get_content_type() == "message/rfc822"
    (inner,) = parts[2].iter_parts()
    assert inner["Subject"] == "hello"
    assert "secret body" in inner.as_string()


def test_ret_full_over_the_cap_returns_headers_and_says_so() -> None:
    big = ORIGINAL + b"x" * (MAX_RETURNED_MESSAGE + 10) + b"\r\n"
    msg = _dsn(_failed("u@d.test", REJECTED), original=big, ret="FULL")
    parts = list(msg.iter_parts())
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert "only its headers" in parts[0].get_payload()


def test_report_on_a_requiretls_message_never_returns_the_body() -> None:
    # RTLS-07, RFC 8689 §5: RET=FULL is disregarded; the headers come back, the body never.
    msg = _dsn(_failed("u@d.test", REJECTED), ret="FULL", requiretls=True)
    parts = list(msg.iter_parts())
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert "Subject: hello" in parts[2].as_string()
    assert "secret body" not in msg.as_string()
    assert "REQUIRETLS" in parts[0].get_payload()


def test_delayed_report_has_will_retry_until_and_headers_only() -> None:
    # DSN-05
    reason = Reason("mx1.d.test[127.0.0.11] said: 451 busy", "4.2.0", "451 4.2.0 busy", HOP)
    until = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    msg = _dsn(DsnEntry("u@d.test", Action.DELAYED, reason, None, until), ret="FULL")
    assert msg["Subject"].startswith("Delayed Mail")
    status = _status_part(msg)
    assert "Action: delayed" in status
    assert "Status: 4.2.0" in status
    assert "Will-Retry-Until: Sat, 28 Nov 2026 12:00:00 +0000" in status
    assert list(msg.iter_parts())[2].get_content_type() == "text/rfc822-headers"


def test_relayed_report() -> None:
    # DSN-04
    reason = Reason("ok", "2.0.0", "250 2.0.0 OK queued", HOP)
    msg = _dsn(DsnEntry("u@d.test", Action.RELAYED, reason))
    status = _status_part(msg)
    assert "Action: relayed" in status
    assert "Status: 2.0.0" in status
    assert "Remote-MTA: dns; mx1.d.test" in status


def test_mta_sts_failure_is_named_in_the_diagnostic() -> None:
    # DSN-14
    reason = Reason(
        "delivery time expired; last error: TLS with mx1.d.test[127.0.0.11] failed",
        "4.4.7",
        hop=Hop(mx="mx1.d.test", ip="127.0.0.11"),
        tlsrpt=TlsRptResult.CERTIFICATE_NOT_TRUSTED,
    )
    msg = _dsn(_failed("u@d.test", reason))
    status = _status_part(msg)
    assert "Diagnostic-Code: x-sts-relay; MTA-STS: certificate-not-trusted for mx1.d.test" in status
    assert "MTA-STS: certificate-not-trusted" in next(iter(msg.iter_parts())).get_payload()


# --- NOTIFY rules (relay/delivery/notify.py) ---

T0 = 1_000_000.0
DEFERRED = Deferred(Reason("451 busy", "4.2.0", "451 4.2.0 busy", HOP))
BOUNCED = Bounced(REJECTED)
DELIVERED = Delivered(Reason("ok", "2.0.0", "250 2.0.0 OK", HOP))
DELIVERED_DSN_HOP = Delivered(
    Reason("ok", "2.0.0", "250 2.0.0 OK", Hop(mx="mx1.d.test", ip="127.0.0.11", dsn=True))
)


def _lease(
    notify: tuple[str, ...] | None, *, sender: str = "app@src.test", notified: bool = False
) -> Lease:
    dsn = DsnRequest(notify={"u@d.test": notify} if notify is not None else {})
    return Lease(
        queue_id="q1",
        domain="d.test",
        sender=sender,
        recipients=(LeasedRecipient("u@d.test", 3, notified),),
        received_at=T0,
        expires_at=T0 + 432_000,
        until=T0 + 3600,
        dsn=dsn,
    )


def _actions(lease: Lease, outcome: Outcome, waited: float = 0.0) -> list[Action]:
    owed = notices(lease, {"u@d.test": outcome}, now=T0 + waited, delay_notice_after=14_400)
    return [e.action for e in owed.entries]


@pytest.mark.parametrize(
    ("notify", "outcome", "waited", "expected"),
    [
        (None, BOUNCED, 0, [Action.FAILED]),  # DSN-03, DSN-16
        (("FAILURE",), BOUNCED, 0, [Action.FAILED]),
        (("NEVER",), BOUNCED, 0, []),  # DSN-02
        (("SUCCESS",), BOUNCED, 0, []),
        (("SUCCESS",), DELIVERED, 0, [Action.RELAYED]),  # DSN-04
        (("SUCCESS",), DELIVERED_DSN_HOP, 0, []),  # passed on instead
        (None, DELIVERED, 0, []),
        (("FAILURE",), DELIVERED, 0, []),
        (None, DEFERRED, 14_399, []),
        (None, DEFERRED, 14_400, [Action.DELAYED]),  # without NOTIFY: our choice, yes
        (("DELAY", "FAILURE"), DEFERRED, 20_000, [Action.DELAYED]),  # DSN-05
        (("FAILURE",), DEFERRED, 20_000, []),  # DSN-05: without DELAY, none
        (("NEVER",), DEFERRED, 20_000, []),
    ],
)
def test_notify_rules(
    notify: tuple[str, ...] | None, outcome: Outcome, waited: float, expected: list[Action]
) -> None:
    assert _actions(_lease(notify), outcome, waited) == expected


def test_delay_notice_at_most_once_per_recipient() -> None:
    lease = _lease(None)
    owed = notices(lease, {"u@d.test": DEFERRED}, now=T0 + 20_000, delay_notice_after=14_400)
    assert owed.delay_notified == {"u@d.test"}
    assert owed.entries[0].will_retry_until == datetime.fromtimestamp(T0 + 432_000, tz=UTC)
    assert _actions(_lease(None, notified=True), DEFERRED, 20_000) == []


def test_delay_notices_off_with_zero() -> None:
    owed = notices(_lease(None), {"u@d.test": DEFERRED}, now=T0 + 10**6, delay_notice_after=0)
    assert owed.entries == ()


@pytest.mark.parametrize("outcome", [BOUNCED, DEFERRED, DELIVERED])
def test_never_a_report_for_a_null_sender_message(outcome: Outcome) -> None:
    # DSN-10
    assert _actions(_lease(("SUCCESS", "FAILURE", "DELAY"), sender=""), outcome, 10**6) == []


def test_orcpt_travels_into_the_entry() -> None:
    lease = replace(_lease(None), dsn=DsnRequest(orcpt={"u@d.test": "rfc822;orig@d.test"}))
    owed = notices(lease, {"u@d.test": BOUNCED}, now=T0, delay_notice_after=0)
    assert owed.entries[0].original_recipient == "rfc822;orig@d.test"


def test_wants() -> None:
    assert wants(None, "FAILURE")
    assert wants((), "DELAY")
    assert not wants(None, "SUCCESS")
    assert not wants(("NEVER",), "FAILURE")


def test_the_report_on_a_requiretls_message_is_itself_sent_with_requiretls() -> None:
    # RFC 8689 §5: headers only (RET=FULL disregarded), and the report asks REQUIRETLS too.
    settings = BounceSettings(reporting_mta="relay.test", delay_notice_after=0)
    plain = replace(_lease(None), dsn=DsnRequest(ret="FULL"))
    for requiretls in (False, True):
        lease = replace(plain, requiretls=requiretls)
        bounce, _ = bounce_for(lease, ORIGINAL, {"u@d.test": BOUNCED}, now=T0, settings=settings)
        assert bounce is not None
        assert bounce.message.requiretls is requiretls
        assert bounce.message.sender == ""
        assert (b"secret body" in bounce.message.data) is not requiretls
