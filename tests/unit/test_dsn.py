"""The DSN writer (RFC 3464 / RFC 6522), parsed back with the standard library."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime

from relay.delivery.outcome import Hop, Reason
from relay.dsn import FailedRecipient, build_dsn

ORIGINAL = (
    b"Received: from app by relay\r\nFrom: app@src.test\r\nTo: u@d.test\r\n"
    b"Subject: hello\r\n\r\nsecret body\r\n"
)
WHEN = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _dsn(*failed: FailedRecipient) -> email.message.EmailMessage:
    raw = build_dsn(
        reporting_mta="relay.test",
        original_sender="app@src.test",
        original=ORIGINAL,
        failed=failed,
        arrival=WHEN,
        now=WHEN,
    )
    assert b"\n" not in raw.replace(b"\r\n", b"")
    msg = email.message_from_bytes(raw, policy=email.policy.SMTP)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_report_has_three_parts_in_rfc_3464_order() -> None:
    reason = Reason(
        text="550 5.1.1 no such user",
        status="5.1.1",
        reply="550 5.1.1 no such user",
        hop=Hop(mx="mx1.d.test", ip="127.0.0.11"),
    )
    msg = _dsn(FailedRecipient("u@d.test", reason))
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "app@src.test"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    status = parts[1].as_string()
    assert "Reporting-MTA: dns; relay.test" in status
    assert "Final-Recipient: rfc822; u@d.test" in status
    assert "Action: failed" in status
    assert "Status: 5.1.1" in status
    assert "Remote-MTA: dns; mx1.d.test" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user" in status
    returned = parts[2].get_payload()
    assert "Subject: hello" in str(returned)
    assert "secret body" not in msg.as_string()


def test_no_remote_mta_when_no_host_was_contacted() -> None:
    reason = Reason(text="domain publishes a null MX (RFC 7505)", status="5.1.10")
    status = list(_dsn(FailedRecipient("u@null.test", reason)).iter_parts())[1].as_string()
    assert "Status: 5.1.10" in status
    assert "Remote-MTA" not in status


def test_every_failed_recipient_is_listed_once() -> None:
    a = FailedRecipient("a@d.test", Reason(text="550 no", status="5.0.0", reply="550 no"))
    b = FailedRecipient("b@d.test", Reason(text="expired", status="4.4.7"))
    status = list(_dsn(a, b).iter_parts())[1].as_string()
    assert status.count("Final-Recipient:") == 2
    assert "Status: 4.4.7" in status
