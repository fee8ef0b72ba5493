"""The report `sts-relay queue bounce` owes each sender: the delivery side's own DSN.

An operator's bounce is a final failure like any other: each recipient ends `bounced`
with "5.0.0 bounced by the operator", and the sender gets the same RFC 3464 report an
expired or refused recipient would bring (relay/delivery/bounce.py and dsn.py: NOTIFY
honoured, never a report for a null sender). The store applies the outcome and queues
the report in one transaction (mailqueue/admin.py); this module only writes the report.
"""

from __future__ import annotations

from mailqueue.admin import BounceCandidate, BounceReport
from mailqueue.model import Lease, NewMessage
from relay.delivery.bounce import BounceSettings, bounce_for
from relay.delivery.notify import wants
from relay.delivery.outcome import Bounced, Outcome, Reason

OPERATOR_BOUNCE = Reason(text="bounced by the operator", status="5.0.0")


def last_error() -> str:
    """What the bounced recipients' last error says (`queue list`, `queue show`)."""
    return f"{OPERATOR_BOUNCE.status} {OPERATOR_BOUNCE.text}"


def operator_bounce_report(*, reporting_mta: str, lifetime: float, now: float) -> BounceReport:
    """A BounceReport writing the DSN of an operator's bounce at `now`."""
    settings = BounceSettings(reporting_mta=reporting_mta, delay_notice_after=0)

    def report(candidate: BounceCandidate) -> NewMessage | None:
        notify = candidate.dsn.notify
        if not candidate.sender or not any(
            wants(notify.get(r.address), "FAILURE") for r in candidate.recipients
        ):
            return None  # none owed: do not even read the message
        lease = Lease(
            queue_id=candidate.queue_id,
            domain="",  # the report covers every bounced recipient of the message
            sender=candidate.sender,
            recipients=candidate.recipients,
            received_at=candidate.received_at,
            expires_at=candidate.received_at + lifetime,
            until=now,
            dsn=candidate.dsn,
            requiretls=candidate.requiretls,
        )
        outcomes: dict[str, Outcome] = {
            r.address: Bounced(OPERATOR_BOUNCE) for r in candidate.recipients
        }
        data = candidate.read_data() or b""  # unreadable: the report carries no headers
        bounce, _ = bounce_for(lease, data, outcomes, now=now, settings=settings)
        return None if bounce is None else bounce.message

    return report
