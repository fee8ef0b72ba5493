"""`sts-relay queue ...`: Postfix-style queue administration (mailq, postqueue -f, postsuper)
with exiqgrep-style selections.

Opens the same store as the running relay (SQLite in WAL mode allows it; an admin command
never takes over the relay's leases) and acts on it directly, one transaction per command
whatever the selection's size. Only a store that exists is opened: the caller checks it.

Selections: queue ids, or `--domain`, `--sender`, `--state` (ANDed), or `--all`
(mailqueue/admin.py says what each action touches). `list` and `flush` without one take
the whole queue; `delete`, `hold`, `release` and `bounce` need one. A selection that
matches nothing, or an id not in the queue, is a failure (exit 1).

Audit: every change is journaled by the store in the same transaction, and the running
relay logs it (`queue_admin`) in its own log stream within a second (or at its next start);
this command also logs it on its stderr, in the configured log format.

Exit status: 0 done, 1 nothing matched / no such message / the store is unavailable,
2 usage.
"""

from __future__ import annotations

import json
import os
import pwd
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mailqueue.admin import AdminAction, AdminResult, Pick, Selection
from mailqueue.model import MessageRecord
from mailqueue.store import StoreUnavailable
from relay.cli.output import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, fail, print_json
from relay.cli.queue_bounce import last_error, operator_bounce_report
from relay.config import Config
from relay.events import EventLog, timestamp_field

STATES = tuple(p.value for p in Pick)
CHANGES = tuple(a.value for a in AdminAction)
# What `count` counts, per action.
_UNITS = {
    AdminAction.DELETE: ("message(s)", "deleted"),
    AdminAction.HOLD: ("message(s)", "held"),
    AdminAction.RELEASE: ("message(s)", "released"),
    AdminAction.FLUSH: ("recipient(s)", "made due now"),
    AdminAction.BOUNCE: ("recipient(s)", "bounced"),
}

if TYPE_CHECKING:  # the whole relay is imported only by commands that need it
    from relay.app import AnyStore


@dataclass(frozen=True, slots=True)
class QueueRequest:
    """One `queue` command line, as parsed."""

    action: str
    queue_ids: tuple[str, ...] = ()
    domain: str | None = None
    sender: str | None = None
    state: str | None = None
    everything: bool = False
    as_json: bool = False


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")


def message_as_dict(msg: MessageRecord) -> dict[str, Any]:
    return {
        "queue_id": msg.queue_id,
        "sender": msg.sender,
        "received_at": _iso(msg.received_at),
        "size": msg.size,
        "held": msg.held,
        "recipients": [
            {
                "address": r.address,
                "domain": r.domain,
                "state": r.state.value,
                "attempts": r.attempts,
                "next_attempt_at": _iso(r.next_attempt_at),
                "last_error": r.last_error,
            }
            for r in msg.recipients
        ],
    }


def _print_message(msg: MessageRecord) -> None:
    held = " (held)" if msg.held else ""
    sender = msg.sender or "<>"
    print(f"{msg.queue_id}{held}  {msg.size:>8}  {_iso(msg.received_at)}  {sender}")
    for r in msg.recipients:
        when = _iso(r.next_attempt_at) or "-"
        print(f"    {r.address}  {r.state.value}  attempts={r.attempts}  next={when}")
        if r.last_error:
            print(f"        {r.last_error}")


def operator_name() -> str:
    """Who runs this command, for the journal (the OS user; sudo's caller when known)."""
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = f"uid {os.getuid()}"
    sudo = os.environ.get("SUDO_USER")
    return f"{name} (sudo from {sudo})" if sudo and sudo != name else name


def selection_of(request: QueueRequest) -> Selection | str:
    """The Selection the request names, or why it names none (a usage error)."""
    criteria = (request.domain, request.sender, request.state)
    given = any(c is not None for c in criteria)
    if request.everything and (given or request.queue_ids):
        return "--all selects the whole queue: give it alone"
    if request.queue_ids and given:
        return "give queue ids or --domain/--sender/--state, not both"
    if not (request.everything or given or request.queue_ids):
        if request.action in ("list", "flush"):
            return Selection(everything=True)  # mailq, postqueue -f
        return (
            f"queue {request.action} needs queue ids (ID ...), a selection"
            " (--domain, --sender, --state) or --all"
        )
    domain = request.domain.strip().lower().removesuffix(".") if request.domain else None
    if request.domain is not None and not domain:
        return "--domain needs a domain"
    return Selection(
        queue_ids=tuple(dict.fromkeys(request.queue_ids)),
        domain=domain,
        sender=request.sender.strip() if request.sender is not None else None,
        state=Pick(request.state) if request.state is not None else None,
        everything=request.everything,
    )


async def run_queue_command(cfg: Config, request: QueueRequest) -> int:
    as_json = request.as_json
    selection = selection_of(request) if request.action != "show" else None
    if isinstance(selection, str):
        return fail(selection, EXIT_USAGE, as_json=as_json)
    from relay.app import open_store  # the whole relay: only for commands that need it

    try:
        store = open_store(cfg)
        await store.open()
    except (StoreUnavailable, OSError) as exc:
        return fail(f"cannot open the queue: {exc}", as_json=as_json)
    try:
        if request.action == "show":
            return await _show(store, request.queue_ids[0], as_json)
        assert selection is not None  # noqa: S101 (every action but show has one)
        if request.action == "list":
            return await _list(store, selection, as_json)
        return await _change(cfg, store, AdminAction(request.action), selection, as_json)
    except StoreUnavailable as exc:
        return fail(f"queue unavailable: {exc}", as_json=as_json)
    finally:
        await store.close()


async def _show(store: AnyStore, queue_id: str, as_json: bool) -> int:
    found = await store.get_message(queue_id)
    if found is None:
        return fail(f"no message {queue_id} in the queue", as_json=as_json, queue_id=queue_id)
    if as_json:
        print_json(message_as_dict(found))
    else:
        _print_message(found)
    return EXIT_OK


async def _list(store: AnyStore, selection: Selection, as_json: bool) -> int:
    messages = await store.select(selection)
    missing = [q for q in selection.queue_ids if q not in {m.queue_id for m in messages}]
    if as_json:
        print(json.dumps([message_as_dict(m) for m in messages], indent=2, ensure_ascii=False))
    else:
        for m in messages:
            _print_message(m)
    for queue_id in missing:
        print(f"sts-relay: no message {queue_id} in the queue", file=sys.stderr)
    if selection.everything:
        print(f"-- {len(messages)} message(s) in queue", file=sys.stderr)
        return EXIT_OK
    if not messages and not selection.queue_ids:
        print(f"sts-relay: no message matches {selection.describe()}", file=sys.stderr)
    else:
        print(f"-- {len(messages)} message(s) match {selection.describe()}", file=sys.stderr)
    return EXIT_FAILURE if missing or not messages else EXIT_OK


async def _change(
    cfg: Config, store: AnyStore, action: AdminAction, selection: Selection, as_json: bool
) -> int:
    now = time.time()
    report = None
    if action is AdminAction.BOUNCE:
        report = operator_bounce_report(
            reporting_mta=cfg.delivery.hostname, lifetime=cfg.queue.lifetime, now=now
        )
    result = await store.administer(
        action, selection, operator=operator_name(), reason=last_error(), report=report
    )
    if result.count:
        events = EventLog(sys.stderr, fmt=cfg.log.format, level=cfg.log.level)
        events.queue_admin(
            action=action.value,
            queue_id=selection.queue_ids[0] if len(selection.queue_ids) == 1 else None,
            selection=result.selection,
            matched=result.matched,
            count=result.count,
            operator=operator_name(),
            requested_at=timestamp_field(now),
        )
    status, problems, notes = _judge(result, selection)
    for line in notes:
        print(f"sts-relay: {line}", file=sys.stderr)
    if as_json:
        print_json(_result_dict(result, selection, problems))
    elif result.matched:
        print(_summary(result, selection))
    for line in problems:
        print(f"sts-relay: {line}", file=sys.stderr)
    return status


def _judge(result: AdminResult, selection: Selection) -> tuple[int, list[str], list[str]]:
    """(exit status, failures, remarks) of a change."""
    problems = [f"no message {q} in the queue" for q in result.missing]
    notes = []
    one = selection.queue_ids[0] if len(selection.queue_ids) == 1 else None
    if not result.matched and selection.everything:
        notes.append("the queue is empty")
    elif not result.matched and not selection.queue_ids:
        problems.append(f"no message matches {selection.describe()}")
    if result.action is AdminAction.FLUSH and result.held:
        if one is not None and not result.count:
            problems.append(
                f"message {one} is held: nothing made due (sts-relay queue release {one})"
            )
        else:
            notes.append(f"{result.held} held message(s) left alone (release them first)")
    if result.in_flight:
        text = f"{result.in_flight} recipient(s) being delivered right now left alone"
        if result.action is AdminAction.BOUNCE and not result.count:
            problems.append(f"nothing bounced: {text}")
        else:
            notes.append(text)
    return (EXIT_FAILURE if problems else EXIT_OK), problems, notes


def _result_dict(result: AdminResult, selection: Selection, problems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "action": result.action.value,
        "queue_id": selection.queue_ids[0] if len(selection.queue_ids) == 1 else None,
        "selection": result.selection,
        "matched": result.matched,
        "count": result.count,
        "held": result.held,
        "in_flight": result.in_flight,
    }
    if result.action is AdminAction.BOUNCE:
        out["dsns"] = result.dsns
    if result.missing:
        out["missing"] = list(result.missing)
    if problems:
        out["error"] = "; ".join(problems)
    return out


def _summary(result: AdminResult, selection: Selection) -> str:
    unit, done = _UNITS[result.action]
    if len(selection.queue_ids) == 1 and result.action is not AdminAction.FLUSH:
        what = f"{selection.queue_ids[0]}: {result.action.value} done"
        if not result.count:
            what = f"{selection.queue_ids[0]}: nothing to {result.action.value}"
    else:
        what = f"{result.count} {unit} {done}"
        what += f" ({result.matched} message(s) matched {result.selection})"
    if result.action is AdminAction.BOUNCE:
        what += f"; {result.dsns} report(s) queued to the senders"
    return what
