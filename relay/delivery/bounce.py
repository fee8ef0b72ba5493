"""The report an attempt owes the envelope sender, as a message ready to queue. Pure.

Owns turning one lease's outcomes into at most one DSN message (RFC 3464, built by
`dsn`) with the null reverse-path (RFC 5321 §4.5.5), using the NOTIFY rules of `notify`
(never a report about a report: a null-sender message owes none). The scheduler stores
the DSN in the same transaction as the outcomes it reports, so a recipient is reported
once however often recording has to be retried.

The report on a REQUIRETLS message (RFC 8689 §5) returns the original's headers only,
whatever RET asks (the body never travels in a report), and is itself a REQUIRETLS
message: it goes only to an MX of the sender's domain that DANE or MTA-STS authenticates
and that offers REQUIRETLS, with the protection the sender asked for the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from mailqueue.model import Lease, NewMessage
from relay.delivery.dsn import build_dsn
from relay.delivery.notify import notices
from relay.delivery.outcome import Outcome


@dataclass(frozen=True, slots=True)
class Bounce:
    """The DSN owed for one attempt, and whom it reports on."""

    message: NewMessage
    rcpts: tuple[str, ...]  # the reported recipients (failed, delayed, relayed)


@dataclass(frozen=True, slots=True)
class BounceSettings:
    reporting_mta: str  # Reporting-MTA of DSNs (delivery.hostname)
    delay_notice_after: float  # queue.delay_notice_after; 0 = no delay notices


def bounce_for(
    lease: Lease,
    data: bytes,
    outcomes: dict[str, Outcome],
    *,
    now: float,
    settings: BounceSettings,
) -> tuple[Bounce | None, frozenset[str]]:
    """The DSN owed for `outcomes` (None when none is), and the recipients for whom a
    "delayed" report is sent now (their delay notice is then never sent again)."""
    owed = notices(lease, outcomes, now=now, delay_notice_after=settings.delay_notice_after)
    if not owed.entries:
        return None, owed.delay_notified
    dsn = build_dsn(
        reporting_mta=settings.reporting_mta,
        original_sender=lease.sender,
        original=data,
        entries=owed.entries,
        arrival=datetime.fromtimestamp(lease.received_at, tz=UTC),
        now=datetime.fromtimestamp(now, tz=UTC),
        envid=lease.dsn.envid,
        ret=lease.dsn.ret,
        requiretls=lease.requiretls,
    )
    message = NewMessage(
        sender="", recipients=(lease.sender,), data=dsn, requiretls=lease.requiretls
    )
    return Bounce(message, tuple(e.address for e in owed.entries)), owed.delay_notified
