"""The TLS posture: classification, daily aggregates, their store, the report and its page."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path

import pytest

from policy.model import Mode, Policy, PolicyLookup, TlsRptResult
from posture.chart import Series, nice_ceiling, stacked_bars
from posture.model import (
    Attempt,
    Cause,
    Cell,
    Figures,
    Mechanism,
    RecipientFigure,
    Status,
    Waiting,
    utc_day,
)
from posture.page import render_page
from posture.report import build_report, period_days
from posture.store import SqlitePostureStore
from posture.tally import PostureTally, cells_of, first_kept_day, waiting_after
from relay.cli.report_commands import parse_duration, parse_period
from relay.delivery.dane import DaneEvidence, DaneState, HostDane, Tlsa
from relay.delivery.decision import decide_tls
from relay.delivery.dnssec import Security
from relay.delivery.outcome import Bounced, Deferred, Delivered, Hop, Reason
from relay.delivery.overrides import OverrideRule, TlsOverride
from relay.posture import figure_of, mechanism_of

DAY = 86400.0
NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
TODAY = utc_day(NOW)

DELIVERED_TLS = RecipientFigure(Status.DELIVERED, Mechanism.STS_ENFORCE, "TLSv1.3", True)
STUCK = RecipientFigure(
    Status.DEFERRED, Mechanism.STS_ENFORCE, "TLSv1.3", False, Cause.POLICY, "certificate-expired"
)


def attempt(*figures: RecipientFigure, key: str = "q1 d.test", at: float = NOW) -> Attempt:
    return Attempt(key, key.split()[1], at, figures)


# --- classification (relay/posture.py) ----------------------------------------------------


def _policy(mode: Mode) -> PolicyLookup:
    policy = Policy(mode=mode, mx=("mx1.d.test",), max_age=86400, text="")
    return PolicyLookup(domain="d.test", policy=policy, policy_id="1", source="cached")


NO_POLICY = PolicyLookup(domain="d.test", policy=None, policy_id=None, source="none")


@pytest.mark.parametrize(
    ("published", "override", "tls_required_no", "expected"),
    [
        (_policy(Mode.ENFORCE), None, False, Mechanism.STS_ENFORCE),
        (_policy(Mode.TESTING), None, False, Mechanism.STS_TESTING),
        (_policy(Mode.NONE), None, False, Mechanism.OPPORTUNISTIC),
        (NO_POLICY, None, False, Mechanism.OPPORTUNISTIC),
        (_policy(Mode.ENFORCE), None, True, Mechanism.TLS_REQUIRED_NO),
        (
            NO_POLICY,
            OverrideRule(TlsOverride.REQUIRE_VERIFIED, ("mx1.d.test",)),
            False,
            Mechanism.OVERRIDE,
        ),
        (
            _policy(Mode.ENFORCE),
            OverrideRule(TlsOverride.OPPORTUNISTIC),
            False,
            Mechanism.OVERRIDE,
        ),
    ],
)
def test_the_mechanism_is_what_decided(
    published: PolicyLookup,
    override: OverrideRule | None,
    tls_required_no: bool,
    expected: Mechanism,
) -> None:
    decision = decide_tls(published, override, tls_required_no=tls_required_no)
    assert mechanism_of(decision, Hop("mx1.d.test", "192.0.2.1", "TLSv1.3")) is expected
    assert mechanism_of(decision, None) is expected


def test_dane_decides_per_host_and_no_decision_is_undecided() -> None:
    record = Tlsa(3, 1, 1, b"\x01" * 32)
    host = HostDane("mx1.d.test", DaneState.USABLE, "secure", (record,))
    evidence = DaneEvidence("d.test", Security.SECURE, {"mx1.d.test": host})
    decision = decide_tls(_policy(Mode.ENFORCE), None, tls_required_no=False, dane=evidence)
    assert mechanism_of(decision, Hop("mx1.d.test")) is Mechanism.DANE
    assert mechanism_of(decision, Hop("mx2.d.test")) is Mechanism.STS_ENFORCE
    assert mechanism_of(None, Hop("mx1.d.test")) is Mechanism.UNDECIDED


def test_outcomes_become_figures_without_addresses() -> None:
    decision = decide_tls(NO_POLICY, None, tls_required_no=False)
    verified = Hop("mx1.d.test", "192.0.2.1", "TLSv1.3", verified=True)
    clear = Hop("mx1.d.test", "192.0.2.1", None)
    sent = figure_of(Delivered(Reason("ok", "2.0.0", hop=verified)), decision)
    assert sent == RecipientFigure(Status.DELIVERED, Mechanism.OPPORTUNISTIC, "TLSv1.3", True)
    plain = figure_of(Delivered(Reason("ok", "2.0.0", hop=clear)), decision)
    assert plain.counted_mechanism is Mechanism.PLAINTEXT
    assert not plain.authenticated
    tls_failure = Reason("bad", "4.7.5", hop=verified, tlsrpt=TlsRptResult.CERTIFICATE_EXPIRED)
    stuck = figure_of(Deferred(tls_failure), decision)
    assert (stuck.cause, stuck.result) == (Cause.POLICY, "certificate-expired")
    assert stuck.waits_on_policy
    gone = figure_of(Bounced(Reason("550 no", "5.1.1", reply="550 no", hop=clear)), decision)
    assert (gone.status, gone.cause, gone.result) == (Status.BOUNCED, Cause.OTHER, None)
    assert not gone.waits_on_policy


# --- aggregates ----------------------------------------------------------------------------


def test_one_attempt_counts_one_message_per_cell_and_every_recipient() -> None:
    other = RecipientFigure(Status.DEFERRED, Mechanism.STS_ENFORCE, None, False, Cause.OTHER)
    cells = cells_of(attempt(DELIVERED_TLS, DELIVERED_TLS, other))
    sent = Cell(TODAY, "d.test", Status.DELIVERED, Mechanism.STS_ENFORCE, "TLSv1.3", True)
    waiting = Cell(TODAY, "d.test", Status.DEFERRED, Mechanism.STS_ENFORCE, "", False, "other")
    assert cells == {sent: Figures(1, 2), waiting: Figures(1, 1)}


def test_waiting_keeps_its_start_and_ends_with_a_delivery() -> None:
    first = waiting_after(attempt(STUCK, at=NOW), None)
    assert first is not None
    later = waiting_after(attempt(STUCK, STUCK, at=NOW + 600), first)
    assert later is not None
    assert (later.since, later.last_at, later.recipients) == (NOW, NOW + 600, 2)
    assert later.result == "certificate-expired"
    assert waiting_after(attempt(DELIVERED_TLS, at=NOW + 1200), later) is None


async def test_the_tally_writes_in_batches_and_a_new_run_knows_what_waits(
    tmp_path: Path,
) -> None:
    db = tmp_path / "relay.sqlite3"
    clock = [NOW]
    tally = PostureTally(SqlitePostureStore(db), clock=lambda: clock[0])
    tally.add(attempt(DELIVERED_TLS))
    tally.add(attempt(DELIVERED_TLS, key="q2 d.test"))
    tally.add(attempt(STUCK, key="q3 e.test"))
    assert SqlitePostureStore(db).cells(TODAY, TODAY) == []  # nothing written yet
    await tally.flush()
    store = SqlitePostureStore(db)
    sent = Cell(TODAY, "d.test", Status.DELIVERED, Mechanism.STS_ENFORCE, "TLSv1.3", True)
    assert dict(store.cells(TODAY, TODAY))[sent] == Figures(2, 2)
    assert [w.domain for w in store.waiting()] == ["e.test"]
    tally.store.close()

    again = PostureTally(store, clock=lambda: clock[0])
    again.load()
    assert [w.key for w in again.waiting()] == ["q3 e.test"]
    summary = again.waiting_summary()
    assert summary[Mechanism.STS_ENFORCE] == (1, 0.0)
    clock[0] = NOW + 3600
    assert again.waiting_summary()[Mechanism.STS_ENFORCE] == (1, 3600.0)
    again.add(attempt(DELIVERED_TLS, key="q3 e.test", at=clock[0]))
    await again.flush()
    assert store.waiting() == []
    store.close()


async def test_stale_waiting_entries_and_old_days_are_pruned(tmp_path: Path) -> None:
    clock = [NOW - 100 * DAY]
    store = SqlitePostureStore(tmp_path / "relay.sqlite3")
    tally = PostureTally(store, retention_days=92, stale_after=2 * DAY, clock=lambda: clock[0])
    tally.add(attempt(DELIVERED_TLS, at=clock[0]))
    tally.add(attempt(STUCK, key="q9 e.test", at=clock[0]))
    await tally.flush()
    clock[0] = NOW
    await tally.flush(prune=True)
    assert store.cells("2000-01-01", TODAY) == []
    assert store.waiting() == []
    assert tally.waiting() == []
    assert first_kept_day(NOW, 92) == period_days("2026-10-16", TODAY)[0]
    store.close()


class FailingStore(SqlitePostureStore):
    """The real store, whose writes fail while `broken` (a disk gone, a locked file)."""

    broken = True

    def write(self, cells: Mapping[Cell, Figures], waiting: Mapping[str, Waiting | None]) -> None:
        if self.broken:
            raise sqlite3.OperationalError("disk I/O error")
        super().write(cells, waiting)


async def test_a_failed_write_keeps_its_counts_for_the_next_flush(tmp_path: Path) -> None:
    store = FailingStore(tmp_path / "relay.sqlite3")
    tally = PostureTally(store, clock=lambda: NOW)
    tally.add(attempt(DELIVERED_TLS))
    with pytest.raises(sqlite3.OperationalError):
        await tally.flush()
    tally.add(attempt(DELIVERED_TLS, key="q2 d.test"))
    store.broken = False
    await tally.flush()
    ((_, figures),) = store.cells(TODAY, TODAY)
    assert figures == Figures(2, 2)
    assert tally.pending == 0
    store.close()


def test_corrupt_rows_are_skipped(tmp_path: Path) -> None:
    db = tmp_path / "relay.sqlite3"
    store = SqlitePostureStore(db)
    with sqlite3.connect(db) as raw:
        raw.execute(
            "INSERT INTO posture_daily VALUES (?, 'x.test', 'delivered', 'carrier-pigeon', '',"
            " 0, '', 1, 1)",
            (TODAY,),
        )
        raw.execute(
            "INSERT INTO posture_waiting VALUES ('k', 'x.test', 'many', 1.0, 2.0, 'dane', NULL)"
        )
    assert store.cells(TODAY, TODAY) == []
    assert store.waiting() == []
    store.close()


# --- the report ------------------------------------------------------------------------


def _cells(*attempts: Attempt) -> list[tuple[Cell, Figures]]:
    out: dict[Cell, Figures] = {}
    for a in attempts:
        for cell, f in cells_of(a).items():
            out[cell] = out.get(cell, Figures()) + f
    return list(out.items())


def test_the_report_sums_per_domain_per_day_and_ranks_the_weak() -> None:
    opportunistic = RecipientFigure(Status.DELIVERED, Mechanism.OPPORTUNISTIC, "TLSv1.2")
    plaintext = RecipientFigure(Status.DELIVERED, Mechanism.OPPORTUNISTIC, None)
    bounced = RecipientFigure(Status.BOUNCED, Mechanism.STS_ENFORCE, None, False, Cause.POLICY)
    cells = _cells(
        attempt(DELIVERED_TLS, DELIVERED_TLS, key="q1 safe.test"),
        attempt(opportunistic, plaintext, key="q2 weak.test", at=NOW - DAY),
        attempt(plaintext, plaintext, key="q3 clear.test"),
        attempt(bounced, key="q4 safe.test"),
        attempt(DELIVERED_TLS, key="q5 old.test", at=NOW - 30 * DAY),  # outside
    )
    waiting = [
        Waiting("a", "stuck.test", 2, NOW - 7200, NOW, Mechanism.STS_ENFORCE, "x"),
        Waiting("b", "stuck.test", 1, NOW - 60, NOW, Mechanism.DANE, "tlsa-invalid"),
    ]
    first = utc_day(NOW - 2 * DAY)
    report = build_report(
        cells, waiting, first_day=first, last_day=TODAY, now=NOW, retention_days=92
    )
    assert [d["day"] for d in report["days"]] == period_days(first, TODAY)
    assert report["days"][0]["delivered"]["recipients"] == 0  # a day without mail is shown
    totals = report["totals"]
    assert (totals["delivered"]["messages"], totals["delivered"]["recipients"]) == (4, 6)
    mechanisms = totals["delivered"]["by_mechanism"]
    assert mechanisms["sts-enforce"]["by_tls_version"] == {
        "TLSv1.3": {"messages": 1, "recipients": 2}
    }
    assert mechanisms["plaintext"]["recipients"] == 3
    assert list(totals["delivered"]["by_tls_version"]) == ["TLSv1.3", "TLSv1.2", "plaintext"]
    assert totals["bounced"]["by_cause"]["policy"] == {"messages": 1, "recipients": 1}
    assert [d["domain"] for d in report["domains"]] == ["clear.test", "safe.test", "weak.test"]
    assert [w["domain"] for w in report["weakest_domains"]] == ["clear.test", "weak.test"]
    assert report["weakest_domains"][1]["weak_share"] == 1.0
    (stuck,) = report["waiting_on_policy"]
    assert (stuck["messages"], stuck["recipients"], stuck["waiting_seconds"]) == (2, 3, 7200)
    assert stuck["mechanisms"] == ["dane", "sts-enforce"]


def test_the_page_is_self_contained_and_names_no_local_part() -> None:
    cells = _cells(attempt(DELIVERED_TLS, key="q1 d.test"))
    report = build_report(
        cells, [], first_day=utc_day(NOW - DAY), last_day=TODAY, now=NOW, retention_days=92
    )
    page = render_page(report)
    assert page.startswith("<!DOCTYPE html>")
    assert "default-src 'none'" in page
    for fetched in ("<script", "src=", "href=", "url(", "://", "@import", "@"):
        assert fetched not in page
    assert page.count('class="chart"') == 2
    assert page.count('class="day"') == 4  # two charts, two days each


def test_charts_scale_to_whole_numbers_and_escape_names() -> None:
    assert [nice_ceiling(n) for n in (0, 1, 3, 7, 11, 999)] == [1, 1, 5, 10, 20, 1000]
    svg = stacked_bars("c", "T<", ["2027-01-01"], [Series("<b>", "#000", (7,))])
    assert "<b>" not in svg
    assert 'data-value="7"' in svg
    assert ">8</text>" in svg  # ticks 0, 2 ... 8


# --- the command's period ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 7 * DAY), ("36h", 129600.0), ("90m", 5400.0), ("1w2d", 9 * DAY), ("3600", 3600.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "7x", "7d junk", "-1d", "1.5h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="--since"):
        parse_duration(text)


def test_periods_are_whole_utc_days() -> None:
    assert parse_period(None, None, NOW) == (utc_day(NOW - 7 * DAY), TODAY)
    assert parse_period("36h", None, NOW) == (utc_day(NOW - 1.5 * DAY), TODAY)
    assert parse_period(None, "today", NOW) == (TODAY, TODAY)
    assert parse_period(None, "yesterday", NOW) == (utc_day(NOW - DAY),) * 2
    assert parse_period(None, "2026-12-01", NOW) == ("2026-12-01", "2026-12-01")
    with pytest.raises(ValueError, match="--day"):
        parse_period(None, "12/01", NOW)


def test_the_report_reads_without_writing(tmp_path: Path) -> None:
    db = tmp_path / "relay.sqlite3"
    with sqlite3.connect(db) as raw:  # a store whose relay never counted anything
        raw.execute("CREATE TABLE other (x)")
    reader = SqlitePostureStore(db, readonly=True)
    assert reader.cells("2000-01-01", TODAY) == []
    assert reader.waiting() == []
    with pytest.raises(sqlite3.OperationalError):  # no such table, and no right to make one
        reader.write({Cell(TODAY, "d.test", Status.DELIVERED, Mechanism.DANE): Figures(1, 1)}, {})
    reader.close()
    with sqlite3.connect(db) as raw:
        tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master")}
    assert tables == {"other"}
