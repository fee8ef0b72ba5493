"""Delivery status notifications (RFC 3464) for failed, delayed and relayed recipients.

Pure: takes the original message and one entry per reported recipient, returns the bytes
of a `multipart/report; report-type=delivery-status` message (RFC 6522) ready to be queued
with the null reverse-path (RFC 5321 §4.5.5). Deciding *whether* a DSN is owed (NOTIFY,
null sender) is the worker's job; this module only writes one.

What is returned of the original (RFC 3461 §4.3): the header section (`text/rfc822-headers`)
by default and for RET=HDRS; the whole message (`message/rfc822`) for RET=FULL in a report
about failures, unless it is larger than `MAX_RETURNED_MESSAGE`, then the headers and a note.
Delay and relay reports always return headers only, and so does every report on a message
sent with REQUIRETLS (RFC 8689 §5: RET=FULL is disregarded; the body is never returned).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime, make_msgid
from enum import StrEnum

from relay.delivery.outcome import Reason

_MAX_RETURNED_HEADERS = 64 * 1024
MAX_RETURNED_MESSAGE = 1024 * 1024


class Action(StrEnum):
    """RFC 3464 §2.3.3 action values this relay reports."""

    FAILED = "failed"
    DELAYED = "delayed"
    RELAYED = "relayed"


@dataclass(frozen=True, slots=True)
class DsnEntry:
    """One recipient in a report. `original_recipient` is the ORCPT value ("rfc822;addr")."""

    address: str
    action: Action
    reason: Reason
    original_recipient: str | None = None
    will_retry_until: datetime | None = None  # delayed only


def header_section(data: bytes) -> bytes:
    """The header section of an RFC 5322 message, CRLF-terminated, without the blank line."""
    end = data.find(b"\r\n\r\n")
    headers = data if end < 0 else data[: end + 2]
    return headers[:_MAX_RETURNED_HEADERS]


def _one_line(text: str) -> str:
    # Also removes CR/LF, so no value can start a header field of its own.
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _diagnostic(reason: Reason) -> str:
    """What the remote host said; else our own words, naming an MTA-STS/TLS cause."""
    if reason.reply:
        return f"smtp; {_one_line(reason.reply)}"
    text = _one_line(reason.text)
    if reason.tlsrpt is not None and reason.hop is not None:
        text = f"MTA-STS: {reason.tlsrpt.value} for {reason.hop.mx}; {text}"
    return f"x-sts-relay; {text}"


def _recipient_block(entry: DsnEntry, last_attempt: datetime) -> list[str]:
    reason = entry.reason
    lines = []
    if entry.original_recipient:
        lines.append(f"Original-Recipient: {_one_line(entry.original_recipient)}")
    lines += [
        f"Final-Recipient: rfc822; {entry.address}",
        f"Action: {entry.action.value}",
        f"Status: {reason.status}",
    ]
    # RFC 3464 §2.3.5: only when a remote MTA was contacted (an address was tried).
    if reason.hop is not None and reason.hop.ip:
        lines.append(f"Remote-MTA: dns; {reason.hop.mx}")
    lines.append(f"Diagnostic-Code: {_diagnostic(reason)}")
    lines.append(f"Last-Attempt-Date: {format_datetime(last_attempt)}")
    if entry.action is Action.DELAYED and entry.will_retry_until is not None:
        lines.append(f"Will-Retry-Until: {format_datetime(entry.will_retry_until)}")
    return lines


_SUBJECTS = {
    Action.FAILED: "Undelivered Mail Returned to Sender",
    Action.DELAYED: "Delayed Mail (still being retried)",
    Action.RELAYED: "Successful Mail Delivery Report",
}

_INTROS = {
    Action.FAILED: "Your message could not be delivered to one or more recipients.",
    Action.DELAYED: (
        "Your message could not be delivered yet to one or more recipients.\r\n"
        "This is only a warning: delivery will be retried; you need not send it again."
    ),
    Action.RELAYED: (
        "Your message was handed to the next mail server for one or more recipients.\r\n"
        "That server does not report delivery status, so this is the last report."
    ),
}


def _main_action(entries: Sequence[DsnEntry]) -> Action:
    actions = {e.action for e in entries}
    for action in (Action.FAILED, Action.DELAYED, Action.RELAYED):
        if action in actions:
            return action
    return Action.FAILED


def _human_text(entries: Sequence[DsnEntry], reporting_mta: str, returned: str) -> str:
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    for action in (Action.FAILED, Action.DELAYED, Action.RELAYED):
        group = [e for e in entries if e.action is action]
        if not group:
            continue
        lines += [_INTROS[action], ""]
        for e in group:
            lines.append(f"<{e.address}>: {_diagnostic(e.reason).partition('; ')[2]}")
        lines.append("")
    lines.append(returned)
    return "\r\n".join(lines) + "\r\n"


def _returned_part(original: bytes, full: bool, requiretls: bool) -> tuple[bytes, str]:
    """The third MIME part (headers and body) and a sentence saying what it holds."""
    if full and not requiretls and len(original) <= MAX_RETURNED_MESSAGE:
        cte = "7bit" if original.isascii() else "8bit"
        head = (
            "Content-Type: message/rfc822\r\n"
            f"Content-Transfer-Encoding: {cte}\r\n"
            "Content-Description: Undelivered Message\r\n\r\n"
        )
        body = original if original.endswith(b"\r\n") else original + b"\r\n"
        return head.encode() + body, "The message is attached below."
    note = "Its headers are attached below."
    if full and requiretls:
        note = "It was sent with REQUIRETLS: only its headers are attached."
    elif full:
        note = f"It is larger than {MAX_RETURNED_MESSAGE} bytes: only its headers are attached."
    head = "Content-Type: text/rfc822-headers\r\nContent-Description: Message Headers\r\n\r\n"
    return head.encode() + header_section(original), note


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    original: bytes,
    entries: Sequence[DsnEntry],
    arrival: datetime,
    now: datetime,
    envid: str | None = None,
    ret: str | None = None,
    requiretls: bool = False,
) -> bytes:
    """Return a complete RFC 3464 report about `entries` for `original_sender`.

    `envid` (decoded ENVID) comes back as Original-Envelope-Id; `ret` is "FULL" or
    "HDRS" (RFC 3461 §4.3), None for the default (headers). `requiretls`: the original
    was sent with REQUIRETLS, so RET=FULL is disregarded (RFC 8689 §5).
    """
    boundary = f"=_sts-relay_{secrets.token_hex(12)}"
    per_message = [f"Reporting-MTA: dns; {reporting_mta}"]
    if envid:
        per_message.append(f"Original-Envelope-Id: {_one_line(envid)}")
    per_message.append(f"Arrival-Date: {format_datetime(arrival)}")
    status_blocks = ["\r\n".join(per_message)]
    status_blocks += ["\r\n".join(_recipient_block(e, now)) for e in entries]
    delivery_status = "\r\n\r\n".join(status_blocks) + "\r\n"
    action = _main_action(entries)
    full = ret == "FULL" and any(e.action is Action.FAILED for e in entries)
    returned, note = _returned_part(original, full, requiretls)
    head = "\r\n".join(
        [
            f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
            f"To: <{original_sender}>",
            f"Subject: {_SUBJECTS[action]}",
            f"Date: {format_datetime(now)}",
            f"Message-ID: {make_msgid(domain=reporting_mta)}",
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        ]
    )
    parts = [
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "Content-Description: Notification\r\n\r\n" + _human_text(entries, reporting_mta, note),
        "Content-Type: message/delivery-status\r\n"
        "Content-Description: Delivery report\r\n\r\n" + delivery_status,
    ]
    body = b"".join(f"--{boundary}\r\n{part}\r\n".encode() for part in parts)
    body += f"--{boundary}\r\n".encode() + returned
    body += f"\r\n--{boundary}--\r\n".encode()
    return head.encode() + b"\r\n\r\n" + body
