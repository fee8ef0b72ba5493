"""Polling with a deadline and JSON-log parsing for tests; knows nothing about the relay's code."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


async def eventually(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,  # noqa: ASYNC109 (a polling deadline, the agreed API)
    interval: float = 0.05,
    message: str | None = None,
) -> T:
    """Poll `predicate` (sync or async) until it returns a truthy value; return that value.

    Raises AssertionError naming the predicate (or `message`) when `timeout` runs out.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            what = message or getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(f"not true within {timeout} s: {what} (last value {value!r})")
        await asyncio.sleep(interval)


def read_events(lines: Iterable[str | bytes], *, strict: bool = True) -> list[dict[str, Any]]:
    """Parse JSON log lines into dicts; blank lines are skipped.

    strict=True raises ValueError on a line that is not a JSON object (logs must be JSON
    only); strict=False skips such lines (e.g. a traceback on stderr).
    """
    events: list[dict[str, Any]] = []
    for raw in lines:
        line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            if strict:
                raise ValueError(f"not a JSON object log line: {line!r}")
            continue
        events.append(event)
    return events


def events_named(
    events: Iterable[dict[str, Any]], name: str, **fields: Any
) -> list[dict[str, Any]]:
    """Events whose `event` is `name` and whose fields equal the given values."""
    return [
        e
        for e in events
        if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
    ]
