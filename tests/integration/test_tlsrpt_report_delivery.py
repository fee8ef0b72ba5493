"""TLSRPT against real loopback servers: `_smtp._tls` discovery over the lab DNS, reports
POSTed to a real HTTPS endpoint (RPT-02, RPT-03, RPT-12, RPT-13), and the counters in SQLite.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from mailqueue.model import NewMessage
from policy.model import TlsRptResult
from policy.webpki import client_context
from relay.app import make_resolver
from relay.events import EventLog
from relay.reporting import Reporter, ReportSettings
from tests.support.world import World
from tlsrpt.counter import SessionCounter
from tlsrpt.discover import LookupFailed, NoRecord, discover_record
from tlsrpt.model import AppliedPolicy, DeliveryState, Failure, PolicyType, Session, TlsRptRecord
from tlsrpt.store import ReportStore

SCHEMA = json.loads((Path(__file__).parents[1] / "support" / "tlsrpt.schema.json").read_text())
DAY = "2026-03-04"
AFTER_DAY = 1772668800.0 + 7200  # 2026-03-05 02:00Z


@dataclass
class Endpoint:
    """An HTTPS report endpoint on loopback: answers each POST with the next scripted status."""

    statuses: list[int]
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self, ip: str, ctx: ssl.SSLContext) -> None:
        self.server = await asyncio.start_server(self._serve, ip, 0, ssl=ctx)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append((lines[0], headers, body))
            status = self.statuses.pop(0) if self.statuses else 200
            extra = "Location: https://elsewhere.test/\r\n" if status == 302 else ""
            reply = f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n{extra}"
            writer.write(f"{reply}Connection: close\r\n\r\n".encode())
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def endpoint(world: World) -> AsyncIterator[Endpoint]:
    ep = Endpoint(statuses=[])
    await ep.start("127.0.0.11", world.pki.server_context(["rpt.d.test"]))
    world.dns.add("rpt.d.test", "A", "127.0.0.11")
    yield ep
    await ep.stop()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _settings() -> ReportSettings:
    return ReportSettings(
        enabled=True,
        submitter="relay.test",
        organization="Relay Org",
        contact="tlsrpt@relay.test",
        sender="tlsrpt@relay.test",
        send_delay=0.0,
        dkim=None,
        dns_timeout=2.0,
        post_deadline=5.0,
    )


class MemoryQueue:
    """Our own queue interface's `put`, in memory (a fake of our code, not of a library)."""

    def __init__(self) -> None:
        self.messages: list[NewMessage] = []

    async def put(self, msg: NewMessage) -> str:
        self.messages.append(msg)
        return f"Q{len(self.messages)}"


async def _reporter(
    world: World, tmp_path: Path, clock: Clock, queue: Any = None
) -> tuple[Reporter, ReportStore, io.StringIO]:
    store = ReportStore(tmp_path / "relay.sqlite3")
    log = io.StringIO()
    reporter = Reporter(
        _settings(),
        store,
        resolver=make_resolver((world.dns.nameserver,), 2.0),
        ssl_context=client_context(str(world.pki.ca_file)),
        events=EventLog(log),
        queue=queue,
        clock=clock,
    )
    return reporter, store, log


async def _count_sessions(store: ReportStore, domain: str, ok: int, failed: int) -> None:
    counter = SessionCounter(store)
    sts = AppliedPolicy(PolicyType.STS, ("version: STSv1", "mode: enforce"), (f"mx1.{domain}",))
    bad = Failure(TlsRptResult.CERTIFICATE_EXPIRED, f"mx1.{domain}", "127.0.0.5")
    for _ in range(ok):
        counter.add(Session(domain, DAY, sts))
    for _ in range(failed):
        counter.add(Session(domain, DAY, sts, bad))
    await counter.close()


# --- discovery ---------------------------------------------------------------------------


async def test_discovery_joins_strings_and_refuses_two_records(world: World) -> None:
    resolver = make_resolver((world.dns.nameserver,), 2.0)
    world.dns.txt("_smtp._tls.split.test", ("v=TLSRPTv1; rua=mai", "lto:r@split.test"))
    world.dns.txt("_smtp._tls.two.test", "v=TLSRPTv1; rua=mailto:a@two.test")
    world.dns.txt("_smtp._tls.two.test", "v=TLSRPTv1; rua=mailto:b@two.test")
    world.dns.txt("_smtp._tls.mixed.test", "v=spf1 -all", "v=TLSRPTv1;rua=https://r.mixed.test/")
    world.dns.fail("_smtp._tls.broken.test", "TXT", "servfail")

    assert await discover_record("split.test", resolver, 2.0) == TlsRptRecord(
        ("mailto:r@split.test",)
    )
    assert isinstance(await discover_record("two.test", resolver, 2.0), NoRecord)
    assert await discover_record("mixed.test", resolver, 2.0) == TlsRptRecord(
        ("https://r.mixed.test/",)
    )
    assert isinstance(await discover_record("absent.test", resolver, 2.0), NoRecord)
    assert isinstance(await discover_record("broken.test", resolver, 2.0), LookupFailed)


# --- https delivery ----------------------------------------------------------------------


async def test_report_is_posted_as_tlsrpt_gzip_and_201_marks_it_sent(
    world: World, tmp_path: Path, endpoint: Endpoint
) -> None:
    endpoint.statuses = [201]
    uri = f"https://rpt.d.test:{endpoint.port}/v1/reports"
    world.dns.txt("_smtp._tls.d.test", f"v=TLSRPTv1; rua={uri}")
    reporter, store, log = await _reporter(world, tmp_path, Clock(AFTER_DAY))
    try:
        await _count_sessions(store, "d.test", ok=3, failed=2)

        (delivery,) = await reporter.send_day(DAY)

        assert delivery.state is DeliveryState.SENT
        ((request_line, headers, body),) = endpoint.requests
        assert request_line == "POST /v1/reports HTTP/1.1"
        assert headers["content-type"] == "application/tlsrpt+gzip"
        assert headers["host"] == f"rpt.d.test:{endpoint.port}"
        report = json.loads(gzip.decompress(body))
        jsonschema.validate(report, SCHEMA)
        (entry,) = report["policies"]
        assert entry["summary"] == {
            "total-successful-session-count": 3,
            "total-failure-session-count": 2,
        }
        assert entry["failure-details"][0]["result-type"] == "certificate-expired"
        assert entry["failure-details"][0]["failed-session-count"] == 2
        # Built once: a second run sends nothing more.
        assert await reporter.send_day(DAY) == []
        assert len(endpoint.requests) == 1
        events = [json.loads(line) for line in log.getvalue().splitlines()]
        assert [e["state"] for e in events if e["event"] == "tlsrpt_report"] == ["sent"]
    finally:
        store.close()


async def test_failed_post_is_retried_later_until_accepted(
    world: World, tmp_path: Path, endpoint: Endpoint
) -> None:
    # RPT-12, RPT-13: 500, 500, a redirect (never followed), then 200.
    endpoint.statuses = [500, 500, 302, 200]
    uri = f"https://rpt.d.test:{endpoint.port}/r"
    world.dns.txt("_smtp._tls.d.test", f"v=TLSRPTv1; rua={uri}")
    clock = Clock(AFTER_DAY)
    reporter, store, _log = await _reporter(world, tmp_path, clock)
    try:
        await _count_sessions(store, "d.test", ok=1, failed=0)
        (first,) = await reporter.send_day(DAY)
        assert first.state is DeliveryState.PENDING
        assert first.last_error is not None
        assert "500" in first.last_error
        start = clock.now
        assert await reporter.retry_due() == []  # not due yet
        states = []
        for _ in range(5):
            retry_at = store.next_retry_at()
            if retry_at is None:
                break
            clock.now = retry_at
            (done,) = await reporter.retry_due()
            states.append(done.state)
        assert states == [DeliveryState.PENDING, DeliveryState.PENDING, DeliveryState.SENT]
        assert len(endpoint.requests) == 4
        assert all(r[0] == "POST /r HTTP/1.1" for r in endpoint.requests)
        assert clock.now - start < 24 * 3600
        (stored,) = store.deliveries(DAY)
        assert (stored.state, stored.attempts) == (DeliveryState.SENT, 4)
    finally:
        store.close()


async def test_untrusted_endpoint_certificate_is_a_failed_send(
    world: World, tmp_path: Path
) -> None:
    ep = Endpoint(statuses=[200])
    await ep.start("127.0.0.12", world.pki.server_context(["rpt.bad.test"], "self"))
    world.dns.add("rpt.bad.test", "A", "127.0.0.12")
    world.dns.txt("_smtp._tls.bad.test", f"v=TLSRPTv1; rua=https://rpt.bad.test:{ep.port}/")
    reporter, store, _log = await _reporter(world, tmp_path, Clock(AFTER_DAY))
    try:
        await _count_sessions(store, "bad.test", ok=1, failed=0)
        (delivery,) = await reporter.send_day(DAY)
        assert delivery.state is DeliveryState.PENDING
        assert delivery.last_error is not None
        assert "rpt.bad.test" in delivery.last_error
        assert ep.requests == []
    finally:
        store.close()
        await ep.stop()


# --- mailto: through the queue -------------------------------------------------------------


async def test_mailto_and_https_both_receive_the_report(
    world: World, tmp_path: Path, endpoint: Endpoint
) -> None:
    # RPT-03
    uri = f"https://rpt.d.test:{endpoint.port}/v1"
    world.dns.txt("_smtp._tls.d.test", f"v=TLSRPTv1; rua=mailto:reports@d.test,{uri}")
    queue = MemoryQueue()
    reporter, store, _log = await _reporter(world, tmp_path, Clock(AFTER_DAY), queue)
    woken: list[bool] = []
    reporter.on_queued = lambda: woken.append(True)
    try:
        await _count_sessions(store, "d.test", ok=2, failed=0)
        deliveries = await reporter.send_day(DAY)
        assert {d.uri: d.state for d in deliveries} == {
            "mailto:reports@d.test": DeliveryState.QUEUED,
            uri: DeliveryState.SENT,
        }
        (mail,) = queue.messages
        assert mail.recipients == ("reports@d.test",)
        assert mail.sender == "tlsrpt@relay.test"
        assert b"\r\nTLS-Required: No\r\n" in mail.data
        assert woken == [True]
        assert len(endpoint.requests) == 1
    finally:
        store.close()


async def test_daily_run_sends_only_days_that_are_over(
    world: World, tmp_path: Path, endpoint: Endpoint
) -> None:
    # RPT-05: one report per domain per UTC day, sent after the day ended.
    world.dns.txt("_smtp._tls.d.test", f"v=TLSRPTv1; rua=https://rpt.d.test:{endpoint.port}/")
    clock = Clock(1772668800.0 - 60)  # 2026-03-04 23:59Z: the day is not over
    reporter, store, _log = await _reporter(world, tmp_path, clock)
    try:
        await _count_sessions(store, "d.test", ok=1, failed=1)
        await reporter.run_due()
        assert endpoint.requests == []
        clock.now = AFTER_DAY
        await reporter.run_due()
        await reporter.run_due()
        assert len(endpoint.requests) == 1
        report = json.loads(gzip.decompress(endpoint.requests[0][2]))
        assert report["date-range"]["start-datetime"] == "2026-03-04T00:00:00Z"
    finally:
        store.close()


# --- the store ---------------------------------------------------------------------------


async def test_counts_accumulate_across_flushes_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "relay.sqlite3"
    store = ReportStore(path)
    await _count_sessions(store, "d.test", ok=2, failed=1)
    await _count_sessions(store, "d.test", ok=1, failed=1)
    store.close()
    store = ReportStore(path)
    try:
        counts = {(c.failure is None): c.count for c in store.counts(DAY)}
        assert counts == {True: 3, False: 2}
        assert store.unreported("2026-03-01", "2026-03-04") == [(DAY, "d.test")]
        assert store.save_report("id1", DAY, "d.test", None, [], 0.0)
        assert not store.save_report("id2", DAY, "d.test", None, [], 0.0)
        assert store.unreported("2026-03-01", "2026-03-04") == []
        store.prune("2026-03-05")
        assert store.counts(DAY) == []
    finally:
        store.close()
