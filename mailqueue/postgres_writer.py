"""Group commit of puts for the PostgreSQL queue store: one asyncio task takes every put
waiting, stores them in one transaction, and answers each caller after the COMMIT.

Durability per caller is that of one commit each (no put returns before the commit that
holds its message returned, with synchronous_commit on), at the cost of one COMMIT (and
one WAL flush) per batch instead of one per message: under load, batches grow by
themselves while the previous one commits. Each caller still gets its own answer: the
batch's function reports an outcome per message (postgres_ops.insert_messages), and
`commit` (PostgresStore) runs each message alone when a batch as a whole was refused for
one message's data.

Knows asyncio only; nothing of SQL, messages' contents or schedules.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from mailqueue.model import NewMessage
from mailqueue.store import StoreUnavailable

MAX_BATCH = 500  # messages per transaction: bounds its size and its first caller's wait
MAX_BATCH_BYTES = 32 * 1024 * 1024  # and the content it carries (one array parameter)

Outcome = str | BaseException
CommitBatch = Callable[[Sequence[NewMessage]], Awaitable[list[Outcome]]]


@dataclass(slots=True)
class _Put:
    msg: NewMessage
    future: asyncio.Future[str]


_STOP = object()


class GroupCommit:
    """Puts in batches; `commit(msgs)` stores a batch and returns an outcome per message
    (its queue id or its exception) and must not raise."""

    def __init__(self, commit: CommitBatch) -> None:
        self._commit = commit
        self._queue: asyncio.Queue[_Put | object] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.batches = 0  # committed batches: tests see the batching here

    def start(self) -> None:
        self._task = asyncio.create_task(self._serve(), name="mailqueue-postgres-puts")

    async def put(self, msg: NewMessage) -> str:
        """The message's queue id once committed; its error otherwise. A caller that stops
        waiting does not take its message out of the batch (it may still be stored)."""
        if self._closed or self._task is None:
            raise StoreUnavailable("queue store is not open")
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Put(msg, future))
        return await future

    async def stop(self) -> None:
        """Store what is waiting, then stop."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._queue.put_nowait(_STOP)
            await asyncio.wait({self._task})
            self._task = None

    async def _serve(self) -> None:
        stopping = False
        while not stopping:
            batch: list[_Put] = []
            size = 0
            item = await self._queue.get()
            while True:
                if item is _STOP:
                    stopping = True
                elif isinstance(item, _Put):
                    batch.append(item)
                    size += len(item.msg.data)
                if stopping or len(batch) >= MAX_BATCH or size >= MAX_BATCH_BYTES:
                    break
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[_Put]) -> None:
        try:
            outcomes = await self._commit([p.msg for p in batch])
        except Exception as exc:  # noqa: BLE001 (a bug in the commit: every caller learns it)
            outcomes = [exc] * len(batch)
        self.batches += 1
        for put, outcome in zip(batch, outcomes, strict=True):
            if put.future.done():
                continue  # its caller stopped waiting
            if isinstance(outcome, BaseException):
                put.future.set_exception(outcome)
            else:
                put.future.set_result(outcome)
