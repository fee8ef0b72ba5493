"""The posture report as one self-contained HTML page: inline CSS, inline SVG charts.

No script, no font, no image or style sheet from anywhere: a Content-Security-Policy
meta tag forbids every fetch, so the page reads the same offline, attached to a ticket or
opened years later. Built from the report value (posture.report), so it shows exactly
the figures of `--json`. Pure: text in, text out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from posture.chart import Series, stacked_bars
from posture.report import recipient_figures

MECHANISM_COLORS = {
    "dane": "#1b7837",
    "sts-enforce": "#5aae61",
    "sts-testing": "#a6dba0",
    "override": "#762a83",
    "tls-required-no": "#c2a5cf",
    "opportunistic": "#fdb863",
    "plaintext": "#d73027",
}
FAILURE_SERIES = (
    ("deferred", "policy", "deferred: policy/TLS", "#e08214"),
    ("deferred", "other", "deferred: other", "#fee0b6"),
    ("bounced", "policy", "bounced: policy/TLS", "#b2182b"),
    ("bounced", "other", "bounced: other", "#8c8c8c"),
)
SECURITY_LABELS = {
    "authenticated": "authenticated TLS",
    "unauthenticated_tls": "unauthenticated TLS",
    "plaintext": "plaintext",
}

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 60em;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0; } h2 { font-size: 1.15em; margin-top: 2em; }
.period { color: #555; margin-top: .2em; }
.cards { display: flex; flex-wrap: wrap; gap: .8em; margin: 1.2em 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .6em 1em; min-width: 9em; }
.card b { display: block; font-size: 1.5em; }
table { border-collapse: collapse; width: 100%; margin: .5em 0; }
th, td { border-bottom: 1px solid #e4e4e4; padding: .3em .5em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f5f5f5; }
svg.chart { max-width: 100%; height: auto; }
svg .grid { stroke: #e4e4e4; } svg .axis, svg .legend { font-size: 11px; fill: #444; }
.none { color: #777; font-style: italic; }
"""


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], cls: str) -> str:
    if not rows:
        return f'<p class="none {cls}">none</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cards(totals: Mapping[str, Any]) -> str:
    delivered = totals["delivered"]
    n = delivered["recipients"]
    security = delivered["by_security"]
    cards = [("delivered recipients", str(n))]
    for key, label in SECURITY_LABELS.items():
        cards.append((label, _pct(security[key]["recipients"], n)))
    for status in ("deferred", "bounced"):
        causes = totals[status]["by_cause"]
        cards.append(
            (
                f"{status} (policy/TLS, other)",
                f"{causes['policy']['recipients']}, {causes['other']['recipients']}",
            )
        )
    items = "".join(
        f'<div class="card">{escape(label)}<b>{escape(value)}</b></div>' for label, value in cards
    )
    return f'<div class="cards">{items}</div>'


def _mechanism_rows(totals: Mapping[str, Any]) -> list[list[object]]:
    delivered = totals["delivered"]
    rows: list[list[object]] = []
    for mech, f in delivered["by_mechanism"].items():
        versions = ", ".join(f"{v} {x['recipients']}" for v, x in f["by_tls_version"].items())
        share = _pct(f["recipients"], delivered["recipients"])
        rows.append([mech, f["messages"], f["recipients"], share, versions or "-"])
    return rows


def _domain_rows(domains: Sequence[Mapping[str, Any]]) -> list[list[object]]:
    return [[d["domain"], d["delivered"]["messages"], *recipient_figures(d)] for d in domains]


def charts(report: Mapping[str, Any]) -> str:
    days = report["days"]
    labels = [d["day"] for d in days]
    delivered = [
        Series(
            mech,
            color,
            tuple(d["delivered"]["by_mechanism"][mech]["recipients"] for d in days),
        )
        for mech, color in MECHANISM_COLORS.items()
    ]
    failed = [
        Series(name, color, tuple(d[status]["by_cause"][cause]["recipients"] for d in days))
        for status, cause, name, color in FAILURE_SERIES
    ]
    return "\n".join(
        [
            "<h2>Delivered recipients per day, by mechanism</h2>",
            stacked_bars("chart-delivered", "Delivered recipients per day", labels, delivered),
            "<h2>Recipients deferred or bounced per day, by cause</h2>",
            stacked_bars("chart-failed", "Deferred and bounced recipients per day", labels, failed),
        ]
    )


def render_page(report: Mapping[str, Any]) -> str:
    """The page of a report value (posture.report.build_report)."""
    period = report["period"]
    totals = report["totals"]
    title = f"TLS posture {period['first_day']} to {period['last_day']}"
    weakest = [
        [
            w["domain"],
            w["delivered_recipients"],
            w["unauthenticated_tls_recipients"],
            w["plaintext_recipients"],
            f"{100 * w['weak_share']:.1f}%",
        ]
        for w in report["weakest_domains"]
    ]
    waiting = [
        [
            w["domain"],
            w["messages"],
            w["recipients"],
            w["waiting_since"],
            f"{w['waiting_seconds'] / 3600:.1f} h",
            ", ".join(w["mechanisms"]),
            ", ".join(w["results"]) or "-",
        ]
        for w in report["waiting_on_policy"]
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # Nothing may be fetched: the page is whole as it is.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\';'
        " style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="period">{period["days"]} UTC day(s), generated'
        f" {escape(report['generated_at'])};"
        f" daily aggregates are kept {report['retention_days']} days.</p>",
        _cards(totals),
        charts(report),
        "<h2>Delivered, by mechanism</h2>",
        _table(
            ["mechanism", "messages", "recipients", "share", "TLS versions (recipients)"],
            _mechanism_rows(totals),
            "mechanisms",
        ),
        "<h2>Mail waiting because its domain's policy cannot be met</h2>",
        _table(
            ["domain", "messages", "recipients", "since", "waiting", "mechanism", "result"],
            waiting,
            "waiting",
        ),
        "<h2>Domains with the most unauthenticated or plaintext deliveries</h2>",
        _table(
            ["domain", "delivered", "unauthenticated TLS", "plaintext", "weak share"],
            weakest,
            "weakest",
        ),
        "<h2>Per domain (recipients; messages are (message, domain) transfers)</h2>",
        _table(
            [
                "domain",
                "messages",
                "delivered",
                "authenticated",
                "unauth. TLS",
                "plaintext",
                "deferred policy",
                "deferred other",
                "bounced policy",
                "bounced other",
            ],
            _domain_rows(report["domains"]),
            "domains",
        ),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
