"""The RFC 8460 §4 aggregate report: built from one domain's counters for one UTC day,
serialised as I-JSON, gzip'd (§5.1), and named (§5.1 filename).

Pure functions; no I/O. Knows nothing of how reports travel (see mail.py, post.py).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from tlsrpt.model import AppliedPolicy, Count, Failure, PolicyType

MEDIA_TYPE_GZIP = "application/tlsrpt+gzip"


def a_label(domain: str) -> str:
    """The domain as lower-case A-labels (RFC 8460 §4: IDNs are reported as A-labels)."""
    name = domain.strip().removesuffix(".").lower()
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


def day_bounds(day: str) -> tuple[datetime, datetime]:
    """[start, end) of a UTC day (RFC 8460 §4.1: 00:00 to 24:00 UTC)."""
    start = datetime.combine(date.fromisoformat(day), datetime.min.time(), tzinfo=UTC)
    return start, start + timedelta(days=1)


def build_report(
    *,
    domain: str,
    day: str,
    counts: Sequence[Count],
    organization: str,
    contact: str,
    report_id: str,
) -> dict[str, Any]:
    """The §4 JSON object for `domain` on `day`; one `policies` entry per applied policy."""
    start, end = day_bounds(day)
    by_policy: dict[AppliedPolicy, list[Count]] = {}
    for count in counts:
        if count.domain == domain and count.day == day:
            by_policy.setdefault(count.policy, []).append(count)
    return {
        "organization-name": organization,
        "date-range": {
            "start-datetime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "end-datetime": (end - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "contact-info": contact,
        "report-id": report_id,
        "policies": [
            _policy_entry(domain, policy, rows)
            for policy, rows in sorted(
                by_policy.items(), key=lambda item: (item[0].type.value, item[0].strings)
            )
        ],
    }


def _policy_entry(domain: str, policy: AppliedPolicy, rows: list[Count]) -> dict[str, Any]:
    described: dict[str, Any] = {"policy-type": policy.type.value}
    described_policy = policy.type in (PolicyType.STS, PolicyType.TLSA)
    if described_policy:
        # RFC 8460 §4.5: the STS policy lines, or one "3 1 1 <hex>" string per TLSA record.
        described["policy-string"] = list(policy.strings)
    described["policy-domain"] = domain
    if described_policy:
        # RFC-CHECKLIST RPT-04: an array, as the major reporters emit it (for tlsa: the MX
        # host whose TLSA records these are).
        described["mx-host"] = list(policy.mx)
    failures: dict[Failure, int] = {}
    successes = 0
    for row in rows:
        if row.failure is None:
            successes += row.count
        else:
            failures[row.failure] = failures.get(row.failure, 0) + row.count
    return {
        "policy": described,
        "summary": {
            "total-successful-session-count": successes,
            "total-failure-session-count": sum(failures.values()),
        },
        "failure-details": [
            _failure_entry(f, n)
            for f, n in sorted(
                failures.items(), key=lambda i: (i[0].result.value, i[0].receiving_mx)
            )
        ],
    }


def _failure_entry(failure: Failure, count: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"result-type": failure.result.value}
    if failure.sending_ip:
        entry["sending-mta-ip"] = failure.sending_ip
    if failure.receiving_mx:
        entry["receiving-mx-hostname"] = failure.receiving_mx
    if failure.receiving_ip:
        entry["receiving-ip"] = failure.receiving_ip
    entry["failed-session-count"] = count
    return entry


def report_json(report: dict[str, Any]) -> bytes:
    """I-JSON (RFC 7493): UTF-8, no duplicate keys, integers as integers."""
    return json.dumps(report, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def compress(data: bytes) -> bytes:
    """gzip (RFC 8460 §5.1), with no timestamp so the bytes depend on the report alone."""
    return gzip.compress(data, mtime=0)


def report_filename(submitter: str, domain: str, day: str, unique: str) -> str:
    """RFC 8460 §5.1: `sender!policy-domain!begin!end!unique.json.gz`, times as POSIX
    seconds, domains as A-labels."""
    start, end = day_bounds(day)
    safe_unique = re.sub(r"[^A-Za-z0-9]", "", unique)[:32] or "0"
    begin_s, end_s = int(start.timestamp()), int(end.timestamp())
    return f"{a_label(submitter)}!{a_label(domain)}!{begin_s}!{end_s}!{safe_unique}.json.gz"
