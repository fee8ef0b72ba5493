"""The WHERE clauses of a queue selection (mailqueue/admin.py `Selection`), in either
store's SQL dialect.

What a selection means is written once, here; `SQLITE` and `POSTGRES` say only how each
database spells a parameter, a list of queue ids, a case-insensitive match and the two
truth values. Every value goes in as a parameter (hence the `noqa: S608`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mailqueue.admin import Pick, Selection
from mailqueue.rows import HELD, SET_ASIDE

PENDING = "r.state IN ('queued', 'deferred')"


@dataclass(frozen=True, slots=True)
class Dialect:
    param: str  # a parameter's placeholder
    queue_id_in: str  # "m.queue_id is one of <param>"
    id_list: Callable[[Sequence[str]], Any]  # the parameter that condition takes
    sender_like: str  # LIKE that ignores ASCII case; its pattern is lowered first
    lower_pattern: bool
    sender_is: str  # equal, ignoring ASCII case
    true: str
    false: str

    @property
    def free(self) -> str:
        """Recipients not being delivered right now (one parameter: now)."""
        return f"(r.lease_until IS NULL OR r.lease_until <= {self.param})"


SQLITE = Dialect(
    param="?",
    queue_id_in="m.queue_id IN (SELECT value FROM json_each(?))",
    id_list=lambda ids: json.dumps(list(ids)),
    sender_like="m.sender LIKE ? ESCAPE '\\'",  # SQLite's LIKE ignores ASCII case
    lower_pattern=False,
    sender_is="m.sender = ? COLLATE NOCASE",
    true="1",
    false="0",
)

POSTGRES = Dialect(
    param="%s",
    queue_id_in="m.queue_id = ANY(%s::text[])",
    id_list=list,
    sender_like="lower(m.sender) LIKE %s ESCAPE '\\'",
    lower_pattern=True,
    sender_is="lower(m.sender) = lower(%s)",
    true="TRUE",
    false="FALSE",
)


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def conditions(
    sel: Selection, now: float, dialect: Dialect
) -> tuple[str, list[Any], str, list[Any]]:
    """(condition on messages `m`, its parameters, condition on their recipients `r`, its
    parameters). The recipient condition also limits what flush and bounce touch."""
    p = dialect.param
    msg: list[str] = []
    msg_args: list[Any] = []
    rcpt = [PENDING]
    rcpt_args: list[Any] = []
    if sel.queue_ids:
        msg.append(dialect.queue_id_in)
        msg_args.append(dialect.id_list(sel.queue_ids))
    if sel.sender is not None:
        if sel.sender in ("", "<>"):
            msg.append("m.sender = ''")
        elif sel.sender.startswith("@"):
            msg.append(dialect.sender_like)
            domain = sel.sender.lower() if dialect.lower_pattern else sel.sender
            msg_args.append("%" + _like(domain))
        else:
            msg.append(dialect.sender_is)
            msg_args.append(sel.sender)
    if sel.domain is not None:
        rcpt.append(f"r.domain = {p}")
        rcpt_args.append(sel.domain.lower().removesuffix("."))
    if sel.state is Pick.HELD:
        msg.append(f"m.held = {HELD}")
    elif sel.state in (Pick.QUEUED, Pick.DEFERRED):
        msg.append("m.held = 0")
        rcpt.append(f"r.state = {p} AND r.held = 0 AND {dialect.free}")
        rcpt_args += [sel.state.value, now]
    elif sel.state is Pick.ACTIVE:
        rcpt.append(f"r.lease_until > {p}")
        rcpt_args.append(now)
    elif sel.state is Pick.SET_ASIDE:
        rcpt.append(f"r.held = {SET_ASIDE}")
    rcpt_sql = " AND ".join(rcpt)
    if sel.recipient_level:
        msg.append(
            f"EXISTS (SELECT 1 FROM queue_recipients r WHERE r.message_id = m.id AND {rcpt_sql})"  # noqa: S608
        )
        msg_args += rcpt_args
    if not sel.given:
        msg.append(dialect.false)  # nothing asked for, nothing selected
    return " AND ".join(msg) or dialect.true, msg_args, rcpt_sql, rcpt_args
