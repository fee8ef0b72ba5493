"""`sts-relay report tls` end to end: the posture report of a lab run equals what the relay did.

A relay subprocess delivers a known mix (DANE, MTA-STS enforce and testing, a
require-verified override, `TLS-Required: No`, opportunistic TLS, plaintext, a 5xx, a 4xx
and an enforce domain whose certificate is untrusted) in the DANE lab; after a clean stop
the report (`--json`, schema-checked) is compared with the relay's own `delivery` log and
with what each MX received, the metrics with the report, and the HTML page is rendered by
headless Chromium. Nothing in any output names a local part.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
from prometheus_client.parser import text_string_to_metric_families

from posture.model import Cell, Figures, Mechanism, Status, utc_day
from posture.store import SqlitePostureStore
from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import Event, RelayProcess, run_cli
from tests.support.browser import DomReader, dump_dom, read_dom
from tests.support.dane_lab import DaneWorld, self_signed, tlsa
from tests.support.world import to_toml

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[1] / "support" / "posture-report.schema.json").read_text()
)
LOCAL_PARTS = ("a@", "b@", "c@", "d@", "ok@", "bounce@", "later@", "app@")


@pytest.fixture
async def world(dane_world: DaneWorld) -> DaneWorld:
    """`start_relay` builds on `world`: here the DANE lab (a superset of the plain one)."""
    return dane_world


def validate(report: dict[str, Any]) -> None:
    jsonschema.validate(report, SCHEMA, cls=jsonschema.Draft202012Validator)


# --- what the log says the relay did ---------------------------------------------------


def mechanism_of(event: Event) -> str:
    """The report's mechanism of one `delivery` event, from the logged decision."""
    source = event["tls_policy"]
    if source == "sts":
        return "sts-testing" if event["sts_mode"] == "testing" else "sts-enforce"
    if source == "none":
        return "opportunistic" if event["tls"] or event["status"] != "sent" else "plaintext"
    return str(source)


def security_of(event: Event) -> str:
    if not event["tls"]:
        return "plaintext"
    return "authenticated" if event["verified"] else "unauthenticated_tls"


def figures_from_log(events: list[Event]) -> dict[str, Counter[tuple[str, ...]]]:
    """Per domain: recipients and messages by (status, mechanism/cause, security/version).

    A message counts once per commit: the events of one commit share queue_id, domain and
    delay_s (they are logged together, after it)."""
    out: dict[str, Counter[tuple[str, ...]]] = {}
    seen: set[tuple[Any, ...]] = set()
    for e in events:
        if e["event"] != "delivery":
            continue
        counts = out.setdefault(e["domain"], Counter())
        commit = (e["queue_id"], e["domain"], e["delay_s"])
        if e["status"] == "sent":
            mech = mechanism_of(e)
            keys = [
                ("sent", "mechanism", mech),
                ("sent", "security", security_of(e)),
                ("sent", "version", e["tls"] or "plaintext"),
                ("sent", "mechanism-version", mech, e["tls"] or "plaintext"),
            ]
        else:
            keys = [(e["status"], "cause", "policy" if e["tlsrpt_result"] else "other")]
        for key in keys:
            counts[("rcpt", *key)] += 1
            if (commit, key) not in seen:
                seen.add((commit, key))
                counts[("msg", *key)] += 1
    return out


def figures_from_report(entry: dict[str, Any]) -> Counter[tuple[str, ...]]:
    """The same figures, read from one `domains` entry (or `totals`) of the report."""
    counts: Counter[tuple[str, ...]] = Counter()
    delivered = entry["delivered"]
    for mech, f in delivered["by_mechanism"].items():
        counts[("rcpt", "sent", "mechanism", mech)] += f["recipients"]
        counts[("msg", "sent", "mechanism", mech)] += f["messages"]
        for version, v in f["by_tls_version"].items():
            counts[("rcpt", "sent", "mechanism-version", mech, version)] += v["recipients"]
            counts[("msg", "sent", "mechanism-version", mech, version)] += v["messages"]
    for key, f in delivered["by_security"].items():
        counts[("rcpt", "sent", "security", key)] += f["recipients"]
        counts[("msg", "sent", "security", key)] += f["messages"]
    for version, f in delivered["by_tls_version"].items():
        counts[("rcpt", "sent", "version", version)] += f["recipients"]
        counts[("msg", "sent", "version", version)] += f["messages"]
    for status in ("deferred", "bounced"):
        for cause, f in entry[status]["by_cause"].items():
            counts[("rcpt", status, "cause", cause)] += f["recipients"]
            counts[("msg", status, "cause", cause)] += f["messages"]
    return +counts  # zero entries dropped


def retried(rcpt: str) -> Callable[[Event], bool]:
    return lambda e: e["event"] == "delivery" and e["rcpt"] == rcpt and e["attempt"] >= 2


async def scrape(relay: RelayProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    address = relay.find(event="metrics_listening")[0]["address"]
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            raw = await reader.read()
    finally:
        writer.close()
    body = raw.decode().partition("\r\n\r\n")[2]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def chart_values(dom: DomReader, chart: str) -> tuple[list[str], Counter[tuple[str, str]]]:
    """The days a chart has a bar slot for, and its drawn values by (day, series)."""
    days = [g.attrs["data-day"] for g in dom.find("g", cls="day", inside=f"#{chart}")]
    values: Counter[tuple[str, str]] = Counter()
    for rect in dom.find("rect", cls="bar", inside=f"#{chart}"):
        day = next(p for p in days if f"{p} " in rect_title(dom, rect))
        values[(day, rect.attrs["data-series"])] += int(rect.attrs["data-value"])
    return days, values


def rect_title(dom: DomReader, rect: Any) -> str:
    index = dom.elements.index(rect)
    title = dom.elements[index + 1]
    assert title.tag == "title"
    return title.text


# --- the lab run ----------------------------------------------------------------------


async def test_report_figures_equal_what_the_relay_did(
    world: DaneWorld, start_relay: StartRelay, tmp_path: Path
) -> None:
    dane = "dane-ok.dane.test"
    cert = self_signed([f"mx1.{dane}"], world.certs_dir())
    await world.dane_mx(dane, cert, [tlsa(cert.leaf)])
    await world.sts_domain("enforce-ok.test")
    await world.sts_domain("testing-self.test", mode="testing", cert_kind="self")
    await world.sts_domain("enforce-self.test", cert_kind="self")  # waits on its policy
    await world.sts_domain("waived.test", cert_kind="self")  # enforce, TLS-Required: No
    await world.sts_domain("override.test", mode=None)  # no policy; require-verified
    await world.sts_domain(
        "opportunistic.test",
        mode=None,
        rcpt_replies={
            "bounce@opportunistic.test": "550 5.1.1 no such user",
            "later@opportunistic.test": "450 4.2.1 try later",
        },
    )
    await world.sts_domain("plain.test", mode=None, starttls=False)
    relay = await start_relay(
        tls={"overrides": ["override.test=require-verified match=mx1.override.test"]}
    )

    await relay.send([f"a@{dane}", f"b@{dane}"])
    await relay.send(["a@enforce-ok.test"])
    await relay.send(["b@enforce-ok.test"])
    await relay.send(["a@testing-self.test"])
    await relay.send(["a@enforce-self.test"])
    await relay.send(["a@waived.test"], body=b"Subject: w\r\nTLS-Required: No\r\n\r\nhi\r\n")
    await relay.send(["a@override.test"])
    await relay.send(
        ["ok@opportunistic.test", "bounce@opportunistic.test", "later@opportunistic.test"]
    )
    await relay.send(["c@plain.test", "d@plain.test"])
    for rcpt in (
        f"a@{dane}",
        f"b@{dane}",
        "a@enforce-ok.test",
        "b@enforce-ok.test",
        "a@testing-self.test",
        "a@waived.test",
        "a@override.test",
        "ok@opportunistic.test",
        "c@plain.test",
    ):
        await relay.delivery(rcpt, "sent")
    await relay.delivery("bounce@opportunistic.test", "bounced")
    await relay.wait_for(lambda e: e["event"] == "delivery" and e["domain"] == "src.test")
    # Retried at least once (queue.retry_schedule = 1, 2, 4 s in the lab).
    for rcpt in ("a@enforce-self.test", "later@opportunistic.test"):
        await relay.wait_for(retried(rcpt))

    metrics = await scrape(relay)
    assert await relay.stop() == 0  # a clean stop writes the counts still in memory
    events = relay.events

    done = await run_cli(relay.config_path, "report", "tls", "--since", "1d", "--json")
    assert done.code == 0, done.stderr
    report = json.loads(done.stdout)
    validate(report)
    assert not any(part in done.stdout for part in LOCAL_PARTS)
    assert "@" not in done.stdout  # domains only: the report can be shared

    # Every figure, per domain and in total, equals the relay's own delivery log.
    logged = figures_from_log(events)
    reported = {d["domain"]: figures_from_report(d) for d in report["domains"]}
    assert reported == {domain: +counts for domain, counts in logged.items()}
    total_logged: Counter[tuple[str, ...]] = Counter()
    for counts in logged.values():
        total_logged.update(counts)
    assert figures_from_report(report["totals"]) == +total_logged

    # ... and is the known mix (the log could be wrong too).
    by_domain = {d["domain"]: d for d in report["domains"]}

    def delivered(domain: str, mechanism: str) -> tuple[int, int]:
        f = by_domain[domain]["delivered"]["by_mechanism"][mechanism]
        return f["messages"], f["recipients"]

    assert delivered(dane, "dane") == (1, 2)
    assert by_domain[dane]["delivered"]["by_security"]["authenticated"]["recipients"] == 2
    assert delivered("enforce-ok.test", "sts-enforce") == (2, 2)
    assert delivered("testing-self.test", "sts-testing") == (1, 1)
    assert delivered("waived.test", "tls-required-no") == (1, 1)
    assert delivered("override.test", "override") == (1, 1)
    assert delivered("opportunistic.test", "opportunistic") == (1, 1)
    assert delivered("plain.test", "plaintext") == (1, 2)
    assert delivered("src.test", "plaintext") == (1, 1)  # the DSN for bounce@
    assert by_domain["opportunistic.test"]["bounced"]["by_cause"]["other"]["recipients"] == 1
    assert by_domain["opportunistic.test"]["deferred"]["by_cause"]["other"]["recipients"] >= 2
    assert by_domain["enforce-self.test"]["deferred"]["by_cause"]["policy"]["recipients"] >= 2
    assert by_domain["enforce-self.test"]["delivered"]["recipients"] == 0
    for domain in ("testing-self.test", "waived.test"):
        security = by_domain[domain]["delivered"]["by_security"]
        assert security["unauthenticated_tls"]["recipients"] == 1

    # What each MX received is what the report says was delivered there.
    received: Counter[str] = Counter()
    for host, sink in world.sinks.items():
        received[host.split(".", 1)[1]] += sum(len(m.rcpt_tos) for m in sink.messages)
    delivered_to = {d: e["delivered"]["recipients"] for d, e in by_domain.items()}
    assert +Counter(delivered_to) == +received

    weakest = [w["domain"] for w in report["weakest_domains"]]
    assert weakest[:2] == ["plain.test", "src.test"]  # plaintext first: 2, then 1
    assert set(weakest) == {
        "plain.test",
        "src.test",
        "opportunistic.test",
        "testing-self.test",
        "waived.test",
    }
    (waiting,) = report["waiting_on_policy"]
    assert waiting["domain"] == "enforce-self.test"
    assert (waiting["messages"], waiting["recipients"]) == (1, 1)
    assert waiting["mechanisms"] == ["sts-enforce"]
    assert waiting["results"] == ["certificate-not-trusted"]

    # The metrics tell the same story (every delivery was final before the scrape).
    per_mechanism: Counter[str] = Counter()
    per_version: Counter[str] = Counter()
    for (name, labels), value in metrics.items():
        if name == "sts_relay_delivered_recipients_total":
            per_mechanism[dict(labels)["mechanism"]] += int(value)
            per_version[dict(labels)["tls_version"]] += int(value)
    totals = report["totals"]["delivered"]
    assert +per_mechanism == +Counter(
        {m: f["recipients"] for m, f in totals["by_mechanism"].items()}
    )
    versions = {
        ("none" if v == "plaintext" else v): f["recipients"]
        for v, f in totals["by_tls_version"].items()
    }
    assert +per_version == +Counter(versions)
    waiting_gauge = (("mechanism", "sts-enforce"),)
    assert metrics[("sts_relay_policy_waiting_recipients", waiting_gauge)] == 1
    assert metrics[("sts_relay_policy_waiting_oldest_seconds", waiting_gauge)] > 0

    # The page: the same figures, a bar per day, drawn by a real browser.
    page = tmp_path / "posture.html"
    done = await run_cli(relay.config_path, "report", "tls", "--since", "1d", "--html", str(page))
    assert done.code == 0, done.stderr
    html = page.read_text(encoding="utf-8")
    assert "@" not in html
    assert "://" not in html  # nothing to fetch: no URL at all
    dom = read_dom(await dump_dom(page, tmp_path / "chromium"))
    days, values = chart_values(dom, "chart-delivered")
    assert days == [d["day"] for d in report["days"]]
    drawn: Counter[str] = Counter()
    for (_, series), value in values.items():
        drawn[series] += value
    assert +drawn == +Counter({m: f["recipients"] for m, f in totals["by_mechanism"].items()})
    failed_days, failed = chart_values(dom, "chart-failed")
    assert failed_days == days
    assert sum(failed.values()) == (
        report["totals"]["deferred"]["recipients"] + report["totals"]["bounced"]["recipients"]
    )
    first_cell = dom.find("td", inside=".waiting")[0]
    assert first_cell.text == "enforce-self.test"


# --- several days, from the store ---------------------------------------------------------


def _fill(state: Path, now: float) -> dict[str, Counter[str]]:
    """Three days of aggregates written through the store interface; the expected bars."""
    state.mkdir(parents=True, exist_ok=True)
    store = SqlitePostureStore(state / "relay.sqlite3")
    cells: dict[Cell, Figures] = {}
    expected: dict[str, Counter[str]] = {}
    for back, (mechanism, tls, n) in enumerate(
        [
            (Mechanism.STS_ENFORCE, "TLSv1.3", 5),
            (Mechanism.OPPORTUNISTIC, "TLSv1.2", 3),
            (Mechanism.PLAINTEXT, "", 2),
        ]
    ):
        day = utc_day(now - back * 86400)
        cell = Cell(day, f"d{back}.test", Status.DELIVERED, mechanism, tls, bool(back == 0))
        cells[cell] = Figures(n, n)
        expected.setdefault(day, Counter())[mechanism.value] += n
    cells[Cell(utc_day(now), "d0.test", Status.DEFERRED, Mechanism.DANE, "", False, "policy")] = (
        Figures(1, 4)
    )
    store.write(cells, {})
    store.close()
    return expected


async def test_html_page_has_a_bar_per_day_with_the_reported_figures(tmp_path: Path) -> None:
    now = time.time()
    state = tmp_path / "state"
    expected = _fill(state, now)
    config = tmp_path / "relay.toml"
    config.write_text(to_toml({"state": {"path": str(state)}}))

    done = await run_cli(config, "report", "tls", "--since", "6d", "--json")
    assert done.code == 0, done.stderr
    report = json.loads(done.stdout)
    validate(report)
    assert report["period"]["days"] == 7
    assert report["totals"]["delivered"]["recipients"] == 10
    assert report["totals"]["deferred"]["by_cause"]["policy"] == {"messages": 1, "recipients": 4}

    page = tmp_path / "page.html"
    done = await run_cli(config, "report", "tls", "--since", "6d", "--html", str(page))
    assert done.code == 0, done.stderr
    assert done.stdout == ""
    dom = read_dom(await dump_dom(page, tmp_path / "chromium"))
    assert dom.find("svg", cls="chart")[0].attrs["id"] == "chart-delivered"
    days, values = chart_values(dom, "chart-delivered")
    assert days == [d["day"] for d in report["days"]]
    assert len(days) == 7
    drawn: dict[str, Counter[str]] = {}
    for (day, series), value in values.items():
        drawn.setdefault(day, Counter())[series] += value
    assert drawn == expected
    _, failed = chart_values(dom, "chart-failed")
    assert failed == Counter({(utc_day(now), "deferred: policy/TLS"): 4})


async def test_report_needs_a_store_and_a_valid_period(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(to_toml({"state": {"path": str(tmp_path / "nothing")}}))
    done = await run_cli(config, "report", "tls", "--json")
    assert done.code == 1
    assert "error" in json.loads(done.stdout)
    assert not (tmp_path / "nothing").exists()  # never creates a store

    _fill(tmp_path / "state", 0.0)
    config.write_text(to_toml({"state": {"path": str(tmp_path / "state")}}))
    done = await run_cli(config, "report", "tls", "--since", "soon")
    assert done.code == 2
    assert "--since" in done.stderr
    done = await run_cli(config, "report", "tls", "--since", "1d", "--day", "today")
    assert done.code == 2  # one or the other
    done = await run_cli(config, "report", "tls", "--day", "1970-01-01")
    assert done.code == 0, done.stderr
    assert "Delivered: 5 recipient(s) in 5 message(s)" in done.stdout
