"""Values of TLS reporting: sessions, counters, reporting records, delivery states.

Pure data; no I/O. Days are UTC calendar days (`datetime.date`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from policy.model import TlsRptResult


class PolicyType(StrEnum):
    """RFC 8460 §4.4 policy-type values this relay can apply."""

    STS = "sts"
    TLSA = "tlsa"  # DANE (RFC 7672): strings are the MX host's TLSA records
    NO_POLICY_FOUND = "no-policy-found"


@dataclass(frozen=True, slots=True)
class AppliedPolicy:
    """The policy a session was held to: `strings` are the policy lines (RFC 8460 §4.5),
    `mx` the policy's mx patterns; for `tlsa`, the TLSA records ("3 1 1 <hex>") and the
    MX host they belong to; both empty for no-policy-found."""

    type: PolicyType
    strings: tuple[str, ...] = ()
    mx: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Failure:
    """RFC 8460 §4.3 failure details of one failed session (the counted key)."""

    result: TlsRptResult
    receiving_mx: str = ""
    receiving_ip: str = ""
    sending_ip: str = ""


@dataclass(frozen=True, slots=True)
class Session:
    """One delivery session to `domain` (the Policy Domain, an A-label) on `day`.

    `failure` is None for a session that negotiated policy-compliant TLS.
    """

    domain: str
    day: str  # YYYY-MM-DD (UTC)
    policy: AppliedPolicy
    failure: Failure | None = None


@dataclass(frozen=True, slots=True)
class Count:
    """Stored counter: `count` sessions of one kind, for one domain and day."""

    domain: str
    day: str
    policy: AppliedPolicy
    failure: Failure | None
    count: int


@dataclass(frozen=True, slots=True)
class TlsRptRecord:
    """A valid `_smtp._tls` TXT record (RFC 8460 §3): its reporting URIs, in order."""

    rua: tuple[str, ...]

    @property
    def mailto(self) -> tuple[str, ...]:
        return tuple(u for u in self.rua if u.lower().startswith("mailto:"))

    @property
    def https(self) -> tuple[str, ...]:
        return tuple(u for u in self.rua if u.lower().startswith("https:"))


class DeliveryState(StrEnum):
    """Where one report stands for one reporting URI."""

    QUEUED = "queued"  # mailto: handed to the relay's queue (it retries)
    SENT = "sent"  # https: accepted (200/201)
    PENDING = "pending"  # https: failed, will be retried at next_attempt_at
    FAILED = "failed"  # https: retries exhausted (RFC 8460 §5.5: about 24 h)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One report for one reporting URI."""

    report_id: str
    domain: str
    day: str
    uri: str
    state: DeliveryState
    attempts: int
    first_attempt_at: float
    next_attempt_at: float | None
    last_error: str | None
