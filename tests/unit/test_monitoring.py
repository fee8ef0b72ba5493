"""monitoring/: the Grafana dashboard and the Prometheus alert rules load, and every query
names only metrics the relay exports (relay/metrics.py's registry)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"
ALERTS = ROOT / "monitoring" / "alerts.yml"

# PromQL words that are not metric names: functions, aggregations, keywords.
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile", "stddev", "group",
    "rate", "irate", "increase", "delta", "idelta", "by", "without", "on", "ignoring",
    "group_left", "group_right", "and", "or", "unless", "bool", "offset", "time", "vector",
    "scalar", "clamp_min", "clamp_max", "histogram_quantile", "label_values", "abs",
    "max_over_time", "min_over_time", "avg_over_time", "absent", "round",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACES = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w$.])[a-zA-Z_:][a-zA-Z0-9_:]*")


def exported_names() -> set[str]:
    """Every series name /metrics can show, as Prometheus stores it."""
    names = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count", "created")}
        else:
            names.add(family.name)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression (label matchers, ranges, strings and
    grouping clauses removed first)."""
    text = _STRING.sub('""', expr)
    text = _BRACES.sub("", text)
    text = _RANGE.sub("", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    words = set(_IDENT.findall(text))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"\d+", w)}


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield panel["title"], target["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            # Grafana's label_values(METRIC, LABEL): the second argument is a label name.
            yield variable["name"], re.sub(r"label_values\(([^,]+),[^)]*\)", r"\1", text)


def test_the_expression_reader_finds_metric_names() -> None:
    expr = (
        'sum by (mechanism) (rate(sts_relay_delivered_recipients_total{instance=~"$i",'
        'mechanism="sts_relay_fake"}[$__rate_interval])) / on(instance) other_metric > 4 * 3600'
    )
    assert metric_names(expr) == {"sts_relay_delivered_recipients_total", "other_metric"}


def test_the_dashboard_loads_and_queries_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"]
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    exported = exported_names()
    used: set[str] = set()
    found = list(queries(dashboard))
    assert found
    for title, expr in found:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert names <= exported, f"{title}: {sorted(names - exported)} not exported"
        used |= names
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    # It plots the posture: every mechanism/TLS-version counter and the waiting gauges.
    assert {
        "sts_relay_delivered_recipients_total",
        "sts_relay_delivered_messages_total",
        "sts_relay_delivery_failures_total",
        "sts_relay_policy_refresh_errors_total",
        "sts_relay_policy_waiting_recipients",
        "sts_relay_policy_waiting_oldest_seconds",
    } <= used


def test_the_alert_rules_cover_what_an_operator_must_act_on() -> None:
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    exported = exported_names()
    alerts = {}
    for group in rules["groups"]:
        assert group["name"]
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"\d+[smh]", rule["for"])
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"]
            assert rule["annotations"]["description"]
            names = metric_names(rule["expr"])
            assert names, rule["alert"]
            assert names <= exported, (rule["alert"], sorted(names - exported))
            alerts[rule["alert"]] = rule["expr"]
    assert "sts_relay_policy_refresh_errors_total" in alerts["StsRelayPolicyFetchFailing"]
    assert "4 * 3600" in alerts["StsRelayMailWaitingOnPolicy"]
    assert 'tls_version="none"' in alerts["StsRelayPlaintextShareHigh"]


@pytest.mark.parametrize("path", [DASHBOARD, ALERTS], ids=lambda p: p.name)
def test_monitoring_files_are_documented_in_the_readme(path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"monitoring/{path.name}" in readme
