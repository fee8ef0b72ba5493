"""/metrics, /healthz and /readyz of a relay running in this process against the lab."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.config import Config, load_config
from relay.events import EventLog
from relay.metrics import Metrics
from tests.support.waiting import eventually, read_events
from tests.support.world import World, to_toml

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Running:
    log: io.StringIO
    task: asyncio.Task[None]
    stop: asyncio.Event
    cfg: Config

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.log.getvalue().splitlines())

    def first(self, name: str) -> dict[str, Any]:
        return next(e for e in self.events() if e["event"] == name)


@pytest.fixture
async def relay(world: World, tmp_path: Path) -> AsyncIterator[Running]:
    from relay.app import serve

    path = tmp_path / "relay.toml"
    path.write_text(to_toml(world.relay_config(tmp_path / "state")), encoding="utf-8")
    cfg = load_config(path, {})
    log = io.StringIO()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(cfg, EventLog(log), stop))
    running = Running(log, task, stop, cfg)
    await eventually(lambda: any(e["event"] == "listening" for e in running.events()))
    yield running
    stop.set()
    async with asyncio.timeout(30):
        await task


async def http_get(address: str, path: str) -> tuple[int, str]:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(10):
            raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def submit(relay: Running, rcpt: str) -> None:
    host, _, port = relay.cfg.listen.addresses[0].rpartition(":")
    async with aiosmtplib.SMTP(hostname=host, port=int(port), start_tls=False) as smtp:
        await smtp.sendmail("app@src.test", [rcpt], b"Subject: m\r\n\r\nhi\r\n")


async def test_metrics_count_deliveries_tls_outcomes_and_policy_use(
    world: World, relay: Running
) -> None:
    await world.sts_domain("enforce-ok.test")
    await world.sts_domain("enforce-untrusted.test", cert_kind="self")
    address = relay.first("metrics_listening")["address"]
    assert not address.endswith(":0")

    await submit(relay, "u@enforce-ok.test")
    await submit(relay, "v@enforce-untrusted.test")
    await eventually(lambda: len([e for e in relay.events() if e["event"] == "delivery"]) >= 2)
    await submit(relay, "w@enforce-ok.test")  # the second message to a domain: a cache hit
    await eventually(lambda: len([e for e in relay.events() if e["event"] == "delivery"]) >= 3)

    status, body = await http_get(address, "/metrics")
    assert status == 200
    got = samples(body)
    assert got[("sts_relay_messages_received_total", ())] == 3
    assert got[("sts_relay_deliveries_total", (("status", "sent"),))] == 2
    assert got[("sts_relay_deliveries_total", (("status", "deferred"),))] == 1
    ok = (("mode", "enforce"), ("result", "success"))
    assert got[("sts_relay_tls_sessions_total", ok)] == 2
    bad = (("mode", "enforce"), ("result", "certificate-not-trusted"))
    assert got[("sts_relay_tls_sessions_total", bad)] == 1
    assert got[("sts_relay_delivery_delay_seconds_count", ())] == 2
    assert got[("sts_relay_policy_fetches_total", (("outcome", "ok"),))] == 2
    assert got[("sts_relay_policy_lookups_total", (("source", "cached"),))] >= 1
    assert got[("sts_relay_policy_lookups_total", (("source", "fetched"),))] == 2
    # Queue gauges are read from the store at scrape time: the untrusted one waits.
    assert got[("sts_relay_queue_recipients", (("state", "deferred"),))] == 1
    assert got[("sts_relay_queue_messages", ())] >= 1


async def test_health_and_readiness_endpoints(relay: Running) -> None:
    address = relay.first("metrics_listening")["address"]
    assert await http_get(address, "/healthz") == (200, "ok\n")
    assert await http_get(address, "/readyz") == (200, "ready\n")
    status, _ = await http_get(address, "/nothing")
    assert status == 404


async def test_policy_fetch_errors_are_counted_by_result_type(world: World, relay: Running) -> None:
    domain = "policy-unreachable.test"
    await world.sts_domain(domain)
    world.policy_server.misbehave(domain, "refuse")
    await submit(relay, f"u@{domain}")
    await eventually(lambda: any(e["event"] == "delivery" for e in relay.events()))

    _, body = await http_get(relay.first("metrics_listening")["address"], "/metrics")
    got = samples(body)
    assert got[("sts_relay_policy_fetches_total", (("outcome", "error"),))] == 1
    errors = [v for (name, _), v in got.items() if name == "sts_relay_policy_fetch_errors_total"]
    assert sum(errors) == 1


def test_every_metric_is_listed_in_the_readme() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\|\s*`([a-z_]+)`", section, flags=re.MULTILINE))
    declared = {
        family.name
        for family in Metrics().registry.collect()
        if not family.name.startswith("process_")
    }
    # Counters are exposed with a _total suffix; the README names what Prometheus shows.
    shown = {
        f"{f.name}_total" if f.type == "counter" else f.name
        for f in Metrics().registry.collect()
        if f.name in declared
    }
    assert documented == shown


def test_two_relays_in_one_process_have_separate_registries() -> None:
    first, second = Metrics(), Metrics()
    first.received.inc()
    assert first.registry.get_sample_value("sts_relay_messages_received_total") == 1
    assert second.registry.get_sample_value("sts_relay_messages_received_total") == 0


def test_failed_logins_are_counted_from_the_event_catalogue() -> None:
    metrics = Metrics()
    events = EventLog(io.StringIO())
    events.subscribe(metrics.observe_event)
    events.auth_failed(client="192.0.2.7", user="app", mechanism="PLAIN", reason="bad password")
    events.auth_failed(client="192.0.2.7", user="app", mechanism="PLAIN", reason="rate limited")
    events.authenticated(client="192.0.2.7", user="app", mechanism="LOGIN")
    sample = metrics.registry.get_sample_value
    assert sample("sts_relay_auth_failures_total", {"mechanism": "PLAIN"}) == 2
    assert sample("sts_relay_auth_failures_total", {"mechanism": "LOGIN"}) is None
