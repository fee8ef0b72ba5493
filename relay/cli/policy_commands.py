"""`sts-relay policy check|show|forget DOMAIN`: the operator's MTA-STS diagnostics.

`check` answers "will mail to this domain go out securely?": it looks up the TXT record,
fetches and parses the policy exactly as delivery would (same resolver, trust store and
limits), applies the operator's `tls.overrides`, then for each MX shows whether the policy
allows it, its addresses, and for each address the connection, STARTTLS, the certificate
chain, the name match and the TLS version (a probe that sends no mail), and a verdict.
It changes nothing in the cache (and creates no store: without one, no cached policy is
shown). `show` prints the cached policy; `forget` removes it and logs `policy_forgotten`;
`history` shows the policy changes the cache recorded (policy/cache.py keeps the newest
HISTORY_PER_DOMAIN per domain, none older than HISTORY_DAYS).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dns.asyncresolver

from policy.cache import HISTORY_DAYS, HISTORY_PER_DOMAIN, CachedPolicy, PolicyChange
from policy.discover import Found, NotFound, discover, lookup_addresses
from policy.fetch import Fetched, fetch_policy
from policy.match import mx_matches
from policy.model import Policy, PolicyLookup
from policy.webpki import client_context, unverified_context
from relay.app import make_resolver, open_policy_cache
from relay.cli import dane_report
from relay.cli.output import fail, print_json
from relay.config import Config
from relay.delivery.client import Dialer
from relay.delivery.decision import TlsDecision, TlsPolicySource, decide_tls
from relay.delivery.mx import (
    DnsTempFail,
    MxList,
    NoSuchDomain,
    NullMx,
    resolve_addresses,
    resolve_mx,
)
from relay.delivery.overrides import TlsOverrides
from relay.delivery.probe import Probe, probe_mx
from relay.delivery.tls import TlsRequirement
from relay.events import EventLog
from relay.state import NoState, existing_store

_MAX_ADDRESSES_PER_MX = 4  # a diagnosis, not a scan


def _policy_dict(policy: Policy) -> dict[str, Any]:
    return {
        "mode": policy.mode.value,
        "mx": list(policy.mx),
        "max_age": policy.max_age,
        "text": policy.text,
    }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")


def cached_dict(entry: CachedPolicy) -> dict[str, Any]:
    return {
        "domain": entry.domain,
        "policy_id": entry.policy_id,
        **_policy_dict(entry.policy),
        "fetched_at": _iso(entry.fetched_at),
        "expires_at": _iso(entry.expires_at),
        "last_used_at": _iso(entry.last_used_at),
    }


async def _txt(domain: str, cfg: Config, resolver: dns.asyncresolver.Resolver) -> dict[str, Any]:
    found = await discover(domain, resolver, cfg.dns.timeout)
    if isinstance(found, Found):
        return {"status": "found", "id": found.record.id}
    if isinstance(found, NotFound):
        return {"status": "not-found"}
    return {"status": "temporary-failure", "detail": found.detail}


async def _policy(
    domain: str, cfg: Config, resolver: dns.asyncresolver.Resolver
) -> tuple[dict[str, Any], Policy | None]:
    host = f"mta-sts.{domain}"
    addresses = await lookup_addresses(host, resolver, cfg.dns.timeout)
    if not addresses:
        detail = f"{host} has no address"
        return {"status": "error", "result": "sts-policy-fetch-error", "detail": detail}, None
    fetched = await fetch_policy(
        domain,
        addresses=addresses,
        ssl_context=client_context(cfg.tls.ca_file),
        port=cfg.policy.https_port,
        deadline=cfg.policy.fetch_deadline,
    )
    if isinstance(fetched, Fetched):
        return {"status": "ok", **_policy_dict(fetched.policy)}, fetched.policy
    return {"status": "error", "result": fetched.result.value, "detail": fetched.detail}, None


@dataclass(frozen=True, slots=True)
class _Rule:
    """What delivery will demand of this domain's MX hosts."""

    requirement: str  # "verified" | "report" | "opportunistic"
    check_names: bool  # MX names must match the policy's patterns
    why: str


def _rule(decision: TlsDecision) -> _Rule:
    """The delivery side's own decision (relay/delivery/decision.py), as this report shows it."""
    requirement = decision.requirement
    if decision.blocked is not None:
        return _Rule("verified", True, decision.blocked)
    check_names = requirement is TlsRequirement.VERIFIED and decision.mx_patterns is not None
    why = decision.reason
    if decision.changed_by_request and requirement is TlsRequirement.REPORT:
        # Verification is still tried (and reported), but never stops delivery.
        return _Rule("opportunistic", False, why)
    if decision.source is TlsPolicySource.STS:
        why = f"MTA-STS {why}"
    elif decision.source is TlsPolicySource.NONE:
        why = "no MTA-STS policy in force"
    return _Rule(requirement.value, check_names, why)


def _patterns(decision: TlsDecision) -> tuple[str, ...] | None:
    """The MX patterns each host is shown against: the decision's, else the policy's."""
    if decision.mx_patterns is not None:
        return decision.mx_patterns
    policy = decision.published.policy
    return policy.mx if policy is not None else None


def _host_rule(rule: _Rule, decision: TlsDecision, host: str) -> _Rule:
    """The domain's rule, unless DANE decides for `host`: then probe it whatever the
    MTA-STS names say (its verdict comes from relay/cli/dane_report.py)."""
    mx_rule = decision.for_mx(host)
    if not mx_rule.dane:
        return rule
    return _Rule(mx_rule.requirement.value, False, "DANE (RFC 7672)")


def _host_verdict(rule: _Rule, allowed: bool | None, probes: list[Probe]) -> tuple[bool, str]:
    """(usable, why) for one MX under `rule`."""
    verified = [p for p in probes if p.verified]
    reached = [p for p in probes if p.connected]
    if rule.requirement == "verified":
        if rule.check_names and not allowed:
            return False, "not permitted by the policy: never contacted"
        if verified:
            return True, f"verified TLS ({verified[0].tls_version})"
        failure = next((p for p in probes if p.result), None)
        if failure is not None:
            return False, f"refused: {failure.result}: {failure.detail}"
        return False, "unreachable: mail would wait in the queue"
    if not reached:
        return False, "unreachable"
    if verified:
        return True, f"verified TLS ({verified[0].tls_version})"
    tls = next((p.tls_version for p in reached if p.tls_version), None)
    what = f"unverified TLS ({tls})" if tls else "plaintext"
    if rule.requirement == "report":
        result = next((p.result for p in reached if p.result), None)
        return True, f"{what}; enforce would refuse ({result or 'MX not in policy'})"
    return True, what


async def _mx_hosts(
    domain: str,
    cfg: Config,
    resolver: dns.asyncresolver.Resolver,
    patterns: tuple[str, ...] | None,
) -> dict[str, Any]:
    found = await resolve_mx(domain, resolver, timeout=cfg.dns.timeout, rng=random.Random(0))  # noqa: S311 - display order only
    match found:
        case MxList():
            hosts = [
                {"host": h, "allowed": None if patterns is None else mx_matches(h, patterns)}
                for h in found.hosts
            ]
            return {"status": "ok", "implicit": found.implicit, "hosts": hosts}
        case NullMx():
            return {"status": "null-mx", "hosts": []}
        case NoSuchDomain():
            return {"status": "no-such-domain", "hosts": []}
        case DnsTempFail():
            return {"status": "temporary-failure", "detail": found.detail, "hosts": []}


async def _probe_host(
    host: dict[str, Any], rule: _Rule, cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    """Fill in `host` with addresses, probes and a verdict."""
    host["addresses"], probes = [], []
    if not (rule.requirement == "verified" and rule.check_names and not host["allowed"]):
        addresses = await resolve_addresses(
            host["host"],
            resolver,
            timeout=cfg.dns.timeout,
            allow_loopback=cfg.delivery.allow_loopback_mx,
        )
        if isinstance(addresses, list):
            host["addresses"] = addresses
            settings = _probe_settings(cfg)
            for ip in addresses[:_MAX_ADDRESSES_PER_MX]:
                probes.append(await probe_mx(ip, host["host"], settings))
        else:
            host["address_error"] = addresses.detail
    host["probes"] = [p.as_dict() for p in probes]
    host["_probes"] = probes  # for dane_report.annotate, which removes it
    host["usable"], host["verdict"] = _host_verdict(rule, host["allowed"], probes)


def _probe_settings(cfg: Config) -> Dialer:
    return Dialer(
        port=cfg.delivery.port,
        helo=cfg.delivery.hostname,
        verified_ctx=client_context(cfg.tls.ca_file),
        unverified_ctx=unverified_context(),
        connect_timeout=cfg.delivery.connect_timeout,
        command_timeout=min(cfg.delivery.command_timeout, 30.0),
    )


def _verdict(rule: _Rule, mx: dict[str, Any]) -> tuple[bool, bool, str]:
    """(deliverable, secure, sentence) for the whole domain."""
    usable = [h for h in mx["hosts"] if h["usable"]]
    if mx["status"] != "ok":
        return False, False, f"no: MX lookup: {mx['status']}"
    if not usable:
        if rule.requirement == "verified":
            return False, False, f"no: {rule.why}, and no MX passes; mail would wait in the queue"
        return False, False, "no: no MX host could be reached"
    first = usable[0]
    secure = bool(first.get("secure", rule.requirement == "verified"))
    how = "securely" if secure else "without authenticated TLS"
    return (
        True,
        secure,
        f"yes, {how}: {rule.why}; first usable MX {first['host']}: {first['verdict']}",
    )


async def run_policy_check(cfg: Config, domain: str, as_json: bool) -> int:
    domain = domain.strip().rstrip(".").lower()
    resolver = make_resolver(tuple(cfg.dns.nameservers), cfg.dns.timeout)
    dnssec, dane = dane_report.setup(cfg, resolver)  # before any lookup: DO on every query
    txt = await _txt(domain, cfg, resolver)
    policy_info, policy = (
        await _policy(domain, cfg, resolver) if txt["status"] == "found" else ({}, None)
    )
    cached = None
    try:
        if not cfg.state.url:
            existing_store(cfg.state.path)
    except NoState as exc:
        print(f"sts-relay: {exc}: no cached policy to show", file=sys.stderr)
    else:
        cache = open_policy_cache(cfg)
        try:
            cached = cache.get(domain)
        finally:
            cache.close()
    override = TlsOverrides(cfg.tls.overrides).get(domain)
    published = PolicyLookup(
        domain, policy, txt.get("id") if policy else None, "fetched" if policy else "none"
    )
    decision = decide_tls(published, override, tls_required_no=False)
    rule = _rule(decision)
    mx = await _mx_hosts(domain, cfg, resolver, _patterns(decision))
    evidence = await dane_report.evidence(dane, domain, mx)
    if evidence is not None:  # RFC 7672: each MX host is judged by its own TLSA records
        decision = decide_tls(published, override, tls_required_no=False, dane=evidence)
    for host in mx["hosts"]:
        await _probe_host(host, _host_rule(rule, decision, host["host"]), cfg, resolver)
        dane_report.annotate(host, decision, evidence)
    deliverable, secure, verdict = _verdict(rule, mx)
    report = {
        "domain": domain,
        "txt": txt,
        "policy": policy_info or None,
        "cached": None if cached is None else cached_dict(cached),
        "override": override.action.value if override else None,
        "override_match": list(override.mx) if override and override.mx else None,
        "requirement": rule.requirement,
        "dnssec": dnssec.summary,
        "mx": mx,
        "deliverable": deliverable,
        "secure": secure,
        "verdict": verdict,
    }
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_check(report)
    return 0 if deliverable and policy_info.get("status", "ok") == "ok" else 1


def _print_check(report: dict[str, Any]) -> None:
    txt = report["txt"]
    print(f"domain:   {report['domain']}")
    print(f"TXT:      {txt['status']}" + (f" id={txt['id']}" if "id" in txt else ""))
    policy = report["policy"]
    if policy and policy["status"] == "ok":
        print(f"policy:   mode={policy['mode']} max_age={policy['max_age']}")
        for pattern in policy["mx"]:
            print(f"          mx: {pattern}")
    elif policy:
        print(f"policy:   {policy['result']}: {policy['detail']}")
    if report["cached"]:
        c = report["cached"]
        print(f"cached:   id={c['policy_id']} mode={c['mode']} expires={c['expires_at']}")
    if report["override"]:
        match = report["override_match"]
        print(f"override: {report['override']}" + (f" match={':'.join(match)}" if match else ""))
    print(f"requires: {report['requirement']} TLS")
    if report["mx"]["status"] != "ok":
        print(f"MX:       {report['mx']['status']}")
    for host in report["mx"]["hosts"]:
        allowed = {None: "", True: " (in policy)", False: " (NOT in policy)"}[host["allowed"]]
        print(f"MX:       {host['host']}{allowed}: {host['verdict']}")
        for p in host["probes"]:
            print(
                f"          {p['ip']}: connect {p['connect']}, STARTTLS {_yn(p['starttls'])},"
                f" TLS {p['tls_version'] or '-'}, chain {p['chain']}, name {p['name']}"
                + (f" ({p['detail']})" if p["detail"] else "")
            )
        dane_report.print_host(host)
    print(f"verdict:  {report['verdict']}")


def _yn(value: bool | None) -> str:
    return {None: "-", True: "offered", False: "not offered"}[value]


async def run_policy_command(cfg: Config, action: str, domain: str, as_json: bool) -> int:
    """`policy check|show|forget|history DOMAIN`; exit 1 when the answer is no (none
    cached, ...). Every command but check needs an existing store (the caller checks)."""
    if action == "check":
        return await run_policy_check(cfg, domain, as_json)
    domain = domain.strip().rstrip(".").lower()
    cache = open_policy_cache(cfg)
    try:
        if action == "history":
            return _history(domain, cache.history(domain), as_json)
        entry = cache.get(domain)
        if action == "forget" and entry is not None:
            cache.forget(domain)
            events = EventLog(sys.stderr, fmt=cfg.log.format, level=cfg.log.level)
            events.policy_forgotten(domain=domain, policy_id=entry.policy_id)
    finally:
        cache.close()
    if entry is None:
        return fail(f"no cached policy for {domain}", as_json=as_json, domain=domain)
    if as_json:
        print(json.dumps({"forgotten": action == "forget", **cached_dict(entry)}, indent=2))
    elif action == "forget":
        print(f"forgot the cached policy of {domain} (id {entry.policy_id})")
    else:
        for key, value in cached_dict(entry).items():
            if key != "text":
                shown = ", ".join(value) if isinstance(value, list) else value
                print(f"{key + ':':<14}{shown}")
    return 0


HISTORY_KEPT = (
    f"the newest {HISTORY_PER_DOMAIN} changes per domain, none older than {HISTORY_DAYS} days"
)


def _version(policy_id: str | None, policy: Policy | None) -> dict[str, Any] | None:
    if policy is None:
        return None
    return {
        "policy_id": policy_id,
        "mode": policy.mode.value,
        "mx": list(policy.mx),
        "max_age": policy.max_age,
    }


def change_dict(change: PolicyChange) -> dict[str, Any]:
    return {
        "changed_at": _iso(change.changed_at),
        "changed": list(change.changed) if change.old is not None else None,
        "old": _version(change.old_id, change.old),
        "new": _version(change.new_id, change.new),
    }


def _history(domain: str, changes: list[PolicyChange], as_json: bool) -> int:
    """`policy history DOMAIN`: oldest first; exit 1 when nothing was ever recorded."""
    if not changes:
        return fail(
            f"no policy recorded for {domain}",
            as_json=as_json,
            domain=domain,
            kept=HISTORY_KEPT,
            changes=[],
        )
    if as_json:
        print_json(
            {"domain": domain, "kept": HISTORY_KEPT, "changes": list(map(change_dict, changes))}
        )
        return 0
    for change in changes:
        new = change.new
        now = (
            f"id={change.new_id} mode={new.mode.value} max_age={new.max_age} mx={','.join(new.mx)}"
        )
        if change.old is None:
            print(f"{_iso(change.changed_at)}  first seen: {now}")
            continue
        old = change.old
        before = (
            f"id={change.old_id} mode={old.mode.value} max_age={old.max_age} mx={','.join(old.mx)}"
        )
        print(f"{_iso(change.changed_at)}  changed {', '.join(change.changed)}")
        print(f"    was: {before}")
        print(f"    now: {now}")
    print(f"-- kept: {HISTORY_KEPT}", file=sys.stderr)
    return 0
