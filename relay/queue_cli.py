"""`sts-relay queue ...`: Postfix-style queue administration (mailq, postqueue -f, postsuper).

Opens the same store as the running relay (SQLite in WAL mode allows it) and acts on it
directly; the relay's worker notices flushed mail within a second.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

from mailqueue.model import MessageRecord
from mailqueue.sqlite import SqliteStore
from relay.app import open_store
from relay.config import Config
from relay.events import EventLog


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


async def run_queue_command(cfg: Config, action: str, queue_id: str | None, as_json: bool) -> int:
    store = open_store(cfg)
    await store.open()
    events = EventLog(sys.stderr, fmt=cfg.log.format, level=cfg.log.level)
    try:
        if action == "list":
            return await _list(store, as_json)
        if action == "flush":
            count = await store.flush(queue_id)
            events.queue_admin(action="flush", queue_id=queue_id)
            _report(as_json, action, queue_id, count, f"{count} recipient(s) made due now")
            return 0
        if queue_id is None:
            print(f"sts-relay: queue {action} needs a queue id", file=sys.stderr)
            return 2
        return await _one(store, events, action, queue_id, as_json)
    finally:
        await store.close()


async def _list(store: SqliteStore, as_json: bool) -> int:
    messages = await store.list_messages()
    if as_json:
        print(json.dumps([message_as_dict(m) for m in messages], indent=2))
        return 0
    for m in messages:
        _print_message(m)
    print(f"-- {len(messages)} message(s) in queue", file=sys.stderr)
    return 0


async def _one(
    store: SqliteStore, events: EventLog, action: str, queue_id: str, as_json: bool
) -> int:
    if action == "show":
        found = await store.get_message(queue_id)
        if found is None:
            print(f"sts-relay: no message {queue_id} in the queue", file=sys.stderr)
            return 1
        if as_json:
            print(json.dumps(message_as_dict(found), indent=2))
        else:
            _print_message(found)
        return 0
    operation = {"delete": store.delete, "hold": store.hold, "release": store.release_hold}
    if not await operation[action](queue_id):
        print(f"sts-relay: no message {queue_id} in the queue", file=sys.stderr)
        return 1
    events.queue_admin(action=action, queue_id=queue_id)
    _report(as_json, action, queue_id, 1, f"{queue_id}: {action} done")
    return 0


def _report(as_json: bool, action: str, queue_id: str | None, count: int, text: str) -> None:
    if as_json:
        print(json.dumps({"action": action, "queue_id": queue_id, "count": count}))
    else:
        print(text)
