"""`sts-relay tlsrpt ...`: the RFC 8460 reports of a day, shown or sent now.

`show` builds each domain's report from the counters and looks up where it would go,
changing nothing. `send` builds and sends the day's reports not sent yet, as the daily
job does (mailto: into the queue, which the running relay delivers; https: POSTed now,
and retried later by the running relay when that fails). Both need an existing store (the
caller checks: they never create one).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from policy.webpki import client_context
from relay.app import database_path, make_resolver, open_store
from relay.cli.output import fail
from relay.config import Config, ConfigError
from relay.events import EventLog
from relay.reporting import PlannedReport, Reporting, build_reporting
from tlsrpt.discover import LookupFailed, NoRecord
from tlsrpt.model import Delivery, DeliveryState, TlsRptRecord

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

if TYPE_CHECKING:
    from relay.app import AnyStore


def parse_day(text: str | None, now: float) -> str:
    """YYYY-MM-DD, "today" or "yesterday" (UTC); the default is yesterday."""
    today = datetime.fromtimestamp(now, tz=UTC).date()
    if text is None or text == "yesterday":
        return (today - timedelta(days=1)).isoformat()
    if text == "today":
        return today.isoformat()
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise ValueError(f"--day: expected YYYY-MM-DD, today or yesterday, got {text!r}") from None


def delivery_as_dict(d: Delivery) -> dict[str, Any]:
    return {
        "uri": d.uri,
        "state": d.state.value,
        "attempts": d.attempts,
        "next_attempt_at": d.next_attempt_at,
        "last_error": d.last_error,
    }


def planned_as_dict(p: PlannedReport) -> dict[str, Any]:
    rua = list(p.record.rua) if isinstance(p.record, TlsRptRecord) else []
    error = None if isinstance(p.record, TlsRptRecord) else p.record.detail
    return {
        "domain": p.domain,
        "day": p.day,
        "rua": rua,
        "record_error": error,
        "already_sent": p.already_sent,
        "deliveries": [delivery_as_dict(d) for d in p.deliveries],
        "report": p.report,
    }


def _print_planned(p: PlannedReport) -> None:
    if isinstance(p.record, TlsRptRecord):
        where = "to " + ", ".join(p.record.rua)
    elif isinstance(p.record, NoRecord):
        where = f"not sent: {p.record.detail}"
    else:
        where = f"not sent yet: {p.record.detail}"
    sent = " (already sent)" if p.already_sent else ""
    print(f"{p.domain}  {p.day}{sent}  {where}")
    for entry in p.report["policies"]:
        policy, summary = entry["policy"], entry["summary"]
        print(
            f"    {policy['policy-type']}: "
            f"{summary['total-successful-session-count']} successful, "
            f"{summary['total-failure-session-count']} failed"
        )
        for failure in entry["failure-details"]:
            mx = failure.get("receiving-mx-hostname", "-")
            ip = failure.get("receiving-ip", "-")
            count = failure["failed-session-count"]
            print(f"        {failure['result-type']}  {mx} [{ip}]  x{count}")
    for d in p.deliveries:
        error = f"  ({d.last_error})" if d.last_error else ""
        print(f"    {d.uri}: {d.state.value}, {d.attempts} attempt(s){error}")


def _reporting(cfg: Config, queue: AnyStore | None) -> Reporting:
    events = EventLog(sys.stderr, fmt="text", level="warning")
    database_path(cfg).parent.mkdir(parents=True, exist_ok=True)
    return build_reporting(
        cfg,
        database_path(cfg),
        queue=queue,
        resolver=make_resolver(tuple(cfg.dns.nameservers), cfg.dns.timeout),
        ssl_context=client_context(cfg.tls.ca_file),
        events=events,
    )


async def run_tlsrpt_command(cfg: Config, action: str, day_text: str | None, as_json: bool) -> int:
    try:
        day = parse_day(day_text, time.time())
        reporting = _reporting(cfg, None)
    except (ValueError, ConfigError) as exc:
        return fail(str(exc), EXIT_USAGE, as_json=as_json)
    try:
        if action == "show":
            return await _show(reporting, day, as_json)
        return await _send(cfg, reporting, day, as_json)
    finally:
        await reporting.close()


async def _show(reporting: Reporting, day: str, as_json: bool) -> int:
    planned = await reporting.reporter.plan(day)
    if as_json:
        print(json.dumps([planned_as_dict(p) for p in planned], indent=2))
        return EXIT_OK
    if not planned:
        print(f"no sessions counted on {day}")
    for p in planned:
        _print_planned(p)
    return EXIT_OK


async def _send(cfg: Config, reporting: Reporting, day: str, as_json: bool) -> int:
    queue = open_store(cfg)
    await queue.open()
    try:
        reporting.reporter.attach_queue(queue)
        planned = await reporting.reporter.plan(day)
        deliveries = await reporting.reporter.send_day(day)
    finally:
        await queue.close()
    waiting = [p.domain for p in planned if isinstance(p.record, LookupFailed)]
    if as_json:
        out = {"day": day, "deliveries": [delivery_as_dict(d) for d in deliveries]}
        print(json.dumps({**out, "lookup_failed": waiting}, indent=2))
    else:
        for d in deliveries:
            error = f"  ({d.last_error})" if d.last_error else ""
            print(f"{d.domain}  {d.uri}: {d.state.value}{error}")
        for domain in waiting:
            print(f"{domain}: TLSRPT record lookup failed; try again later", file=sys.stderr)
        if not deliveries and not waiting:
            print(f"nothing to send for {day}", file=sys.stderr)
    ok = all(d.state in (DeliveryState.QUEUED, DeliveryState.SENT) for d in deliveries)
    return EXIT_OK if ok and not waiting else EXIT_FAILURE
