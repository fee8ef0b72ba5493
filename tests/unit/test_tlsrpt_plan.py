"""When reports go out and how failed HTTPS sends are retried (RFC 8460 §4.1, §5.5)."""

from __future__ import annotations

from datetime import UTC, datetime

from tlsrpt import plan
from tlsrpt.model import DeliveryState


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_a_day_is_due_after_its_end_plus_the_delay() -> None:
    assert plan.due_at("2026-03-04", 0) == _ts("2026-03-05T00:00:00")
    assert plan.due_at("2026-03-04", 3600) == _ts("2026-03-05T01:00:00")
    assert plan.previous_day(_ts("2026-03-05T00:10:00")) == "2026-03-04"
    assert plan.catch_up_range(_ts("2026-03-05T00:10:00")) == ("2026-03-02", "2026-03-04")


def test_failed_sends_back_off_exponentially_within_24_hours() -> None:
    start = _ts("2026-03-05T01:00:00")
    (delivery,) = plan.initial_deliveries("id", "d.test", "2026-03-04", ("https://r.test/",), start)
    assert delivery.state is DeliveryState.PENDING
    assert delivery.next_attempt_at == start
    waits = []
    now = start
    while delivery.state is DeliveryState.PENDING:
        delivery = plan.after_failure(delivery, "HTTP 500", now)
        if delivery.next_attempt_at is not None:
            waits.append(delivery.next_attempt_at - now)
            now = delivery.next_attempt_at
    assert delivery.state is DeliveryState.FAILED
    assert delivery.last_error == "HTTP 500"
    assert waits[:4] == [300, 600, 1200, 2400]
    assert max(waits) == plan.MAX_RETRY_S
    assert now - start <= plan.RETRY_WINDOW_S


def test_success_ends_the_delivery() -> None:
    (d,) = plan.initial_deliveries("id", "d.test", "2026-03-04", ("mailto:r@d.test",), 0.0)
    assert plan.after_success(d, queued=True).state is DeliveryState.QUEUED
    sent = plan.after_success(plan.after_failure(d, "x", 1.0), queued=False)
    assert (sent.state, sent.attempts, sent.last_error) == (DeliveryState.SENT, 2, None)


def test_report_ids_are_unique_and_carry_the_submitter() -> None:
    a = plan.new_report_id("2026-03-04", "d.test", "relay.test")
    b = plan.new_report_id("2026-03-04", "d.test", "relay.test")
    assert a != b
    assert a.endswith("@relay.test")
    assert plan.report_token(a).isalnum()
