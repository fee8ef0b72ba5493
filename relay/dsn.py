"""Delivery status notifications (RFC 3464) for recipients that failed for good.

Pure: takes the original message and the failed recipients' reasons, returns the bytes of a
`multipart/report; report-type=delivery-status` message (RFC 6522) ready to be queued with
the null reverse-path (RFC 5321 §4.5.5). Deciding *whether* a DSN is owed (never for a
null-sender message) is the caller's job; this module only writes one.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime, make_msgid

from relay.delivery.outcome import Reason

# Original headers are returned, never the body: bounded size, and no content is echoed
# to a sender address that may be forged (RFC 3461 §4.3 leaves the default to the MTA).
_MAX_RETURNED_HEADERS = 64 * 1024


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    address: str
    reason: Reason


def header_section(data: bytes) -> bytes:
    """The header section of an RFC 5322 message, CRLF-terminated, without the blank line."""
    end = data.find(b"\r\n\r\n")
    headers = data if end < 0 else data[: end + 2]
    return headers[:_MAX_RETURNED_HEADERS]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _recipient_block(failed: FailedRecipient, last_attempt: datetime) -> list[str]:
    reason = failed.reason
    lines = [
        f"Final-Recipient: rfc822; {failed.address}",
        "Action: failed",
        f"Status: {reason.status}",
    ]
    if reason.hop is not None:
        lines.append(f"Remote-MTA: dns; {reason.hop.mx}")
    if reason.reply:
        lines.append(f"Diagnostic-Code: smtp; {_one_line(reason.reply)}")
    else:
        lines.append(f"Diagnostic-Code: x-sts-relay; {_one_line(reason.text)}")
    lines.append(f"Last-Attempt-Date: {format_datetime(last_attempt)}")
    return lines


def _human_text(failed: Sequence[FailedRecipient], reporting_mta: str) -> str:
    lines = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "It has been returned below (headers only). The reasons:",
        "",
    ]
    for f in failed:
        lines.append(f"<{f.address}>: {_one_line(f.reason.text)}")
    return "\r\n".join(lines) + "\r\n"


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    original: bytes,
    failed: Sequence[FailedRecipient],
    arrival: datetime,
    now: datetime,
) -> bytes:
    """Return a complete RFC 3464 failure report addressed to `original_sender`."""
    boundary = f"=_sts-relay_{secrets.token_hex(12)}"
    per_message = [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"Arrival-Date: {format_datetime(arrival)}",
    ]
    status_blocks = ["\r\n".join(per_message)]
    status_blocks += ["\r\n".join(_recipient_block(f, now)) for f in failed]
    delivery_status = "\r\n\r\n".join(status_blocks) + "\r\n"
    head = "\r\n".join(
        [
            f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
            f"To: <{original_sender}>",
            "Subject: Undelivered Mail Returned to Sender",
            f"Date: {format_datetime(now)}",
            f"Message-ID: {make_msgid(domain=reporting_mta)}",
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        ]
    )
    parts = [
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "Content-Description: Notification\r\n\r\n" + _human_text(failed, reporting_mta),
        "Content-Type: message/delivery-status\r\n"
        "Content-Description: Delivery report\r\n\r\n" + delivery_status,
    ]
    body = b"".join(f"--{boundary}\r\n{part}\r\n".encode() for part in parts)
    body += (
        f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n"
        "Content-Description: Undelivered Message Headers\r\n\r\n"
    ).encode()
    body += header_section(original) + f"\r\n--{boundary}--\r\n".encode()
    return head.encode() + b"\r\n\r\n" + body
