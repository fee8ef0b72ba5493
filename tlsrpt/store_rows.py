"""TLSRPT rows as values, whatever the engine: a session counter's key fields, a delivery's
row and its update, and the decoding of counter and delivery rows (a corrupt one decodes
to None, and is skipped).

Pure: no I/O, no SQL dialect. Shared by the SQLite store (store.py) and the PostgreSQL
store (store_postgres.py), so that both count, store and read reports the same way.
Knows nothing of DNS, SMTP or HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Final

from policy.model import TlsRptResult
from tlsrpt.model import AppliedPolicy, Count, Delivery, DeliveryState, Failure, PolicyType, Session

# What delivery_from_row reads, in its order (`d`: tlsrpt_deliveries, `r`: tlsrpt_reports).
DELIVERY_COLUMNS: Final = (
    "d.report_id, r.domain, r.day, d.uri, d.state, d.attempts, d.first_attempt_at,"
    " d.next_attempt_at, d.last_error"
)


# --- tlsrpt_sessions ------------------------------------------------------------------------


def counter_key(s: Session) -> tuple[str, ...]:
    """The key of `s`'s counter: day, domain, policy_type, policy_strings, policy_mx,
    result_type, receiving_mx, receiving_ip, sending_ip (a success has no failure: '')."""
    f = s.failure
    return (
        s.day,
        s.domain,
        s.policy.type.value,
        json.dumps(list(s.policy.strings)),
        json.dumps(list(s.policy.mx)),
        f.result.value if f else "",
        f.receiving_mx if f else "",
        f.receiving_ip if f else "",
        f.sending_ip if f else "",
    )


def count_from_row(row: tuple[object, ...]) -> Count | None:
    """The counter of a row: counter_key's fields, then the count; None when corrupt."""
    day, domain, ptype, pstrings, pmx, result, mx, rip, sip, count = row
    strings, patterns = _strings(pstrings), _strings(pmx)
    try:
        policy_type = PolicyType(str(ptype))
        failure = (
            Failure(TlsRptResult(str(result)), str(mx), str(rip), str(sip)) if result else None
        )
    except ValueError:
        return None
    if strings is None or patterns is None or not isinstance(count, int):
        return None
    policy = AppliedPolicy(policy_type, strings, patterns)
    return Count(str(domain), str(day), policy, failure, count)


def counts_from_rows(rows: Iterable[tuple[object, ...]]) -> list[Count]:
    """The counters of readable rows, in their order."""
    return [c for c in map(count_from_row, rows) if c is not None]


def _strings(raw: object) -> tuple[str, ...] | None:
    try:
        value = json.loads(str(raw))
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


# --- tlsrpt_deliveries ----------------------------------------------------------------------


def delivery_row(d: Delivery) -> tuple[object, ...]:
    """`d`'s row: report_id, uri, state, attempts, first_attempt_at, next_attempt_at,
    last_error."""
    return (
        d.report_id,
        d.uri,
        d.state.value,
        d.attempts,
        d.first_attempt_at,
        d.next_attempt_at,
        d.last_error,
    )


def delivery_result_row(d: Delivery) -> tuple[object, ...]:
    """What an attempt changes in `d`'s row (state, attempts, next_attempt_at, last_error),
    then its key (report_id, uri)."""
    return (d.state.value, d.attempts, d.next_attempt_at, d.last_error, d.report_id, d.uri)


def delivery_from_row(row: tuple[object, ...]) -> Delivery | None:
    """The delivery of a row of DELIVERY_COLUMNS; None when corrupt."""
    report_id, domain, day, uri, state, attempts, first, next_at, error = row
    try:
        parsed_state = DeliveryState(str(state))
    except ValueError:
        return None
    if not isinstance(attempts, int) or not isinstance(first, int | float):
        return None
    return Delivery(
        report_id=str(report_id),
        domain=str(domain),
        day=str(day),
        uri=str(uri),
        state=parsed_state,
        attempts=attempts,
        first_attempt_at=float(first),
        next_attempt_at=float(next_at) if isinstance(next_at, int | float) else None,
        last_error=str(error) if error is not None else None,
    )


def deliveries_from_rows(rows: Iterable[tuple[object, ...]]) -> list[Delivery]:
    """The deliveries of readable rows, in their order."""
    return [d for d in map(delivery_from_row, rows) if d is not None]


def due_from_rows(rows: Iterable[tuple[object, ...]]) -> list[tuple[Delivery, bytes]]:
    """Rows of DELIVERY_COLUMNS and then the report's payload, as (delivery, payload); a
    row that is corrupt or has no payload is skipped."""
    out = []
    for row in rows:
        delivery = delivery_from_row(row[:-1])
        if delivery is not None and isinstance(row[-1], bytes):
            out.append((delivery, row[-1]))
    return out


def time_from_row(row: tuple[object, ...] | None) -> float | None:
    """The time in a one-column row (an aggregate's); None for none, NULL or a non-number."""
    value = row[0] if row else None
    return float(value) if isinstance(value, int | float) else None
