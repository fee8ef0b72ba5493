"""`sts-relay report tls`: how the relay's mail left over a period, from the posture store.

Reads the daily aggregates and the waiting entries (`posture`), builds the report value
(`posture.report.build_report`) and prints it as text or `--json`, or writes it as one
self-contained HTML page (`--html FILE`). Reads only: it never changes the store, and it
never creates one (a mistyped `state.path` must not show an empty report).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from posture.model import utc_day
from posture.page import render_page
from posture.report import build_report, recipient_figures
from posture.tally import RETENTION_DAYS
from relay.app import database_path
from relay.cli.output import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, fail, print_json
from relay.config import Config
from relay.posture import open_posture_store, stale_after

DEFAULT_SINCE = "7d"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+)([smhdw])")


def parse_duration(text: str) -> float:
    """ "7d", "36h", "1w2d", "90m" or plain seconds ("3600"); ValueError otherwise."""
    value = text.strip().lower()
    if value.isdigit():
        return float(value)
    parts = _DURATION.findall(value)
    if not value or not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"--since: expected a duration like 7d, 36h or 90m, got {text!r}")
    return float(sum(int(n) * _UNITS[u] for n, u in parts))


def parse_period(since: str | None, day: str | None, now: float) -> tuple[str, str]:
    """The UTC days [first, last] a report covers.

    `--day D` (YYYY-MM-DD, today, yesterday) is that day; `--since DURATION` runs from the
    UTC day that held now - DURATION through today (aggregates are daily, so the period is
    rounded out to whole days). The default is `--since 7d`."""
    today = date.fromisoformat(utc_day(now))
    if day is not None:
        if day == "today":
            return today.isoformat(), today.isoformat()
        if day == "yesterday":
            yesterday = (today - timedelta(days=1)).isoformat()
            return yesterday, yesterday
        try:
            chosen = date.fromisoformat(day).isoformat()
        except ValueError:
            raise ValueError(
                f"--day: expected YYYY-MM-DD, today or yesterday, got {day!r}"
            ) from None
        return chosen, chosen
    seconds = parse_duration(since or DEFAULT_SINCE)
    return utc_day(now - seconds), today.isoformat()


def _read(cfg: Config, db_path: Path, first: str, last: str, now: float) -> dict[str, Any]:
    store = open_posture_store(cfg, db_path, readonly=True)
    try:
        cells = store.cells(first, last)
        fresh = now - stale_after(cfg)
        waiting = [w for w in store.waiting() if w.last_at >= fresh]
    finally:
        store.close()
    return build_report(
        cells,
        waiting,
        first_day=first,
        last_day=last,
        now=now,
        retention_days=RETENTION_DAYS,
    )


async def run_report_command(
    cfg: Config, *, since: str | None, day: str | None, as_json: bool, html: str | None
) -> int:
    now = time.time()
    try:
        first, last = parse_period(since, day, now)
    except ValueError as exc:
        return fail(str(exc), EXIT_USAGE, as_json=as_json)
    db_path = database_path(cfg)
    if not db_path.is_file():  # main checks first; never create a store here either
        return fail(f"no sts-relay state at {db_path.parent}", as_json=as_json)
    report = await asyncio.to_thread(_read, cfg, db_path, first, last, now)
    if html is not None:
        try:
            await asyncio.to_thread(_write_page, Path(html), render_page(report))
        except OSError as exc:
            return fail(f"cannot write {html}: {exc}", EXIT_FAILURE, as_json=as_json)
        print(f"wrote {html}", file=sys.stderr)
    if as_json:
        print_json(report)
    elif html is None:
        print(format_text(report), end="")
    return EXIT_OK


def _write_page(path: Path, text: str) -> None:
    """Replace `path` whole (a reader never sees half a page)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=".report-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- text ---------------------------------------------------------------------------------


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:5.1f}%" if whole else "    -"


def _failed_line(name: str, figures: dict[str, Any]) -> str:
    causes = figures["by_cause"]
    return (
        f"{name}: {figures['recipients']} recipient(s) in {figures['messages']} message(s)"
        f" (policy/TLS {causes['policy']['recipients']}, other {causes['other']['recipients']})"
    )


def format_text(report: dict[str, Any]) -> str:
    period = report["period"]
    totals = report["totals"]
    delivered = totals["delivered"]
    n = delivered["recipients"]
    lines = [
        f"TLS posture {period['first_day']} .. {period['last_day']}"
        f" ({period['days']} UTC day(s), generated {report['generated_at']})",
        "",
        f"Delivered: {n} recipient(s) in {delivered['messages']} message(s)",
    ]
    labels = {
        "authenticated": "authenticated TLS",
        "unauthenticated_tls": "unauthenticated TLS",
        "plaintext": "plaintext",
    }
    for key, label in labels.items():
        count = delivered["by_security"][key]["recipients"]
        lines.append(f"  {label:<22}{count:>8} {_pct(count, n)}")
    lines.append(f"  {'by mechanism':<22}{'messages':>8} {'rcpts':>8}  TLS versions (recipients)")
    for mech, f in delivered["by_mechanism"].items():
        versions = ", ".join(f"{v} {x['recipients']}" for v, x in f["by_tls_version"].items())
        lines.append(f"    {mech:<20}{f['messages']:>8} {f['recipients']:>8}  {versions or '-'}")
    lines.append(_failed_line("Deferred", totals["deferred"]))
    lines.append(_failed_line("Bounced", totals["bounced"]))
    lines += ["", "Per domain (recipients)"]
    head = ("domain", "sent", "auth", "unauth", "plain", "def:pol", "def:oth", "bnc:pol")
    lines.append(f"  {head[0]:<32}" + "".join(f"{h:>8}" for h in (*head[1:], "bnc:oth")))
    for d in report["domains"]:
        values = recipient_figures(d)
        lines.append(f"  {d['domain']:<32}" + "".join(f"{v:>8}" for v in values))
    lines += ["", "Most unauthenticated or plaintext deliveries"]
    for w in report["weakest_domains"]:
        lines.append(
            f"  {w['domain']:<32} unauthenticated TLS {w['unauthenticated_tls_recipients']},"
            f" plaintext {w['plaintext_recipients']} of {w['delivered_recipients']}"
        )
    if not report["weakest_domains"]:
        lines.append("  none")
    lines += ["", "Waiting because their policy cannot be met (now)"]
    for w in report["waiting_on_policy"]:
        results = ", ".join(w["results"]) or "-"
        lines.append(
            f"  {w['domain']:<32} {w['recipients']} recipient(s) in {w['messages']} message(s),"
            f" waiting {w['waiting_seconds'] / 3600:.1f} h since {w['waiting_since']};"
            f" {', '.join(w['mechanisms'])}: {results}"
        )
    if not report["waiting_on_policy"]:
        lines.append("  none")
    return "\n".join(lines) + "\n"
