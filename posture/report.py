"""The posture report of a period, as one JSON-ready value: built from the daily aggregates
and the waiting entries, pure (no I/O, `now` is a parameter).

Figures: per domain, per day and in total, recipients and messages delivered by mechanism
(with TLS versions) and by security (authenticated TLS, unauthenticated TLS, plaintext);
deferred and bounced by cause (policy/TLS or other); the domains with the most
unauthenticated or plaintext deliveries; the domains whose mail waits on their policy.
A "message" is one (message, domain) transfer: a message to two domains counts for each.
Nothing here names a recipient's local part: the aggregates never held one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from posture.model import DELIVERY_MECHANISMS, Cause, Cell, Figures, Status, Waiting

REPORT_VERSION = 1
TOP_WEAKEST = 10
SECURITY = ("authenticated", "unauthenticated_tls", "plaintext")
PLAINTEXT = "plaintext"  # the TLS "version" of a delivery in the clear


def period_days(first_day: str, last_day: str) -> list[str]:
    """Every UTC day from `first_day` to `last_day`, both included."""
    first, last = date.fromisoformat(first_day), date.fromisoformat(last_day)
    return [(first + timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]


def _count(f: Figures) -> dict[str, int]:
    return {"messages": f.messages, "recipients": f.recipients}


def security_of(cell: Cell) -> str:
    if not cell.tls:
        return "plaintext"
    return "authenticated" if cell.authenticated else "unauthenticated_tls"


def summary(cells: Iterable[tuple[Cell, Figures]]) -> dict[str, Any]:
    """The figures of a set of aggregates (one domain, one day, or all)."""
    delivered = Figures()
    by_mechanism = {m.value: Figures() for m in DELIVERY_MECHANISMS}
    mech_versions: dict[str, dict[str, Figures]] = {m.value: {} for m in DELIVERY_MECHANISMS}
    by_version: dict[str, Figures] = {}
    by_security = dict.fromkeys(SECURITY, Figures())
    failed = {s: Figures() for s in (Status.DEFERRED, Status.BOUNCED)}
    by_cause = {s: {c.value: Figures() for c in Cause} for s in failed}
    for cell, f in cells:
        if cell.status is Status.DELIVERED:
            version = cell.tls or PLAINTEXT
            mech = cell.mechanism.value
            delivered += f
            by_mechanism[mech] = by_mechanism.get(mech, Figures()) + f
            versions = mech_versions.setdefault(mech, {})
            versions[version] = versions.get(version, Figures()) + f
            by_version[version] = by_version.get(version, Figures()) + f
            by_security[security_of(cell)] += f
        else:
            failed[cell.status] += f
            cause = cell.cause or Cause.OTHER.value
            by_cause[cell.status][cause] = by_cause[cell.status].get(cause, Figures()) + f
    return {
        "delivered": {
            **_count(delivered),
            "by_mechanism": {
                m: {
                    **_count(f),
                    "by_tls_version": _versions(mech_versions[m]),
                }
                for m, f in by_mechanism.items()
            },
            "by_tls_version": _versions(by_version),
            "by_security": {k: _count(f) for k, f in by_security.items()},
        },
        **{
            s.value: {
                **_count(failed[s]),
                "by_cause": {c: _count(f) for c, f in by_cause[s].items()},
            }
            for s in failed
        },
    }


def _versions(figures: dict[str, Figures]) -> dict[str, dict[str, int]]:
    """Newest TLS version first, plaintext last."""
    order = sorted((v for v in figures if v != PLAINTEXT), reverse=True)
    order += [PLAINTEXT] if PLAINTEXT in figures else []
    return {v: _count(figures[v]) for v in order}


def weakest(cells: Sequence[tuple[Cell, Figures]], top: int = TOP_WEAKEST) -> list[dict[str, Any]]:
    """The domains with the most deliveries without authenticated TLS, worst first."""
    per: dict[str, dict[str, int]] = {}
    for cell, f in cells:
        if cell.status is not Status.DELIVERED:
            continue
        entry = per.setdefault(cell.domain, dict.fromkeys(SECURITY, 0))
        entry[security_of(cell)] += f.recipients
    ranked: list[tuple[int, int, str]] = []
    for domain, entry in per.items():
        weak = entry["unauthenticated_tls"] + entry["plaintext"]
        if weak:
            ranked.append((-weak, -entry["plaintext"], domain))
    out = []
    for _, _, domain in sorted(ranked)[:top]:
        entry = per[domain]
        total = sum(entry.values())
        out.append(
            {
                "domain": domain,
                "delivered_recipients": total,
                "unauthenticated_tls_recipients": entry["unauthenticated_tls"],
                "plaintext_recipients": entry["plaintext"],
                "weak_share": round((total - entry["authenticated"]) / total, 4),
            }
        )
    return out


def recipient_figures(domain: Mapping[str, Any]) -> tuple[int, ...]:
    """One domain's recipients: sent, authenticated, unauthenticated TLS, plaintext,
    deferred (policy, other), bounced (policy, other): the per-domain tables of the page
    and of the command."""
    security = domain["delivered"]["by_security"]
    deferred, bounced = domain["deferred"]["by_cause"], domain["bounced"]["by_cause"]
    return (
        domain["delivered"]["recipients"],
        security["authenticated"]["recipients"],
        security["unauthenticated_tls"]["recipients"],
        security["plaintext"]["recipients"],
        deferred["policy"]["recipients"],
        deferred["other"]["recipients"],
        bounced["policy"]["recipients"],
        bounced["other"]["recipients"],
    )


def waiting_domains(waiting: Iterable[Waiting], now: float) -> list[dict[str, Any]]:
    """The domains whose mail waits because their policy cannot be met, longest first."""
    per: dict[str, list[Waiting]] = {}
    for w in waiting:
        per.setdefault(w.domain, []).append(w)
    rows: list[tuple[float, str, dict[str, Any]]] = []
    for domain, entries in per.items():
        since = min(w.since for w in entries)
        row = {
            "domain": domain,
            "messages": len(entries),
            "recipients": sum(w.recipients for w in entries),
            "waiting_since": rfc3339(since),
            "waiting_seconds": max(0, round(now - since)),
            "last_attempt": rfc3339(max(w.last_at for w in entries)),
            "mechanisms": sorted({w.mechanism.value for w in entries}),
            "results": sorted({w.result for w in entries if w.result}),
        }
        rows.append((since, domain, row))
    return [row for _, _, row in sorted(rows, key=lambda r: (r[0], r[1]))]


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(round(timestamp), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_report(
    cells: Sequence[tuple[Cell, Figures]],
    waiting: Iterable[Waiting],
    *,
    first_day: str,
    last_day: str,
    now: float,
    retention_days: int,
) -> dict[str, Any]:
    """The whole report of [first_day, last_day] (the shape of
    tests/support/posture-report.schema.json)."""
    days = period_days(first_day, last_day)
    inside = [(c, f) for c, f in cells if first_day <= c.day <= last_day]
    by_domain: dict[str, list[tuple[Cell, Figures]]] = {}
    by_day: dict[str, list[tuple[Cell, Figures]]] = {d: [] for d in days}
    for cell, f in inside:
        by_domain.setdefault(cell.domain, []).append((cell, f))
        by_day.setdefault(cell.day, []).append((cell, f))
    domains = [{"domain": d, **summary(rows)} for d, rows in by_domain.items()]
    domains.sort(key=lambda d: (-d["delivered"]["recipients"], d["domain"]))
    return {
        "report": "tls-posture",
        "version": REPORT_VERSION,
        "generated_at": rfc3339(now),
        "period": {"first_day": first_day, "last_day": last_day, "days": len(days)},
        "retention_days": retention_days,
        "totals": summary(inside),
        "days": [{"day": d, **summary(by_day[d])} for d in days],
        "domains": domains,
        "weakest_domains": weakest(inside),
        "waiting_on_policy": waiting_domains(waiting, now),
    }
