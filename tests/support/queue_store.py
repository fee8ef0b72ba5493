"""SqliteStore test scaffolding shared by the store's test files: a settable clock and an
opener that closes every store it opened."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite import SqliteStore

T0 = 1_700_000_000.0


class Clock:
    """The store's clock, moved by the test (`clock.now += 60`)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


Opener = Callable[..., Coroutine[Any, Any, SqliteStore]]


@asynccontextmanager
async def store_opener(
    db: Path, clock: Clock, *, schedule: RetrySchedule, lifetime: float
) -> AsyncIterator[Opener]:
    """`await opener(cls=SqliteStore, **overrides)` opens a store on `db`; all are closed
    on exit."""
    opened: list[SqliteStore] = []

    async def opener(cls: type[SqliteStore] = SqliteStore, **kw: Any) -> SqliteStore:
        args: dict[str, Any] = {"schedule": schedule, "lifetime": lifetime, "clock": clock}
        store = cls(db, **(args | kw))
        await store.open()
        opened.append(store)
        return store

    try:
        yield opener
    finally:
        for store in opened:
            await store.close()
