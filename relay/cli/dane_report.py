"""The DANE part of `sts-relay policy check` (RFC 7672): per MX, DNSSEC status, TLSA records
and whether the live certificate matches one.

Owns how DANE evidence (relay/delivery/dane.py) and the probes' certificate chains
(relay/delivery/probe.py) are shown; delivery's own decision (`TlsDecision.for_mx`) says
which hosts are held to DANE. Sends no mail; changes nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import dns.asyncresolver

from relay.config import Config
from relay.delivery.dane import (
    DaneEvidence,
    DaneLookup,
    DaneMatch,
    DaneState,
    HostDane,
    dane_lookup,
    verify_chain,
)
from relay.delivery.decision import TlsDecision
from relay.delivery.dnssec import DnssecSetting, dnssec_in_force
from relay.delivery.mx import MxList
from relay.delivery.probe import Probe


def setup(
    cfg: Config, resolver: dns.asyncresolver.Resolver
) -> tuple[DnssecSetting, DaneLookup | None]:
    """The DNSSEC setting in force and DANE over `resolver` (DO asked on every query from
    now on, so call this before the first lookup), as delivery has them."""
    setting = dnssec_in_force(cfg.dns.dnssec, cfg.dns.nameservers)
    return setting, dane_lookup(setting, resolver, timeout=cfg.dns.timeout)


async def evidence(
    lookup: DaneLookup | None, domain: str, mx: dict[str, Any]
) -> DaneEvidence | None:
    """The DANE evidence of the MX hosts `policy check` found (None: DANE off, no MX)."""
    if lookup is None or mx.get("status") != "ok" or not mx["hosts"]:
        return None
    hosts = tuple(h["host"] for h in mx["hosts"])
    return await lookup.gather(domain, MxList(hosts, bool(mx.get("implicit"))))


def _host_dict(found: HostDane, mx_security: str) -> dict[str, Any]:
    usable = set(found.usable)
    return {
        "state": found.state.value,
        "detail": found.detail,
        "dnssec": {
            "mx": mx_security,
            "addresses": found.addresses.value if found.addresses else None,
            "tlsa": found.tlsa.value if found.tlsa else None,
        },
        "records": [{"record": r.text, "usable": r in usable} for r in found.records],
    }


def annotate(host: dict[str, Any], decision: TlsDecision, found: DaneEvidence | None) -> None:
    """Add `tls_policy`, `dane` (evidence, per probe whether the chain matches) and, for a
    host held to DANE, its own verdict to one MX entry of the report."""
    probes: list[Probe] = host.pop("_probes", [])
    name = host["host"]
    rule = decision.for_mx(name)
    host["tls_policy"] = rule.source.value
    entry = found.host(name) if found is not None else None
    if entry is None or found is None:
        host["dane"] = None
        return
    host["dane"] = _host_dict(entry, found.mx.value)
    if not rule.dane:
        return
    if entry.state is DaneState.FAILED:
        host["usable"], host["secure"] = False, False
        host["verdict"] = f"refused: dnssec-invalid: {entry.detail}"
        return
    now = datetime.now(UTC)
    matched: str | None = None
    for probe, shown in zip(probes, host["probes"], strict=True):
        if not probe.tls_version:
            shown["dane"] = None
            continue
        if entry.state is DaneState.UNUSABLE:
            shown["dane"] = {"matched": None, "result": None, "detail": "unauthenticated TLS"}
            continue
        verdict = verify_chain(probe.chain, entry.usable, name, now)
        if isinstance(verdict, DaneMatch):
            shown["dane"] = {"matched": verdict.record.text, "result": None, "detail": None}
            matched = matched or verdict.record.text
        else:
            shown["dane"] = {
                "matched": None,
                "result": verdict.result.value,
                "detail": verdict.detail,
            }
    _dane_verdict(host, entry, probes, matched)


def _dane_verdict(
    host: dict[str, Any], entry: HostDane, probes: list[Probe], matched: str | None
) -> None:
    tls = next((p.tls_version for p in probes if p.tls_version), None)
    if entry.state is DaneState.UNUSABLE:
        host["secure"] = False
        host["usable"] = tls is not None
        host["verdict"] = (
            f"unauthenticated TLS ({tls}): TLSA records all unusable"
            if tls
            else "refused: TLS required by DANE (unusable TLSA records), not available"
        )
        return
    host["secure"] = matched is not None
    host["usable"] = matched is not None
    if matched is not None:
        host["verdict"] = f"DANE-verified TLS ({tls}), record {matched}"
    elif tls is None:
        host["verdict"] = "refused: DANE requires STARTTLS, not available"
    else:
        failure = next((p["dane"] for p in host["probes"] if p.get("dane")), None)
        result = failure["result"] if failure else "tlsa-invalid"
        host["verdict"] = f"refused: {result}: " + (failure["detail"] if failure else "")


def print_host(host: dict[str, Any]) -> None:
    """The text lines of one MX's DANE evidence."""
    dane = host.get("dane")
    if not dane:
        return
    status = dane["dnssec"]
    print(
        f"          DNSSEC: MX {status['mx']}, addresses {status['addresses'] or '-'},"
        f" TLSA {status['tlsa'] or '-'}; DANE {dane['state']}: {dane['detail']}"
    )
    for record in dane["records"]:
        print(f"          TLSA {record['record']}" + ("" if record["usable"] else " (unusable)"))
    for probe in host["probes"]:
        check = probe.get("dane")
        if check and check.get("matched"):
            print(f"          {probe['ip']}: certificate matches {check['matched']}")
        elif check and check.get("result"):
            print(f"          {probe['ip']}: {check['result']}: {check['detail']}")
