"""When reports are built and sent, and when a failed HTTPS delivery is tried again.

Pure decisions; `now` and randomness are parameters. RFC 8460 §4.1: one report per Policy
Domain per UTC day, sent after a random delay past midnight; §5.5: failed deliveries are
retried with exponential backoff for up to about 24 hours.
"""

from __future__ import annotations

import secrets
from datetime import UTC, date, datetime, timedelta

from tlsrpt.model import Delivery, DeliveryState
from tlsrpt.report import day_bounds

FIRST_RETRY_S = 300.0
MAX_RETRY_S = 4 * 3600.0
RETRY_WINDOW_S = 24 * 3600.0
CATCH_UP_DAYS = 3  # days missed while the relay was down that are still reported


def previous_day(now: float) -> str:
    today = datetime.fromtimestamp(now, tz=UTC).date()
    return (today - timedelta(days=1)).isoformat()


def catch_up_range(now: float) -> tuple[str, str]:
    """(oldest, newest) days a daily run reports: yesterday and a few before it."""
    newest = date.fromisoformat(previous_day(now))
    return (newest - timedelta(days=CATCH_UP_DAYS - 1)).isoformat(), newest.isoformat()


def prune_before(now: float, keep_days: int) -> str:
    """The oldest day whose counters and reports are still kept."""
    today = datetime.fromtimestamp(now, tz=UTC).date()
    return (today - timedelta(days=keep_days)).isoformat()


def due_at(day: str, delay: float) -> float:
    """When the report of `day` may go: the day's end plus the random `delay`."""
    return day_bounds(day)[1].timestamp() + delay


def new_report_id(day: str, domain: str, submitter: str) -> str:
    """Unique, and shaped for the Subject's `Report-ID: <id@host>` (RFC 8460 §5.3)."""
    token = secrets.token_hex(6)
    return f"{day.replace('-', '')}.{token}.{domain}@{submitter}"


def report_token(report_id: str) -> str:
    """The unique part of a report id, for the §5.1 filename."""
    parts = report_id.split(".")
    return parts[1] if len(parts) > 1 else report_id


def initial_deliveries(
    report_id: str, domain: str, day: str, rua: tuple[str, ...], now: float
) -> list[Delivery]:
    """One delivery per usable URI, each due at once."""
    return [
        Delivery(
            report_id=report_id,
            domain=domain,
            day=day,
            uri=uri,
            state=DeliveryState.PENDING,
            attempts=0,
            first_attempt_at=now,
            next_attempt_at=now,
            last_error=None,
        )
        for uri in rua
    ]


def after_failure(delivery: Delivery, error: str, now: float) -> Delivery:
    """Back off exponentially (5 min, doubling, at most 4 h); give up after 24 h."""
    attempts = delivery.attempts + 1
    wait = min(FIRST_RETRY_S * 2 ** (attempts - 1), MAX_RETRY_S)
    next_at = now + wait
    if next_at > delivery.first_attempt_at + RETRY_WINDOW_S:
        return _with(delivery, DeliveryState.FAILED, attempts, None, error)
    return _with(delivery, DeliveryState.PENDING, attempts, next_at, error)


def after_success(delivery: Delivery, *, queued: bool) -> Delivery:
    """Sent (https accepted) or queued (mailto: the relay's queue retries from here)."""
    state = DeliveryState.QUEUED if queued else DeliveryState.SENT
    return _with(delivery, state, delivery.attempts + 1, None, None)


def _with(
    d: Delivery, state: DeliveryState, attempts: int, next_at: float | None, error: str | None
) -> Delivery:
    return Delivery(
        d.report_id, d.domain, d.day, d.uri, state, attempts, d.first_attempt_at, next_at, error
    )
