"""Both queue store engines behind one opener, for tests that hold of every QueueStore:
the embedded SqliteStore on a file, the shared PostgresStore on a fresh database of the
session's real PostgreSQL (tests/support/postgres.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from mailqueue.postgres import PostgresStore
from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite import SqliteStore
from tests.support.queue_store import Clock

ENGINES = ("sqlite", "postgres")
AnyStore = SqliteStore | PostgresStore
AnyOpener = Callable[..., Coroutine[Any, Any, AnyStore]]


def location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a test's store lives for the engine `request.param` names: a file, or the
    URL of a fresh database (the PostgreSQL server starts with the first test using it)."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        assert isinstance(url, str)
        return url
    return tmp_path / "state" / "relay.db"


def open_any(where: Path | str, **kw: Any) -> AnyStore:
    if isinstance(where, str):
        # No background maintenance: what a test counts (commits) is its own doing.
        return PostgresStore(where, **({"maintenance_every": None} | kw))
    return SqliteStore(where, **kw)


@asynccontextmanager
async def engine_opener(
    where: Path | str, clock: Clock, *, schedule: RetrySchedule, lifetime: float
) -> AsyncIterator[AnyOpener]:
    """`await opener(**overrides)` opens a store of the engine `where` names; all are
    closed on exit."""
    opened: list[AnyStore] = []

    async def opener(**kw: Any) -> AnyStore:
        args: dict[str, Any] = {"schedule": schedule, "lifetime": lifetime, "clock": clock}
        store = open_any(where, **(args | kw))
        await store.open()
        opened.append(store)
        return store

    try:
        yield opener
    finally:
        for store in opened:
            await store.close()
