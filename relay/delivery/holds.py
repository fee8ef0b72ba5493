"""Destinations found unreachable, and the decision to hold their mail without trying.

Postfix's queue manager marks a destination dead once a cohort of its mail found every MX
address refusing or timing out, and defers the rest of its mail without contacting it
("delivery temporarily suspended"); Exim skips hosts whose retry time has not come. This
module does the same for the scheduler: when an attempt of a domain ends with every MX
address failing at the network level before any SMTP reply (`Reason.unreachable`, set by
`attempt.decide`), the domain is held for `delivery.unreachable_hold` seconds. While it
is held, its leases are deferred at once, with no DNS query, no policy lookup and no
connection: the failing MX is spared the flood and we the work. Each held recipient
follows its own retry schedule as if it had been tried.

The decision (`hold_for`, `learn`) is pure: hold state, the time and the lease in, the
hold or the new state out. `Holds` keeps the state of one process in memory: each process
(`serve.processes`) and each node learns on its own, and a restart forgets, which costs
no more than one attempt per unreachable domain to learn again.

What ends a hold: its time (the next lease is attempted; failing the same way, it begins
a new hold); any attempted result that is not "unreachable" (a delivery, a reply of any
kind, a TLS failure: the domain answered; also a DNS or policy failure, which says
nothing of reachability: ending a hold early costs one attempt, never mail); an operator's
`sts-relay queue flush` (the scheduler reads the queue's journal before it holds mail).
A message whose lifetime is over is never held: its last chance is a real attempt.

Knows outcomes and leases; nothing of DNS, SMTP, the store or events.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from mailqueue.model import Lease
from relay.delivery.outcome import Deferred, Delivered, Outcome, Reason

# Expired holds are dropped once this many domains are remembered (a hold ends by time
# without anyone asking, for a domain mailed no more).
_PRUNE_AT = 1024


@dataclass(frozen=True, slots=True)
class Hold:
    """`domain` found unreachable at `since` (POSIX seconds), held until `until`;
    `failure` is what the attempt that began the hold met (status 4.4.1)."""

    domain: str
    since: float
    until: float
    failure: Reason


def hold_seconds(configured: float, first_retry: float) -> float:
    """The hold in force: `delivery.unreachable_hold` (0: off), never longer than the first
    step of `queue.retry_schedule`, so mail deferred by a real attempt finds the hold over
    when its retry comes, unless a later attempt found the domain unreachable again."""
    return max(0.0, min(configured, first_retry))


def hold_for(hold: Hold | None, now: float, lease: Lease) -> Hold | None:
    """The hold that keeps `lease` from being attempted at `now`, or None: attempt it.

    An expired message is always attempted (its last chance: a bounce must come from a
    real failure, not a remembered one, and a REQUIRETLS message's 5.7.30 from its own)."""
    if hold is None or now >= hold.until or now >= lease.expires_at:
        return None
    return hold


def unreachable_failure(outcomes: Mapping[str, Outcome]) -> Reason | None:
    """The failure showing the destination unreachable: every recipient deferred because
    every MX address tried failed at the network level, else None."""
    failure = None
    for outcome in outcomes.values():
        if not isinstance(outcome, Deferred) or not outcome.reason.unreachable:
            return None
        failure = outcome.reason
    return failure


def learn(
    hold: Hold | None, domain: str, outcomes: Mapping[str, Outcome], now: float, seconds: float
) -> Hold | None:
    """The hold of `domain` after an attempt that ended at `now` with `outcomes`.

    Unreachable: a new hold of `seconds`, unless one is in force (the attempts in flight
    when it began must not stretch it). The last chance of expired mail that met the same
    (bounced, `unreachable` kept by `pipeline.expire_outcome`) changes nothing. Anything
    else ends the hold."""
    if seconds <= 0:
        return None
    failure = unreachable_failure(outcomes)
    if failure is None:
        expired_alike = all(
            not isinstance(o, Delivered) and o.reason.unreachable for o in outcomes.values()
        )
        return hold if expired_alike and outcomes else None
    if hold is not None and now < hold.until:
        return hold
    return Hold(domain, now, now + seconds, failure)


def held_reason(hold: Hold) -> Reason:
    """Why a lease was not tried: said plainly, with the remembered failure and its status.
    No hop: no MX was contacted."""
    failure = hold.failure
    text = (
        f"not tried: {hold.domain} unreachable since {_clock(hold.since)}"
        f" ({failure.text}); held until {_clock(hold.until)}"
    )
    return Reason(text, failure.status)


def _clock(posix: float) -> str:
    return time.strftime("%H:%M:%SZ", time.gmtime(posix))


class Holds:
    """The holds of one process, by domain. `seconds` 0 holds nothing."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._held: dict[str, Hold] = {}

    def __len__(self) -> int:
        return len(self._held)

    def holding(self, lease: Lease, now: float) -> Hold | None:
        """The hold that keeps `lease` from being attempted now (`hold_for`), or None."""
        if not self._held:
            return None  # the common case: nothing held, one dict look-up saved
        return hold_for(self._held.get(lease.domain), now, lease)

    def learn(self, domain: str, outcomes: Mapping[str, Outcome], now: float) -> Hold | None:
        """Take in an attempt of `domain` that ended at `now`; the hold it began, if any."""
        if self.seconds <= 0:
            return None
        before = self._held.get(domain)
        after = learn(before, domain, outcomes, now, self.seconds)
        if after is None:
            self._held.pop(domain, None)
            return None
        if after is before:
            return None
        if len(self._held) >= _PRUNE_AT:
            self._held = {d: h for d, h in self._held.items() if now < h.until}
        self._held[domain] = after
        return after

    def clear(self) -> int:
        """Forget every hold (an operator's flush); how many were in force or remembered."""
        count = len(self._held)
        self._held.clear()
        return count
