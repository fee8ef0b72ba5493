"""Retry schedule: when a deferred recipient is tried again.

Pure: `now` and the random source are parameters. Knows nothing of storage or SMTP.
RFC 5321 §4.5.4.1: a failed destination is not retried at once, intervals grow, the
give-up time is at least 4-5 days, and both are configurable (the relay's config
builds a `RetrySchedule` and a lifetime from its settings).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

JITTER = 0.10  # ±10%: spreads retries of a burst deferred together (thundering herd)


@dataclass(frozen=True)
class RetrySchedule:
    """Delays in seconds after the 1st, 2nd, ... failed attempt; the last one repeats."""

    delays: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.delays:
            raise ValueError("retry schedule: at least one delay is required")
        if any(not d > 0 for d in self.delays):
            raise ValueError("retry schedule: every delay must be positive")

    def delay(self, attempts_made: int) -> float:
        """The nominal delay after `attempts_made` attempts (1 = after the first one)."""
        index = min(max(attempts_made, 1), len(self.delays)) - 1
        return self.delays[index]

    def next_attempt_at(
        self, attempts_made: int, now: float, rng: random.Random | None = None
    ) -> float:
        """When to try again after `attempts_made` failed attempts, the last one at `now`."""
        delay = self.delay(attempts_made)
        if rng is not None:
            delay *= 1.0 + rng.uniform(-JITTER, JITTER)
        return now + delay

    def retry_at(
        self, attempts_made: int, now: float, expires_at: float, rng: random.Random | None = None
    ) -> float:
        """When a recipient deferred for the `attempts_made`th time at `now` is tried again:
        the schedule's time, but never after `expires_at` (the message's lifetime) while that
        is still ahead: one last attempt when the lifetime ends, not up to a whole delay
        later (the worker turns a deferral after expires_at into a bounce)."""
        next_at = self.next_attempt_at(attempts_made, now, rng)
        return min(next_at, expires_at) if now < expires_at else next_at


# Two attempts in the first 15 minutes, then growing to every 4 hours (RFC 5321 §4.5.4.1
# suggests at least 30 minutes between retries once a destination keeps failing).
DEFAULT_RETRY_SCHEDULE = RetrySchedule((300, 600, 1200, 2400, 3600, 7200, 14400))
DEFAULT_LIFETIME = 5 * 86400.0  # RFC 5321 §4.5.4.1: give up after at least 4-5 days
