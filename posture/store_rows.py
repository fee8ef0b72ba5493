"""Posture rows as values, whatever the engine: a daily aggregate's row and a waiting
entry's row, and their decoding (a corrupt row decodes to None, and is skipped).

Pure: no I/O, no SQL dialect. Shared by the SQLite store (store.py) and the PostgreSQL
store (store_postgres.py), so that both count and read the same aggregates. Knows nothing
of SMTP or the queue.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from posture.model import Cell, Figures, Mechanism, Status, Waiting

# A `posture_daily` row: day, domain, status, mechanism, tls, authenticated, cause, then
# the messages and recipients counted. `authenticated` is a bool for PostgreSQL's BOOLEAN
# column; SQLite stores it as the integer 1 or 0, as it does any Python int.
DailyRow = tuple[str, str, str, str, str, bool, str, int, int]


# --- posture_daily --------------------------------------------------------------------------


def daily_rows(cells: Mapping[Cell, Figures]) -> list[DailyRow]:
    """The rows of `cells`, in the mapping's order."""
    return [
        (
            c.day,
            c.domain,
            c.status.value,
            c.mechanism.value,
            c.tls,
            c.authenticated,
            c.cause,
            f.messages,
            f.recipients,
        )
        for c, f in cells.items()
    ]


def cell_from_row(row: tuple[object, ...]) -> tuple[Cell, Figures] | None:
    """The aggregate of a row in DailyRow's column order; None when it is corrupt."""
    day, domain, status, mechanism, tls, authenticated, cause, messages, recipients = row
    try:
        cell = Cell(
            str(day),
            str(domain),
            Status(str(status)),
            Mechanism(str(mechanism)),
            str(tls),
            bool(authenticated),
            str(cause),
        )
    except ValueError:
        return None
    if not isinstance(messages, int) or not isinstance(recipients, int):
        return None
    return cell, Figures(messages, recipients)


def cells_from_rows(rows: Iterable[tuple[object, ...]]) -> list[tuple[Cell, Figures]]:
    """The aggregates of readable rows, in their order."""
    return [c for c in map(cell_from_row, rows) if c is not None]


# --- posture_waiting ------------------------------------------------------------------------


def waiting_row(w: Waiting) -> tuple[object, ...]:
    """`w`'s row: key, domain, recipients, since, last_at, mechanism, result."""
    return (w.key, w.domain, w.recipients, w.since, w.last_at, w.mechanism.value, w.result)


def waiting_from_row(row: tuple[object, ...]) -> Waiting | None:
    """The entry of a row in waiting_row's column order; None when it is corrupt."""
    key, domain, recipients, since, last_at, mechanism, result = row
    if not isinstance(recipients, int) or not isinstance(since, int | float):
        return None
    if not isinstance(last_at, int | float):
        return None
    try:
        parsed = Mechanism(str(mechanism))
    except ValueError:
        return None
    return Waiting(
        str(key),
        str(domain),
        recipients,
        float(since),
        float(last_at),
        parsed,
        None if result is None else str(result),
    )


def waiting_from_rows(rows: Iterable[tuple[object, ...]]) -> list[Waiting]:
    """The entries of readable rows, in their order."""
    return [w for w in map(waiting_from_row, rows) if w is not None]
