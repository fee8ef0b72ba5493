"""The posture counts an attempt once its outcomes are committed, and only then: a real
scheduler and the relay's own pipeline against a lab MX, over a store whose first commit
fails (the outcomes are kept and committed later, README "In-flight work")."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mailqueue.model import Lease, NewMessage, RecipientResult, Recorded
from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite import SqliteStore
from mailqueue.store import StoreUnavailable
from posture.model import Mechanism, Status
from posture.store import SqlitePostureStore
from relay.app import build
from relay.config import load_config
from relay.delivery.bounce import BounceSettings
from relay.delivery.pipeline import LeaseResult
from relay.delivery.scheduler import Scheduler, SchedulerSettings
from relay.events import EventLog
from relay.metrics import Metrics
from relay.posture import PostureFeed
from tests.support.waiting import eventually
from tests.support.world import World, to_toml


class FlakyStore(SqliteStore):
    """The real SQLite queue, whose first `record` fails as a full disk would."""

    failures = 1

    async def record(
        self, lease: Lease, results: Sequence[RecipientResult], dsn: NewMessage | None = None
    ) -> Recorded:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("database or disk is full")
        return await super().record(lease, results, dsn)


async def test_an_attempt_is_counted_once_after_its_commit(world: World, tmp_path: Path) -> None:
    await world.sts_domain("count.test")
    config = tmp_path / "relay.toml"
    config.write_text(to_toml(world.relay_config(tmp_path / "state")), encoding="utf-8")
    log = io.StringIO()
    events = EventLog(log)
    relay = build(load_config(config, {}), events)
    assert relay.posture is not None
    store = FlakyStore(tmp_path / "queue.sqlite3", schedule=RetrySchedule((300.0,)), lifetime=86400)
    await store.open()
    scheduler = Scheduler(
        store=store,
        pipeline=relay.worker.pipeline,
        pool=relay.worker.pool,
        settings=SchedulerSettings(
            concurrency=2,
            owner="test-node",
            bounce=BounceSettings(reporting_mta="relay.test", delay_notice_after=0),
        ),
        events=events,
    )
    seen: list[tuple[str, list[str]]] = []
    feed = relay.posture

    def on_recorded(lease: Lease, result: LeaseResult) -> None:
        logged = [json.loads(line)["event"] for line in log.getvalue().splitlines()]
        seen.append((lease.queue_id, logged))
        feed.record(lease, result)

    scheduler.on_recorded = on_recorded
    task = asyncio.create_task(scheduler.run())
    try:
        queue_id = await store.put(
            NewMessage("app@src.test", ("a@count.test", "b@count.test"), b"Subject: x\r\n\r\nx\r\n")
        )
        scheduler.wake()
        await eventually(lambda: seen, timeout=15)
        await asyncio.sleep(1.0)  # a second call would come with the retried commit
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        relay.worker.pool.close_all()
        relay.cache.close()
        await relay.posture.close()
        await relay.store.close()
        await store.close()

    ((counted_id, logged_before),) = seen
    assert counted_id == queue_id
    assert "store_error" in logged_before  # the first commit failed: nothing counted then
    assert logged_before.count("delivery") == 2  # counted after the events of the commit
    # Written on close: one message, two recipients, delivered under enforce.
    store_after = SqlitePostureStore(tmp_path / "state" / "relay.sqlite3")
    ((cell, figures),) = store_after.cells("2000-01-01", "2100-01-01")
    store_after.close()
    assert (cell.domain, cell.status, cell.mechanism) == (
        "count.test",
        Status.DELIVERED,
        Mechanism.STS_ENFORCE,
    )
    assert (figures.messages, figures.recipients) == (1, 2)
    sample = relay.metrics.registry.get_sample_value
    labels = {"mechanism": "sts-enforce", "tls_version": "TLSv1.3", "authenticated": "true"}
    assert sample("sts_relay_delivered_recipients_total", labels) == 2
    assert sample("sts_relay_delivered_messages_total", {"mechanism": "sts-enforce"}) == 1


def test_a_failing_tally_never_breaks_recording() -> None:
    class Broken:
        def add(self, _attempt: Any) -> None:
            raise RuntimeError("boom")

    log = io.StringIO()
    feed = PostureFeed(Broken(), Metrics(), EventLog(log))  # type: ignore[arg-type]
    lease = Lease("q1", "d.test", "app@src.test", (), 0.0, 1.0, 2.0)
    feed.record(lease, LeaseResult({}, None))
    (event,) = (json.loads(line) for line in log.getvalue().splitlines())
    assert event["event"] == "worker_error"
    assert "posture" in event["error"]
