"""A real Scheduler over a store of the test's choosing, with the relay's own pipeline
(built from a config pointing at the world), for tests of scheduling and recording."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from mailqueue.sqlite import SqliteStore
from relay.app import Relay, build
from relay.config import load_config
from relay.delivery.bounce import BounceSettings
from relay.delivery.scheduler import Scheduler, SchedulerSettings
from relay.events import EventLog
from tests.support.world import World, to_toml


class SchedulerLab:
    def __init__(
        self, relay: Relay, store: SqliteStore, scheduler: Scheduler, log: io.StringIO
    ) -> None:
        self.relay = relay
        self.store = store
        self.scheduler = scheduler
        self.log = log

    def events(self, name: str, **match: Any) -> list[dict[str, Any]]:
        lines = (json.loads(line) for line in self.log.getvalue().splitlines())
        return [
            e for e in lines if e["event"] == name and all(e.get(k) == v for k, v in match.items())
        ]


@asynccontextmanager
async def scheduler_over(
    world: World,
    tmp_path: Path,
    store: SqliteStore,
    *,
    lease_time: float = 1200.0,
    deadline: float = 900.0,
    unreachable_hold: float = 0.0,
    clock: Callable[[], float] = time.time,
    before_start: Callable[[SchedulerLab], None] = lambda _lab: None,
) -> AsyncIterator[SchedulerLab]:
    """Run a scheduler over `store` (opened here) until the block ends; `before_start`
    may attach hooks to it first. `unreachable_hold` is the hold in force (holds.py),
    `clock` the scheduler's."""
    config = tmp_path / "relay.toml"
    config.write_text(to_toml(world.relay_config(tmp_path / "state")), encoding="utf-8")
    log = io.StringIO()
    events = EventLog(log)
    relay = build(load_config(config, {}), events)
    await store.open()
    scheduler = Scheduler(
        store=store,
        pipeline=relay.worker.pipeline,
        pool=relay.worker.pool,
        settings=SchedulerSettings(
            concurrency=4,
            owner="test-node",
            bounce=BounceSettings(reporting_mta="relay.test", delay_notice_after=0),
            lease_time=lease_time,
            attempt_deadline=deadline,
            unreachable_hold=unreachable_hold,
        ),
        events=events,
        clock=clock,
    )
    lab = SchedulerLab(relay, store, scheduler, log)
    before_start(lab)
    task = asyncio.create_task(scheduler.run())
    try:
        yield lab
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        relay.worker.pool.close_all()
        relay.cache.close()
        if relay.posture is not None:
            await relay.posture.close()
        await relay.store.close()
        await store.close()
