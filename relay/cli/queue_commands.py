"""`sts-relay queue ...`: Postfix-style queue administration (mailq, postqueue -f, postsuper).

Opens the same store as the running relay (SQLite in WAL mode allows it; an admin command
never takes over the relay's leases) and acts on it directly. The relay's worker looks at
the store at least every 0.5 s, so a flush takes effect within a second.

Audit: every change (flush, delete, hold, release) is logged as a `queue_admin` event by
THIS command, on its stderr, in the configured log format. The running relay is another
process and does not see it: where an audit trail matters, keep the command's stderr (e.g.
`docker exec relay sts-relay queue delete ID 2>>/var/log/sts-relay-admin.log`).

Exit status: 0 done, 1 no such message or the store is unavailable, 2 usage.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

from mailqueue.model import MessageRecord
from mailqueue.sqlite import SqliteStore
from mailqueue.store import StoreUnavailable
from relay.app import open_store
from relay.config import Config
from relay.events import EventLog

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


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


def _fail(text: str, status: int = EXIT_FAILURE) -> int:
    print(f"sts-relay: {text}", file=sys.stderr)
    return status


async def run_queue_command(cfg: Config, action: str, queue_id: str | None, as_json: bool) -> int:
    if queue_id is None and action not in ("list", "flush"):
        return _fail(f"queue {action} needs a queue id", EXIT_USAGE)
    try:
        store = open_store(cfg)
        await store.open()
    except (StoreUnavailable, OSError) as exc:
        return _fail(f"cannot open the queue: {exc}")
    events = EventLog(sys.stderr, fmt=cfg.log.format, level=cfg.log.level)
    try:
        if action == "list":
            return await _list(store, as_json)
        if action == "flush":
            return await _flush(store, events, queue_id, as_json)
        assert queue_id is not None  # noqa: S101 (checked above)
        return await _one(store, events, action, queue_id, as_json)
    except StoreUnavailable as exc:
        return _fail(f"queue unavailable: {exc}")
    finally:
        await store.close()


async def _list(store: SqliteStore, as_json: bool) -> int:
    messages = await store.list_messages()
    if as_json:
        print(json.dumps([message_as_dict(m) for m in messages], indent=2))
        return EXIT_OK
    for m in messages:
        _print_message(m)
    print(f"-- {len(messages)} message(s) in queue", file=sys.stderr)
    return EXIT_OK


async def _flush(store: SqliteStore, events: EventLog, queue_id: str | None, as_json: bool) -> int:
    if queue_id is not None and await store.get_message(queue_id) is None:
        return _fail(f"no message {queue_id} in the queue")
    count = await store.flush(queue_id)
    events.queue_admin(action="flush", queue_id=queue_id)
    _report(as_json, "flush", queue_id, count, f"{count} recipient(s) made due now")
    return EXIT_OK


async def _one(
    store: SqliteStore, events: EventLog, action: str, queue_id: str, as_json: bool
) -> int:
    if action == "show":
        found = await store.get_message(queue_id)
        if found is None:
            return _fail(f"no message {queue_id} in the queue")
        if as_json:
            print(json.dumps(message_as_dict(found), indent=2))
        else:
            _print_message(found)
        return EXIT_OK
    operation = {"delete": store.delete, "hold": store.hold, "release": store.release_hold}
    if not await operation[action](queue_id):
        return _fail(f"no message {queue_id} in the queue")
    events.queue_admin(action=action, queue_id=queue_id)
    _report(as_json, action, queue_id, 1, f"{queue_id}: {action} done")
    return EXIT_OK


def _report(as_json: bool, action: str, queue_id: str | None, count: int, text: str) -> None:
    if as_json:
        print(json.dumps({"action": action, "queue_id": queue_id, "count": count}))
    else:
        print(text)
