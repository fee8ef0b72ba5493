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
from relay.delivery.pipeline import LeaseResult
from relay.events import EventLog
from relay.metrics import Metrics
from relay.posture import PostureFeed
from tests.support.scheduler_lab import SchedulerLab, scheduler_over
from tests.support.waiting import eventually
from tests.support.world import World


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
    store = FlakyStore(tmp_path / "queue.sqlite3", schedule=RetrySchedule((300.0,)), lifetime=86400)
    seen: list[tuple[str, list[str]]] = []

    def count_after_logging(lab: SchedulerLab) -> None:
        feed = lab.relay.posture
        assert feed is not None

        def on_recorded(lease: Lease, result: LeaseResult) -> None:
            logged = [json.loads(line)["event"] for line in lab.log.getvalue().splitlines()]
            seen.append((lease.queue_id, logged))
            feed.record(lease, result)

        lab.scheduler.on_recorded = on_recorded

    async with scheduler_over(world, tmp_path, store, before_start=count_after_logging) as lab:
        queue_id = await store.put(
            NewMessage("app@src.test", ("a@count.test", "b@count.test"), b"Subject: x\r\n\r\nx\r\n")
        )
        lab.scheduler.wake()
        await eventually(lambda: seen, timeout=15)
        await asyncio.sleep(1.0)  # a second call would come with the retried commit

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
    sample = lab.relay.metrics.registry.get_sample_value
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
