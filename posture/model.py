"""The posture's values: how one recipient's attempt ended, and the daily aggregate keys.

What the relay tells this package is already classified (`RecipientFigure`): the
mechanism that decided the TLS requirement, the TLS version, whether the peer was
authenticated, and for a failure whether TLS or policy caused it. Addresses never enter
this package: only recipient domains and an opaque key per (message, domain).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum


class Mechanism(StrEnum):
    """What decided how the mail had to be secured (and, for `none`, what came of it)."""

    DANE = "dane"  # the MX host's DNSSEC-signed TLSA records (RFC 7672)
    STS_ENFORCE = "sts-enforce"  # an MTA-STS policy in mode enforce (RFC 8461)
    STS_TESTING = "sts-testing"  # an MTA-STS policy in mode testing: reported, not required
    OVERRIDE = "override"  # the operator's tls.overrides entry for the domain
    TLS_REQUIRED_NO = "tls-required-no"  # the message's TLS-Required: No (RFC 8689 §5)
    OPPORTUNISTIC = "opportunistic"  # nothing published applies: STARTTLS when offered
    PLAINTEXT = "plaintext"  # nothing published applies and it went in the clear
    UNDECIDED = "undecided"  # failures only: the attempt ended before a TLS decision


class Status(StrEnum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


class Cause(StrEnum):
    """Why a recipient was deferred or bounced."""

    POLICY = "policy"  # a TLS or policy failure (it carries an RFC 8460 result type)
    OTHER = "other"  # anything else: the MX's reply, the network, DNS, our store


# Mechanisms that bind: a failure under them makes the mail wait (never a downgrade).
BINDING = (Mechanism.DANE, Mechanism.STS_ENFORCE, Mechanism.OVERRIDE)
# The order in which reports list delivery mechanisms.
DELIVERY_MECHANISMS = (
    Mechanism.DANE,
    Mechanism.STS_ENFORCE,
    Mechanism.STS_TESTING,
    Mechanism.OVERRIDE,
    Mechanism.TLS_REQUIRED_NO,
    Mechanism.OPPORTUNISTIC,
    Mechanism.PLAINTEXT,
)


@dataclass(frozen=True, slots=True)
class RecipientFigure:
    """One recipient's outcome in one attempt, as the posture counts it.

    `mechanism` is what decided (`OPPORTUNISTIC` when nothing published applied; a
    delivery in the clear under it is counted as `PLAINTEXT`); `tls` the negotiated
    version ("TLSv1.3") or None in the clear or when no MX was reached; `cause` None
    exactly when delivered; `result` the RFC 8460 result type of a policy failure."""

    status: Status
    mechanism: Mechanism
    tls: str | None = None
    authenticated: bool = False
    cause: Cause | None = None
    result: str | None = None

    @property
    def counted_mechanism(self) -> Mechanism:
        clear = self.status is Status.DELIVERED and self.tls is None
        if clear and self.mechanism is Mechanism.OPPORTUNISTIC:
            return Mechanism.PLAINTEXT
        return self.mechanism

    @property
    def waits_on_policy(self) -> bool:
        """Deferred because the requirement in force could not be met."""
        return self.status is Status.DEFERRED and self.cause is Cause.POLICY


@dataclass(frozen=True, slots=True)
class Attempt:
    """One committed attempt of one message to one recipient domain.

    `key` names the (message, domain) opaquely (never shown); `at` is the commit time."""

    key: str
    domain: str
    at: float
    recipients: tuple[RecipientFigure, ...]


@dataclass(frozen=True, slots=True)
class Cell:
    """The key of one daily aggregate: a UTC day, a domain and how its mail ended.

    `tls` is "" in the clear; `cause` is "" for deliveries."""

    day: str
    domain: str
    status: Status
    mechanism: Mechanism
    tls: str = ""
    authenticated: bool = False
    cause: str = ""


@dataclass(frozen=True, slots=True)
class Figures:
    """Messages ((message, domain) transfers) and recipients."""

    messages: int = 0
    recipients: int = 0

    def __add__(self, other: Figures) -> Figures:
        return Figures(self.messages + other.messages, self.recipients + other.recipients)


@dataclass(frozen=True, slots=True)
class Waiting:
    """A (message, domain) whose last attempt was deferred because the policy in force
    (MTA-STS enforce, DANE, a require-verified override) could not be met.

    `since`: the first such deferral in a row; `last_at`: the latest attempt."""

    key: str
    domain: str
    recipients: int
    since: float
    last_at: float
    mechanism: Mechanism
    result: str | None


def utc_day(timestamp: float) -> str:
    """The UTC calendar day (YYYY-MM-DD) of a POSIX time."""
    return datetime.fromtimestamp(timestamp, tz=UTC).date().isoformat()
