"""The TLS requirements a session can be held to, and a message's own wish about TLS.

Owns the `TlsRequirement` vocabulary (computed by `decision.decide_tls`, applied by
`client`) and reading RFC 8689 §5 `TLS-Required: No` from a message header. Pure, no I/O;
knows nothing of sockets, SMTP or where a requirement came from.
"""

from __future__ import annotations

import re
from enum import StrEnum


class TlsRequirement(StrEnum):
    """How one SMTP session must secure itself."""

    VERIFIED = "verified"  # enforce: STARTTLS, WebPKI-valid cert naming the MX, TLS >= 1.2
    REPORT = "report"  # testing: try VERIFIED, deliver anyway, remember what failed
    OPPORTUNISTIC = "opportunistic"  # none / no policy: STARTTLS if offered, unverified
    # RFC 7672 (relay/delivery/dane.py): STARTTLS required, the chain must match a usable
    # TLSA record of the MX host; never plaintext.
    DANE = "dane"
    # RFC 7672 §2.2: a secure TLSA RRset with only unusable records: STARTTLS required,
    # the certificate is not checked; never plaintext.
    ENCRYPTED = "encrypted"


# Headers bigger than this are not searched for TLS-Required (bounds the work per attempt
# on a huge message without a header/body separator).
_HEADER_SCAN_LIMIT = 256 * 1024
# Where a TLS-Required field could start: a line beginning with the name, then blanks
# (folded ones too) and the colon. Most messages have none and are answered without
# splitting their header: this runs for every attempt, twice (the TLS decision and the
# TLS-report hook). It may find more than the field parser below, never less.
_FIELD_START = re.compile(rb"^tls-required(?:[ \t]|\r\n[ \t])*:", re.IGNORECASE | re.MULTILINE)


def tls_required_no(message: bytes) -> bool:
    """Whether the message's header carries `TLS-Required: No` (RFC 8689 §5).

    The field name and the value are case-insensitive; folded lines are unfolded. Any
    other value means the field is not honoured (RTLS-06), and so do conflicting fields.
    A `TLS-Required` line in the body does not count.
    """
    end = message.find(b"\r\n\r\n", 0, _HEADER_SCAN_LIMIT)
    if message.startswith(b"\r\n"):
        return False  # no header at all
    limit = end if end >= 0 else _HEADER_SCAN_LIMIT
    if _FIELD_START.search(message, 0, limit) is None:
        return False  # no line of the header starts such a field
    head = message[:limit]
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line  # RFC 5322 §2.2.3: unfold
        else:
            fields.append(line)
    values = [
        value.strip().lower()
        for name, colon, value in (field.partition(b":") for field in fields)
        if colon and name.rstrip(b" \t").lower() == b"tls-required"
    ]
    return bool(values) and all(value == b"no" for value in values)
