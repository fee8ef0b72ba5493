"""Retry schedule: grows, repeats its last delay, jitters within ±10%, validates input."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailqueue.schedule import DEFAULT_LIFETIME, DEFAULT_RETRY_SCHEDULE, RetrySchedule

SCHEDULE = RetrySchedule((10.0, 20.0, 40.0))


@pytest.mark.parametrize(
    ("attempts_made", "expected"),
    [(1, 1010.0), (2, 1020.0), (3, 1040.0), (4, 1040.0), (50, 1040.0), (0, 1010.0)],
)
def test_delay_by_attempt_and_last_repeats(attempts_made: int, expected: float) -> None:
    assert SCHEDULE.next_attempt_at(attempts_made, now=1000.0) == expected


def test_default_schedule_grows_and_is_rfc5321_shaped() -> None:
    delays = DEFAULT_RETRY_SCHEDULE.delays
    assert delays == (300.0, 600.0, 1200.0, 2400.0, 3600.0, 7200.0, 14400.0)
    assert all(a < b for a, b in itertools.pairwise(delays))
    # SMTP-08: never retried at once; the second attempt is not within 60 s of the first.
    assert DEFAULT_RETRY_SCHEDULE.next_attempt_at(1, 0.0, random.Random(1)) > 60
    assert DEFAULT_LIFETIME == 5 * 86400
    assert DEFAULT_LIFETIME >= 4 * 86400


def test_jitter_is_deterministic_for_a_seeded_rng_and_varies() -> None:
    first = [SCHEDULE.next_attempt_at(1, 0.0, random.Random(7)) for _ in range(3)]
    assert len(set(first)) == 1
    rng = random.Random(7)
    spread = {SCHEDULE.next_attempt_at(1, 0.0, rng) for _ in range(50)}
    assert len(spread) > 1


@given(
    attempts=st.integers(min_value=-5, max_value=1000),
    now=st.floats(min_value=0, max_value=4e9),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_jitter_stays_within_ten_percent(attempts: int, now: float, seed: int) -> None:
    nominal = DEFAULT_RETRY_SCHEDULE.delay(attempts)
    at = DEFAULT_RETRY_SCHEDULE.next_attempt_at(attempts, now, random.Random(seed))
    assert nominal * 0.9 - 1e-6 <= at - now <= nominal * 1.1 + 1e-6
    assert at > now


@pytest.mark.parametrize("delays", [(), (0.0,), (10.0, -1.0), (float("nan"),)])
def test_invalid_schedules_are_refused(delays: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="retry schedule"):
        RetrySchedule(delays)
