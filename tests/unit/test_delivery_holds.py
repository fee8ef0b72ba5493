"""Holding unreachable destinations (relay/delivery/holds.py): the pure decision, what
counts as "unreachable" (attempt.decide, attempt.conversation_failure), and the counters."""

from __future__ import annotations

import io

import pytest

from mailqueue.model import Lease, LeasedRecipient
from policy.model import TlsRptResult
from relay.delivery.attempt import conversation_failure, decide
from relay.delivery.client import ConversationResult
from relay.delivery.holds import (
    Hold,
    Holds,
    held_reason,
    hold_for,
    hold_seconds,
    learn,
    unreachable_failure,
)
from relay.delivery.outcome import Bounced, Deferred, Delivered, Hop, Outcome, Reason
from relay.delivery.pipeline import expire_outcome
from relay.events import EventLog
from relay.metrics import Metrics

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
HOP = Hop(mx="mx.d.test", ip="192.0.2.7")
REFUSED = Reason(
    "mx.d.test[192.0.2.7]: connect to 192.0.2.7 port 25 failed: Connection refused",
    "4.4.1",
    hop=HOP,
    unreachable=True,
)
BUSY = Reason("mx.d.test[192.0.2.7] said: 421 4.3.2 busy", "4.3.2", "421 4.3.2 busy", HOP)
SENT = Delivered(Reason("mx.d.test[192.0.2.7] said: 250 ok", "2.0.0", "250 ok", HOP))
HOLD = Hold("d.test", NOW, NOW + 60, REFUSED)


def lease(expires_at: float = NOW + 86400, domain: str = "d.test") -> Lease:
    return Lease(
        queue_id="Q1",
        domain=domain,
        sender="app@src.test",
        recipients=(LeasedRecipient("a@d.test", 0), LeasedRecipient("b@d.test", 0)),
        received_at=NOW - 10,
        expires_at=expires_at,
        until=NOW + 1200,
    )


def both(outcome: Outcome) -> dict[str, Outcome]:
    return {"a@d.test": outcome, "b@d.test": outcome}


# -- hold or attempt -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("hold", "now", "expires_at", "held"),
    [
        (None, NOW, NOW + 86400, False),
        (HOLD, NOW + 1, NOW + 86400, True),
        (HOLD, NOW + 59.9, NOW + 86400, True),
        (HOLD, NOW + 60, NOW + 86400, False),  # the hold is over: attempt
        (HOLD, NOW + 1, NOW, False),  # lifetime over: its last chance is a real attempt
    ],
    ids=["no hold", "held", "just before the end", "hold over", "expired message"],
)
def test_hold_for(hold: Hold | None, now: float, expires_at: float, held: bool) -> None:
    assert hold_for(hold, now, lease(expires_at)) is (hold if held else None)


def test_the_hold_is_never_longer_than_the_first_retry_step() -> None:
    assert hold_seconds(60, 300) == 60
    assert hold_seconds(60, 1) == 1  # a short schedule keeps every retry a real one
    assert hold_seconds(0, 300) == 0  # off


def test_the_held_reason_says_it_was_not_tried_why_and_until_when() -> None:
    reason = held_reason(HOLD)
    assert reason.text == (
        "not tried: d.test unreachable since 08:00:00Z (mx.d.test[192.0.2.7]: connect to"
        " 192.0.2.7 port 25 failed: Connection refused); held until 08:01:00Z"
    )
    assert reason.status == "4.4.1"
    assert (reason.hop, reason.tlsrpt, reason.unreachable) == (None, None, False)


# -- what begins and what ends a hold ------------------------------------------------


def test_an_unreachable_attempt_begins_a_hold() -> None:
    hold = learn(None, "d.test", both(Deferred(REFUSED)), NOW, 60)
    assert hold == Hold("d.test", NOW, NOW + 60, REFUSED)


def test_attempts_in_flight_when_the_hold_began_do_not_stretch_it() -> None:
    assert learn(HOLD, "d.test", both(Deferred(REFUSED)), NOW + 5, 60) is HOLD


def test_failing_alike_after_the_hold_begins_a_new_one() -> None:
    hold = learn(HOLD, "d.test", both(Deferred(REFUSED)), NOW + 61, 60)
    assert hold == Hold("d.test", NOW + 61, NOW + 121, REFUSED)


@pytest.mark.parametrize(
    "outcomes",
    [
        both(SENT),
        both(Deferred(BUSY)),
        both(Bounced(Reason("550 5.1.1 no such user", "5.1.1", "550 5.1.1", HOP))),
        both(
            Deferred(Reason("TLS failed", "4.7.5", hop=HOP, tlsrpt=TlsRptResult.VALIDATION_FAILURE))
        ),
        both(Deferred(Reason("SERVFAIL for d.test MX", "4.4.3"))),
        {"a@d.test": SENT, "b@d.test": Deferred(REFUSED)},
    ],
    ids=["delivered", "4xx", "5xx", "tls failure", "dns failure", "mixed"],
)
def test_anything_but_unreachable_ends_the_hold(outcomes: dict[str, Outcome]) -> None:
    assert learn(HOLD, "d.test", outcomes, NOW + 5, 60) is None
    assert unreachable_failure(outcomes) is None


def test_an_expired_message_that_met_the_same_keeps_the_hold_as_it_is() -> None:
    bounced = expire_outcome(Deferred(REFUSED))
    assert isinstance(bounced, Bounced)
    assert bounced.reason.status == "4.4.7"
    assert learn(HOLD, "d.test", both(bounced), NOW + 5, 60) is HOLD
    assert learn(None, "d.test", both(bounced), NOW + 5, 60) is None


def test_holds_off_learn_nothing() -> None:
    assert learn(None, "d.test", both(Deferred(REFUSED)), NOW, 0) is None
    holds = Holds(0)
    assert holds.learn("d.test", both(Deferred(REFUSED)), NOW) is None
    assert holds.holding(lease(), NOW) is None


def test_holds_by_domain_and_cleared_by_a_flush() -> None:
    holds = Holds(60)
    began = holds.learn("d.test", both(Deferred(REFUSED)), NOW)
    assert began is not None
    assert holds.learn("d.test", both(Deferred(REFUSED)), NOW + 1) is None  # no new line
    assert holds.holding(lease(), NOW + 1) is began
    assert holds.holding(lease(domain="other.test"), NOW + 1) is None
    assert holds.holding(lease(), NOW + 60) is None
    assert holds.clear() == 1
    assert holds.holding(lease(), NOW + 1) is None
    holds.learn("d.test", both(Deferred(REFUSED)), NOW)
    holds.learn("d.test", both(SENT), NOW + 2)
    assert len(holds) == 0


def test_expired_holds_are_pruned() -> None:
    holds = Holds(60)
    for n in range(1100):
        holds.learn(f"d{n}.test", both(Deferred(REFUSED)), NOW + (n // 1000) * 100)
    assert len(holds) < 1000


# -- "unreachable": every MX address failed before any SMTP reply -----------------------


@pytest.mark.parametrize(
    ("session", "unreachable"),
    [
        (ConversationResult(HOP, error="connect failed: refused", unreachable=True), True),
        (ConversationResult(HOP, error="too many connections (limit)"), False),
        (ConversationResult(HOP, connected=True, error_reply=(421, "4.3.2 busy")), False),
        (ConversationResult(HOP, connected=True, error="connection lost at EHLO"), False),
    ],
    ids=["refused", "no free slot", "421 greeting", "dropped after greeting"],
)
def test_conversation_failure_carries_unreachable(
    session: ConversationResult, unreachable: bool
) -> None:
    assert conversation_failure(session, enforced=False).unreachable is unreachable


def test_decide_marks_the_outcome_unreachable_only_when_every_failure_was() -> None:
    other = Reason("mx2.d.test[192.0.2.8]: connect failed", "4.4.1", hop=HOP, unreachable=True)
    (outcome,) = decide(["a@d.test"], None, [REFUSED, other]).values()
    assert outcome == Deferred(other)
    assert outcome.reason.unreachable
    for failures in ([REFUSED, BUSY], [BUSY, REFUSED], []):
        (outcome,) = decide(["a@d.test"], None, failures).values()
        assert not outcome.reason.unreachable, failures


# -- events and counters -------------------------------------------------------------


def test_holds_are_counted_from_the_event_catalogue() -> None:
    metrics = Metrics()
    events = EventLog(io.StringIO())
    events.subscribe(metrics.observe_event)
    events.destination_held(domain="d.test", until="2027-01-15T08:01:00Z", reason="refused")
    for rcpt, held in (("a@d.test", True), ("b@d.test", False)):
        events.delivery(
            queue_id="Q1",
            rcpt=rcpt,
            domain="d.test",
            status="deferred",
            mx=None,
            ip=None,
            tls=None,
            verified=False,
            sts_mode=None,
            policy_id=None,
            tls_policy=None,
            reason="not tried",
            tlsrpt_result=None,
            attempt=1,
            delay_s=0.1,
            held=held,
        )
    registry = metrics.registry
    assert registry.get_sample_value("sts_relay_destination_holds_total") == 1
    assert registry.get_sample_value("sts_relay_deliveries_held_total") == 1
    deferred = {"status": "deferred"}
    assert registry.get_sample_value("sts_relay_deliveries_total", deferred) == 2
