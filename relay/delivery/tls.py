"""What a policy lookup asks of the TLS of each MX (RFC 8461 §4, §5). Pure, no I/O.

Owns the mapping from `PolicyLookup` to a TLS requirement and the per-MX policy check.
It knows nothing of sockets or SMTP; `session` applies the requirement, `attempt` walks MXs.
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
