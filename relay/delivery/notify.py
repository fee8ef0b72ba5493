"""Which delivery status notifications an attempt owes the sender (RFC 3461 §4.1). Pure.

Owns the NOTIFY rules: FAILURE → a "failed" report on a bounce; DELAY → one "delayed"
report once a recipient has waited `delay_notice_after` seconds (at most once per
recipient); SUCCESS → a "relayed" report after handing the message to an MX that does
not advertise DSN (when it does, the parameters went on with the message and that MX
reports, RFC 3461 §5.2.2); NEVER → nothing. Without NOTIFY: failures and delays are
reported (RFC 3461 §4.1 leaves delay notices to the MTA; Postfix sends them too).
Never any report for a message with the null sender (RFC 5321 §4.5.5, §6.1).
It knows nothing of SMTP sessions or the store; the worker queues what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import assert_never

from mailqueue.model import Lease
from relay.delivery.dsn import Action, DsnEntry
from relay.delivery.outcome import Bounced, Deferred, Delivered, Outcome


@dataclass(frozen=True, slots=True)
class Notices:
    entries: tuple[DsnEntry, ...]  # one report lists them all
    delay_notified: frozenset[str]  # recipients for whom a "delayed" report is queued now


def wants(notify: tuple[str, ...] | None, keyword: str) -> bool:
    """Does this recipient's NOTIFY ask for `keyword` ("SUCCESS", "FAILURE", "DELAY")?"""
    if not notify:
        return keyword in ("FAILURE", "DELAY")
    return keyword in notify and "NEVER" not in notify


def notices(
    lease: Lease, outcomes: dict[str, Outcome], *, now: float, delay_notice_after: float
) -> Notices:
    """The report entries owed for `outcomes` of `lease` at time `now` (POSIX seconds)."""
    if not lease.sender:
        return Notices((), frozenset())
    entries: list[DsnEntry] = []
    delayed: set[str] = set()
    waited = now - lease.received_at
    for rcpt in lease.recipients:
        outcome = outcomes.get(rcpt.address)
        if outcome is None:
            continue
        notify = lease.dsn.notify.get(rcpt.address)
        orcpt = lease.dsn.orcpt.get(rcpt.address)
        match outcome:
            case Bounced(reason=reason):
                if wants(notify, "FAILURE"):
                    entries.append(DsnEntry(rcpt.address, Action.FAILED, reason, orcpt))
            case Delivered(reason=reason):
                passed_on = reason.hop is not None and reason.hop.dsn
                if notify and "SUCCESS" in notify and not passed_on:
                    status = reason.status if reason.status.startswith("2.") else "2.0.0"
                    relayed = replace(reason, status=status)
                    entries.append(DsnEntry(rcpt.address, Action.RELAYED, relayed, orcpt))
            case Deferred(reason=reason):
                due = delay_notice_after > 0 and waited >= delay_notice_after
                if due and not rcpt.delay_notified and wants(notify, "DELAY"):
                    until = datetime.fromtimestamp(lease.expires_at, tz=UTC)
                    entries.append(DsnEntry(rcpt.address, Action.DELAYED, reason, orcpt, until))
                    delayed.add(rcpt.address)
            case _:
                assert_never(outcome)
    return Notices(tuple(entries), frozenset(delayed))
