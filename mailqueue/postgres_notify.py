"""Wake-ups of the PostgreSQL queue store: one session LISTENs on the queue's channel and
tells every subscriber that the queue changed (an admin change, a flush, a release, made
on any node), so that a node acts at once instead of at its next poll.

Notifications are hints, never data: the subscriber looks at the store again. So they are
coalesced (one wake-up for many notifications), and one is given whenever the session
(re)connects, since what was sent while it was away is lost. The session reconnects by
itself after the database comes back (pausing 0.5 s, doubling up to 10 s), and is
checked every `check_every` seconds so that a silently dead connection is noticed.

Knows psycopg's LISTEN and asyncio; nothing of messages or leases.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import psycopg
from psycopg import sql

Connect = Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]
_FIRST_PAUSE_S = 0.5
_MAX_PAUSE_S = 10.0


class Listener:
    """The LISTEN session, started by the first subscriber and stopped by `close()`."""

    def __init__(self, connect: Connect, channel: str, *, check_every: float = 15.0) -> None:
        self._connect = connect
        self._channel = channel
        self._check_every = check_every
        self._subscribers: set[asyncio.Event] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.listening = False  # the session is up and LISTENing (for tests and health)
        self.last_error: str | None = None  # why it is not, when it failed

    async def subscribe(self) -> AsyncGenerator[None, None]:
        """Yields once now that the session listens, then once per burst of notifications,
        until the listener is closed."""
        event = asyncio.Event()
        self._subscribers.add(event)
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="mailqueue-postgres-listen")
        try:
            while True:
                await event.wait()
                event.clear()
                if self._closed:
                    return
                yield None
        finally:
            self._subscribers.discard(event)

    def _wake(self) -> None:
        for event in self._subscribers:
            event.set()

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
            self._task = None
        self._wake()  # subscribers see `_closed` and end

    async def _run(self) -> None:
        pause = _FIRST_PAUSE_S
        while True:
            try:
                conn = await self._connect()
            except (psycopg.Error, OSError) as exc:
                self.last_error = str(exc).strip().splitlines()[0] if str(exc) else repr(exc)
            else:
                try:
                    await self._listen(conn)
                except (psycopg.Error, OSError) as exc:
                    self.last_error = str(exc).strip().splitlines()[0] if str(exc) else repr(exc)
                    pause = _FIRST_PAUSE_S  # it was up: come back quickly
                finally:
                    self.listening = False
                    with contextlib.suppress(psycopg.Error, OSError):
                        await conn.close()
            await asyncio.sleep(pause)
            pause = min(pause * 2, _MAX_PAUSE_S)

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        self.listening = True
        self.last_error = None
        self._wake()  # whatever was notified while we were away is lost: look now
        while True:
            async for _ in conn.notifies(timeout=self._check_every):
                self._wake()
            await conn.execute("SELECT 1")  # a dead session fails here, not never
