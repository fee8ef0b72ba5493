"""Values of the MTA-STS world: policies, TXT records, RFC 8460 result types.

Pure data; no I/O. Every other module of `policy` speaks in these types.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Mode(StrEnum):
    """RFC 8461 §5: what a policy asks of the sender."""

    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


class TlsRptResult(StrEnum):
    """RFC 8460 §4.3 result types: the fixed vocabulary of TLS failures."""

    STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
    CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
    CERTIFICATE_EXPIRED = "certificate-expired"
    CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
    VALIDATION_FAILURE = "validation-failure"
    TLSA_INVALID = "tlsa-invalid"
    DNSSEC_INVALID = "dnssec-invalid"
    DANE_REQUIRED = "dane-required"
    STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
    STS_POLICY_INVALID = "sts-policy-invalid"
    STS_WEBPKI_INVALID = "sts-webpki-invalid"


@dataclass(frozen=True, slots=True)
class StsRecord:
    """A valid `_mta-sts` TXT record (RFC 8461 §3.1); only `id` matters to a sender."""

    id: str


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed, valid policy file (RFC 8461 §3.2).

    `text` is the body exactly as fetched (for `policy check` and RFC 8460 reports).
    `mx` holds the patterns lower-cased, without a trailing dot.
    """

    mode: Mode
    mx: tuple[str, ...]
    max_age: int
    text: str


@dataclass(frozen=True, slots=True)
class PolicyLookup:
    """The answer to "which policy applies to `domain` for this delivery attempt?".

    `policy` is None when the domain is to be treated as having no MTA-STS policy
    (none published, or none obtainable and nothing cached: RFC 8461 §3.3 fails open).
    `source` says where the policy came from: "fetched" (this call), "cached", "none", or
    "unavailable": the policy cache could not be read and nothing was fetched, so whether
    a policy applies is unknown. That is our own failure, not the domain's: it must not
    fail open (the recipients wait), so `policy` is None but does not mean "no policy".
    `failure` carries an RFC 8460 result type when discovery or fetch failed
    (sts-policy-fetch-error, sts-policy-invalid, sts-webpki-invalid), whether or not a
    cached policy still applies; `detail` is one safe line describing it (for
    "unavailable": "policy cache unreadable: ...").
    """

    domain: str
    policy: Policy | None
    policy_id: str | None
    source: str
    failure: TlsRptResult | None = None
    detail: str | None = None

    @property
    def unavailable(self) -> bool:
        """True when the policy in force could not be determined (source "unavailable")."""
        return self.source == "unavailable"
