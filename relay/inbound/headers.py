"""Header work the listener does on submitted messages, on raw bytes.

Owns the Received trace field (RFC 5321 §4.4), loop counting (§6.3), the Message-ID and
Date added when missing (RFC 5322 §3.6), and the bare CR / bare LF check (SMTP
smuggling, RFC 5321 §2.3.8). Pure functions; never re-serialises a message through
`email.*`: existing bytes are never changed, reordered or removed, only added to.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import secrets
from datetime import datetime
from email.utils import format_datetime

# A header field line: a field name (printable ASCII but ":"), optional WSP, then ":".
# Obsolete syntax (RFC 5322 §4.5) allows the WSP.
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_RECEIVED = re.compile(rb"(?:^|\r\n)received[ \t]*:", re.IGNORECASE)
_MESSAGE_ID = re.compile(rb"(?:^|\r\n)message-id[ \t]*:", re.IGNORECASE)
_DATE = re.compile(rb"(?:^|\r\n)date[ \t]*:", re.IGNORECASE)
_MESSAGE_ID_VALUE = re.compile(rb"(?:^|\r\n)message-id[ \t]*:((?:[^\r]|\r\n[ \t])*)", re.IGNORECASE)
_FOLD = re.compile(rb"\r\n[ \t]")
# What may appear of a client's HELO argument inside a Received field.
_UNSAFE_HELO = re.compile(r"[^A-Za-z0-9.\-\[\]:_]")


def rfc5322_date(when: datetime) -> str:
    """`when` as an RFC 5322 date-time (whole seconds, its own UTC offset)."""
    return _format_second(when.replace(microsecond=0))


@functools.lru_cache(maxsize=8)
def _format_second(when: datetime) -> str:
    # format_datetime costs as much as the rest of the header work; every message
    # received within one second shares the same text.
    return format_datetime(when)


def has_bare_cr_or_lf(data: bytes) -> bool:
    """True if `data` holds a CR not followed by LF, or an LF not preceded by CR."""
    # CRLF pairs cannot overlap, so equal counts mean every CR and LF is in a pair.
    pairs = data.count(b"\r\n")
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs


def is_header_line(line: bytes | memoryview, *, first: bool) -> bool:
    """True if `line` (one CRLF-ended line) belongs to the header section: a field, or a
    continuation of the one before (never the first line)."""
    is_continuation = not first and bytes(line[:1]) in (b" ", b"\t")
    return is_continuation or _FIELD.match(line) is not None


def header_end(data: bytes) -> int:
    """Offset where the header section ends (just after its last CRLF), i.e. where the
    blank line or the first non-header line starts; len(data) if the message is all header."""
    pos = 0
    while pos < len(data):
        eol = data.find(b"\r\n", pos)
        line_end = len(data) if eol < 0 else eol + 2
        if not is_header_line(data[pos:line_end], first=pos == 0):
            return pos
        pos = line_end
    return pos


def count_received(data: bytes) -> int:
    """Number of Received header fields in the header section (RFC 5321 §6.3 loop check)."""
    return count_received_fields(data[: header_end(data)])


def count_received_fields(header: bytes) -> int:
    """count_received() of a message whose header section is `header`, already cut at
    header_end() (relay.inbound.data.MessageBuffer.header_end): not scanned again."""
    return len(_RECEIVED.findall(header))


@functools.lru_cache(maxsize=256)  # a few client addresses send nearly all the mail
def _address_literal(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "unknown"
    # RFC 5321 §4.1.3: IPv6 address literals carry the "IPv6:" tag.
    return f"[IPv6:{addr}]" if addr.version == 6 else f"[{addr}]"


@functools.lru_cache(maxsize=256)  # as above: a few client names
def _helo_name(helo: str) -> str:
    return _UNSAFE_HELO.sub("?", helo)[:255] or "unknown"


def received_header(
    *,
    client_ip: str,
    helo: str | None,
    by_host: str,
    queue_id: str,
    tls: str | None,
    when: datetime,
    for_rcpt: str | None,
) -> bytes:
    """One Received field (RFC 5321 §4.4), folded, CRLF-terminated.

    `tls` is the negotiated version ("TLSv1.3") or None; `when` must be timezone-aware.
    """
    if when.tzinfo is None:
        raise ValueError("received_header needs an aware datetime")
    name = _helo_name(helo or "")
    lines = [
        f"Received: from {name} ({_address_literal(client_ip)})",
        f"\tby {by_host} (sts-relay) with {'ESMTPS' if tls else 'ESMTP'} id {queue_id}",
    ]
    if tls:
        lines.append(f"\t(using {_UNSAFE_HELO.sub('?', tls)})")
    if for_rcpt is not None and "\r" not in for_rcpt and "\n" not in for_rcpt:
        lines.append(f"\tfor <{for_rcpt}>")
    lines[-1] += f"; {rfc5322_date(when)}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", errors="surrogateescape")


def new_message_id(hostname: str, queue_id: str) -> str:
    return f"<{queue_id}.{secrets.token_hex(8)}@{hostname}>"


def message_id_of(headers: bytes) -> str | None:
    """The Message-ID field's value (unfolded, stripped), or None if absent."""
    match = _MESSAGE_ID_VALUE.search(headers)
    if match is None:
        return None
    value = _FOLD.sub(b" ", match.group(1)).strip()
    return value.decode("utf-8", errors="replace")


def missing_headers(
    headers: bytes, following: bytes, *, hostname: str, now: datetime, queue_id: str
) -> tuple[bytes, str | None]:
    """What to insert at the end of the header section `headers` (Date and Message-ID when
    the message has none: RFC 5322 §3.6 requires both; RFC 5321 §6.4 lets the submission
    server add them), and the message's Message-ID value (the existing one or the new one).

    `following` is the start (at least 2 bytes, if there are that many) of what comes after
    the header section. The result may start or end with a CRLF the message needs.
    """
    added = b""
    if not _DATE.search(headers):
        added += b"Date: " + rfc5322_date(now).encode("ascii") + b"\r\n"
    message_id = message_id_of(headers)
    if message_id is None:
        message_id = new_message_id(hostname, queue_id)
        added += b"Message-ID: " + message_id.encode("utf-8", errors="replace") + b"\r\n"
    if added and headers and not headers.endswith(b"\r\n"):
        # All header and no final CRLF: end the last field before adding ours.
        added = b"\r\n" + added
    if added and following and not following.startswith(b"\r\n"):
        # No blank line before the body: supply the separator so the body stays a body.
        added += b"\r\n"
    elif added and not following and not headers:
        added += b"\r\n"  # empty message: headers, then an empty body
    return added, message_id


def add_missing_headers(
    data: bytes, *, hostname: str, now: datetime, queue_id: str, received: bytes = b""
) -> tuple[bytes, str | None]:
    """Prepend `received` (a field from received_header) and insert missing_headers() at
    the end of the header section.

    Returns the new message and its Message-ID value (the existing one or the new one).
    Every byte of `data` is kept, in order.
    """
    end = header_end(data)
    added, message_id = missing_headers(
        data[:end], data[end : end + 2], hostname=hostname, now=now, queue_id=queue_id
    )
    # One join of views: `a + data[end:]` would copy a large body twice more.
    view = memoryview(data)
    return b"".join((received, view[:end], added, view[end:])), message_id
