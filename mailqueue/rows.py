"""Queue rows as values, whatever the engine: the envelope check, the DSN column's codec,
decoding a row into a record, and turning the per-(state, held) counters into counts.

Pure: no I/O, no SQL dialect. Shared by the SQLite store (sqlite_*.py) and the PostgreSQL
store (postgres_*.py), so that both store, decode and count a message the same way.
Knows nothing of TLS, SMTP or MTA-STS.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from mailqueue.model import DsnRequest, MessageRecord, NewMessage, RcptState, RecipientRecord

# The recipients' `held` column: 0 deliverable, 1 its message is held by an operator, 2 set
# aside as unreadable (never leased again, counted as "set_aside").
HELD, SET_ASIDE = 1, 2


def check_envelope(msg: NewMessage) -> None:
    """ValueError for an envelope no store takes: no recipient, or one without a domain."""
    if not msg.recipients:
        raise ValueError("a message needs at least one recipient")
    if any("@" not in address for address in msg.recipients):
        raise ValueError("every recipient needs a domain")


def domain_of(address: str) -> str:
    """The part after the last '@', lower-cased (recipients are grouped by it)."""
    return address.rpartition("@")[2].lower()


def dsn_to_json(dsn: DsnRequest) -> str | None:
    """The column value: NULL when the client gave no RFC 3461 parameter at all."""
    if dsn == DsnRequest():
        return None
    value = {
        "ret": dsn.ret,
        "envid": dsn.envid,
        "notify": {rcpt: list(words) for rcpt, words in dsn.notify.items()},
        "orcpt": dict(dsn.orcpt),
    }
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def dsn_from_json(text: Any) -> DsnRequest | None:
    """Decode the column; None when it is not what dsn_to_json writes (set the row aside)."""
    if text is None:
        return DsnRequest()
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    ret, envid = value.get("ret"), value.get("envid")
    notify, orcpt = value.get("notify", {}), value.get("orcpt", {})
    if not (_opt_str(ret) and _opt_str(envid) and isinstance(notify, dict)):
        return None
    if not isinstance(orcpt, dict) or not all(isinstance(v, str) for v in orcpt.values()):
        return None
    if not all(
        isinstance(words, list) and all(isinstance(w, str) for w in words)
        for words in notify.values()
    ):
        return None
    return DsnRequest(
        ret=ret,
        envid=envid,
        notify={str(k): tuple(v) for k, v in notify.items()},
        orcpt={str(k): v for k, v in orcpt.items()},
    )


def _opt_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


def recipient_record(row: Sequence[Any]) -> RecipientRecord | None:
    """(address, domain, state, attempts, next_attempt_at, last_error) as a record; None
    when the row cannot be decoded (it is skipped, never fatal)."""
    address, domain, state, attempts, next_at, last_error = row
    try:
        rcpt_state = RcptState(state)
    except ValueError:
        return None
    if not (isinstance(address, str) and isinstance(domain, str) and type(attempts) is int):
        return None
    if next_at is not None and not isinstance(next_at, int | float):
        return None
    return RecipientRecord(
        address=address,
        domain=domain,
        state=rcpt_state,
        attempts=attempts,
        next_attempt_at=None if next_at is None else float(next_at),
        last_error=last_error if isinstance(last_error, str) else None,
    )


def message_record(row: Sequence[Any], rcpts: Iterable[Sequence[Any]]) -> MessageRecord | None:
    """(row id, queue_id, sender, received_at, size, held) and its recipient rows as a
    record; None when the message row cannot be decoded."""
    _, queue_id, sender, received_at, size, held = row
    if not (isinstance(queue_id, str) and isinstance(sender, str)):
        return None
    if not (isinstance(received_at, int | float) and type(size) is int):
        return None
    decoded = (recipient_record(r) for r in rcpts)
    return MessageRecord(
        queue_id=queue_id,
        sender=sender,
        received_at=float(received_at),
        size=size,
        held=bool(held),
        recipients=tuple(r for r in decoded if r is not None),
    )


def tally_counts(rows: Iterable[Sequence[Any]]) -> dict[str, int]:
    """Counts from counter rows (kind, state, held, n): recipients per state; "held" (of
    held messages), "set_aside", and "messages". Recipients in a state this code does not
    know count as set aside, as the rows themselves are."""
    states = [state.value for state in RcptState]
    out = dict.fromkeys(states, 0)
    held = total = messages = 0
    for kind, state, flag, n in rows:
        if type(n) is not int:
            continue
        if kind == "messages":
            messages += n
            continue
        total += n
        held += n if flag == HELD else 0
        if flag != SET_ASIDE and state in out:
            out[state] += n
    out["held"] = held
    out["set_aside"] = total - sum(out[s] for s in states)
    out["messages"] = messages
    return out
