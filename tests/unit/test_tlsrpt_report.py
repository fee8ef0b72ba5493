"""RFC 8460 §4 report building, validated against the schema written from §4 (RPT-04..08, 15)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from policy.model import Mode, Policy, TlsRptResult
from tlsrpt.counter import applied_policy
from tlsrpt.model import AppliedPolicy, Count, Failure, PolicyType
from tlsrpt.report import (
    a_label,
    build_report,
    compress,
    report_filename,
    report_json,
)

SCHEMA = json.loads(
    (Path(__file__).parents[1] / "support" / "tlsrpt.schema.json").read_text(encoding="utf-8")
)
BODY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.d.test\r\nmax_age: 86400\r\n"
P1 = Policy(Mode.ENFORCE, ("mx1.d.test",), 86400, BODY)
DAY = "2026-03-04"


def _validate(report: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(report)


def _report(counts: list[Count], domain: str = "d.test") -> dict[str, Any]:
    return build_report(
        domain=domain,
        day=DAY,
        counts=counts,
        organization="Relay Org",
        contact="tlsrpt@relay.test",
        report_id="20260304.abc.d.test@relay.test",
    )


def test_policy_string_is_one_string_per_policy_line() -> None:
    # RPT-06
    policy = applied_policy(P1)
    assert policy.type is PolicyType.STS
    assert policy.strings == ("version: STSv1", "mode: enforce", "mx: mx1.d.test", "max_age: 86400")
    assert policy.mx == ("mx1.d.test",)
    assert applied_policy(None) == AppliedPolicy(PolicyType.NO_POLICY_FOUND)


def test_three_successes_and_two_failures_are_summed_per_detail() -> None:
    # RPT-07: 3 verified deliveries and 2 self-signed deferrals.
    sts = applied_policy(P1)
    bad = Failure(TlsRptResult.CERTIFICATE_NOT_TRUSTED, "mx1.d.test", "127.0.0.5", "127.0.0.1")
    counts = [
        Count("d.test", DAY, sts, None, 3),
        Count("d.test", DAY, sts, bad, 2),
        Count("other.test", DAY, sts, None, 7),  # another domain: not in this report
    ]
    report = _report(counts)
    _validate(report)
    (entry,) = report["policies"]
    assert entry["policy"] == {
        "policy-type": "sts",
        "policy-string": ["version: STSv1", "mode: enforce", "mx: mx1.d.test", "max_age: 86400"],
        "policy-domain": "d.test",
        "mx-host": ["mx1.d.test"],
    }
    assert entry["summary"] == {
        "total-successful-session-count": 3,
        "total-failure-session-count": 2,
    }
    assert entry["failure-details"] == [
        {
            "result-type": "certificate-not-trusted",
            "sending-mta-ip": "127.0.0.1",
            "receiving-mx-hostname": "mx1.d.test",
            "receiving-ip": "127.0.0.5",
            "failed-session-count": 2,
        }
    ]


def test_each_applied_policy_gets_its_own_entry_and_the_day_is_utc() -> None:
    # RPT-05, RPT-06
    none = AppliedPolicy(PolicyType.NO_POLICY_FOUND)
    fetch = Failure(TlsRptResult.STS_POLICY_FETCH_ERROR)
    counts = [
        Count("d.test", DAY, applied_policy(P1), None, 1),
        Count("d.test", DAY, none, None, 4),
        Count("d.test", DAY, none, fetch, 1),
    ]
    report = _report(counts)
    _validate(report)
    assert report["date-range"] == {
        "start-datetime": "2026-03-04T00:00:00Z",
        "end-datetime": "2026-03-04T23:59:59Z",
    }
    types = [e["policy"]["policy-type"] for e in report["policies"]]
    assert sorted(types) == ["no-policy-found", "sts"]
    nopol = next(e for e in report["policies"] if e["policy"]["policy-type"] == "no-policy-found")
    assert nopol["policy"] == {"policy-type": "no-policy-found", "policy-domain": "d.test"}
    assert nopol["summary"]["total-successful-session-count"] == 4
    assert nopol["failure-details"] == [
        {"result-type": "sts-policy-fetch-error", "failed-session-count": 1}
    ]


def test_report_is_ijson_and_gzip_round_trips() -> None:
    report = _report([Count("d.test", DAY, applied_policy(P1), None, 2)])
    data = compress(report_json(report))
    assert data[:2] == b"\x1f\x8b"
    decoded = json.loads(gzip.decompress(data))
    assert decoded == report
    assert isinstance(decoded["policies"][0]["summary"]["total-successful-session-count"], int)
    assert compress(report_json(report)) == data  # no timestamp in the gzip header


def test_schema_rejects_what_the_rfc_forbids() -> None:
    report = _report([Count("d.test", DAY, applied_policy(P1), None, 2)])
    broken = json.loads(json.dumps(report))
    broken["policies"][0]["summary"]["total-successful-session-count"] = "2"
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)
    broken = json.loads(json.dumps(report))
    del broken["report-id"]
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)


FILENAME = re.compile(r"^[a-z0-9.-]+![a-z0-9.-]+![0-9]+![0-9]+(![A-Za-z0-9]+)?\.json(\.gz)?$")


def test_filename_follows_rfc_8460_section_5_1() -> None:
    # RPT-08
    name = report_filename("relay.test", "d.test", DAY, "abc123")
    assert FILENAME.fullmatch(name)
    assert name == "relay.test!d.test!1772582400!1772668800!abc123.json.gz"


def test_idn_domains_are_reported_as_a_labels() -> None:
    # RPT-15
    assert a_label("Bücher.test.") == "xn--bcher-kva.test"
    domain = a_label("bücher.test")
    report = _report(
        [Count(domain, DAY, AppliedPolicy(PolicyType.NO_POLICY_FOUND), None, 1)], domain
    )
    _validate(report)
    assert report["policies"][0]["policy"]["policy-domain"] == "xn--bcher-kva.test"
    assert FILENAME.fullmatch(report_filename("relay.test", "bücher.test", DAY, "x"))
