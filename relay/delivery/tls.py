"""What a policy lookup asks of the TLS of each MX (RFC 8461 §4, §5). Pure, no I/O.

Owns the mapping from `PolicyLookup` to a TLS requirement, the per-MX policy check, and
reading a message's own wish about TLS (RFC 8689 §5 `TLS-Required: No`). It knows nothing
of sockets or SMTP; `session` applies the requirement, `attempt` walks MXs.
"""

from __future__ import annotations

from enum import StrEnum

from policy.match import is_valid_hostname, mx_matches
from policy.model import Mode, PolicyLookup, TlsRptResult


class TlsRequirement(StrEnum):
    """How one SMTP session must secure itself."""

    VERIFIED = "verified"  # enforce: STARTTLS, WebPKI-valid cert naming the MX, TLS >= 1.2
    REPORT = "report"  # testing: try VERIFIED, deliver anyway, remember what failed
    OPPORTUNISTIC = "opportunistic"  # none / no policy: STARTTLS if offered, unverified


def requirement_for(lookup: PolicyLookup) -> TlsRequirement:
    """RFC 8461 §5: the mode decides; no policy (or mode none) means opportunistic TLS."""
    if lookup.policy is None:
        return TlsRequirement.OPPORTUNISTIC
    match lookup.policy.mode:
        case Mode.ENFORCE:
            return TlsRequirement.VERIFIED
        case Mode.TESTING:
            return TlsRequirement.REPORT
        case Mode.NONE:
            return TlsRequirement.OPPORTUNISTIC


def mx_check(lookup: PolicyLookup, mx_host: str) -> TlsRptResult | None:
    """The policy verdict on an MX name, before any connection (RFC 8461 §4.1).

    VALIDATION_FAILURE when an enforce/testing policy lists no pattern matching the MX
    name as given by DNS (STS-83: before CNAME expansion), or when that name is not a
    valid LDH host name (STS-101: OpenSSL would otherwise match `*.d.test` against a
    `*.d.test` certificate). None when the MX passes or no policy applies.
    """
    policy = lookup.policy
    if policy is None or policy.mode is Mode.NONE:
        return None
    host = mx_host.rstrip(".").lower()
    if not is_valid_hostname(host) or not mx_matches(host, policy.mx):
        return TlsRptResult.VALIDATION_FAILURE
    return None


# Headers bigger than this are not searched for TLS-Required (bounds the work per attempt
# on a huge message without a header/body separator).
_HEADER_SCAN_LIMIT = 256 * 1024


def tls_required_no(message: bytes) -> bool:
    """Whether the message's header carries `TLS-Required: No` (RFC 8689 §5).

    The field name and the value are case-insensitive; folded lines are unfolded. Any
    other value means the field is not honoured (RTLS-06), and so do conflicting fields.
    A `TLS-Required` line in the body does not count.
    """
    end = message.find(b"\r\n\r\n", 0, _HEADER_SCAN_LIMIT)
    if message.startswith(b"\r\n"):
        return False  # no header at all
    head = message[: end if end >= 0 else _HEADER_SCAN_LIMIT]
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
