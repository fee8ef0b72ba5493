"""DANE sessions in TLS reports (RFC 8460 §4.4, §4.5; RFC-CHECKLIST RPT-06): a session with an
MX held to DANE counts against its TLSA records (`policy-type` `tlsa`), with the DANE result
types `tlsa-invalid` and `dnssec-invalid`; the report still validates against the schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]

from policy.model import Mode, Policy, PolicyLookup, TlsRptResult
from relay.delivery.attempt import MxTlsResult
from relay.metrics import Metrics
from relay.reporting import sessions_of
from tlsrpt.model import AppliedPolicy, Count, PolicyType
from tlsrpt.report import build_report

SCHEMA = json.loads(
    (Path(__file__).parents[1] / "support" / "tlsrpt.schema.json").read_text(encoding="utf-8")
)
BODY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.d.test\r\nmax_age: 86400\r\n"
ENFORCE = PolicyLookup("d.test", Policy(Mode.ENFORCE, ("mx1.d.test",), 86400, BODY), "1", "cached")
RECORDS = ("3 1 1 " + "ab" * 32, "2 0 1 " + "cd" * 32)
DAY = "2026-03-04"


def test_dane_sessions_count_against_the_tlsa_records_not_the_sts_policy() -> None:
    tried = [
        MxTlsResult("MX1.d.test.", "127.0.0.5", None, RECORDS),
        MxTlsResult("mx2.d.test", "127.0.0.6", TlsRptResult.TLSA_INVALID, RECORDS),
        MxTlsResult("mx3.d.test", "", TlsRptResult.DNSSEC_INVALID, ()),
        MxTlsResult("mx1.d.test", "127.0.0.5", None),  # not DANE: the STS policy
    ]
    ok, mismatch, bogus, sts = sessions_of("d.test", DAY, ENFORCE, tried)
    assert ok.policy == AppliedPolicy(PolicyType.TLSA, RECORDS, ("mx1.d.test",))
    assert ok.failure is None
    assert mismatch.failure is not None
    assert mismatch.failure.result is TlsRptResult.TLSA_INVALID
    assert bogus.policy.type is PolicyType.TLSA
    assert bogus.failure is not None
    assert bogus.failure.result is TlsRptResult.DNSSEC_INVALID
    assert sts.policy.type is PolicyType.STS


def test_a_failed_sts_fetch_does_not_touch_dane_sessions() -> None:
    failed = PolicyLookup("d.test", None, "1", "none", TlsRptResult.STS_POLICY_FETCH_ERROR)
    (session,) = sessions_of("d.test", DAY, failed, [MxTlsResult("mx1.d.test", "", None, RECORDS)])
    assert session.failure is None


def test_tlsa_policy_entry_in_the_report() -> None:
    policy = AppliedPolicy(PolicyType.TLSA, RECORDS, ("mx1.d.test",))
    counts = [Count("d.test", DAY, policy, None, 3)]
    report = build_report(
        domain="d.test",
        day=DAY,
        counts=counts,
        organization="o",
        contact="c@relay.test",
        report_id="r",
    )
    jsonschema.Draft202012Validator(SCHEMA).validate(report)
    (entry,) = report["policies"]
    assert entry["policy"] == {
        "policy-type": "tlsa",
        "policy-string": list(RECORDS),
        "policy-domain": "d.test",
        "mx-host": ["mx1.d.test"],
    }
    assert entry["summary"]["total-successful-session-count"] == 3


def _dane_count(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("sts_relay_dane_sessions_total", {"outcome": outcome})
    return value or 0.0


def _delivery(**fields: Any) -> dict[str, Any]:
    base = {"status": "sent", "ip": "127.0.0.5", "tls": "TLSv1.3", "tls_policy": "dane"}
    return {**base, **fields}


def test_metrics_count_dane_outcomes() -> None:
    metrics = Metrics()
    metrics.observe_event("delivery", _delivery(dane_record=RECORDS[0]))
    metrics.observe_event("delivery", _delivery(dane_record=None))
    metrics.observe_event(
        "delivery", _delivery(status="deferred", tls=None, tlsrpt_result="tlsa-invalid")
    )
    metrics.observe_event(
        "delivery", _delivery(status="deferred", ip=None, tls=None, tlsrpt_result="dnssec-invalid")
    )
    metrics.observe_event("delivery", _delivery(tls_policy="sts"))
    assert _dane_count(metrics, "verified") == 1
    assert _dane_count(metrics, "unauthenticated") == 1
    assert _dane_count(metrics, "tlsa-invalid") == 1
    assert _dane_count(metrics, "dnssec-invalid") == 1
