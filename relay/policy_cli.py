"""`sts-relay policy check DOMAIN`: what MTA-STS says about a domain, live.

Looks up the TXT record, fetches and parses the policy exactly as delivery would (same
resolver, same trust store, same limits), shows the cached copy, and checks each MX host
of the domain against the policy's `mx` patterns. It changes nothing in the cache.
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any

from policy.discover import Found, NotFound, discover, lookup_addresses
from policy.fetch import Fetched, fetch_policy
from policy.match import mx_matches
from policy.model import Mode, Policy
from policy.webpki import client_context
from relay.app import make_resolver, open_policy_cache
from relay.config import Config
from relay.delivery.mx import DnsTempFail, MxList, NoSuchDomain, NullMx, resolve_mx


def _policy_dict(policy: Policy) -> dict[str, Any]:
    return {
        "mode": policy.mode.value,
        "mx": list(policy.mx),
        "max_age": policy.max_age,
        "text": policy.text,
    }


async def _txt(domain: str, cfg: Config, resolver: Any) -> dict[str, Any]:
    found = await discover(domain, resolver, cfg.dns.timeout)
    if isinstance(found, Found):
        return {"status": "found", "id": found.record.id}
    if isinstance(found, NotFound):
        return {"status": "not-found"}
    return {"status": "temporary-failure", "detail": found.detail}


async def _policy(domain: str, cfg: Config, resolver: Any) -> tuple[dict[str, Any], Policy | None]:
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


async def _mx(domain: str, cfg: Config, resolver: Any, policy: Policy | None) -> dict[str, Any]:
    found = await resolve_mx(domain, resolver, timeout=cfg.dns.timeout, rng=random.Random(0))  # noqa: S311 - display order only
    match found:
        case MxList():
            hosts = [
                {
                    "host": host,
                    "allowed": None if policy is None else mx_matches(host, policy.mx),
                }
                for host in found.hosts
            ]
            return {"status": "ok", "implicit": found.implicit, "hosts": hosts}
        case NullMx():
            return {"status": "null-mx", "hosts": []}
        case NoSuchDomain():
            return {"status": "no-such-domain", "hosts": []}
        case DnsTempFail():
            return {"status": "temporary-failure", "detail": found.detail, "hosts": []}


def _verdict(txt: dict[str, Any], policy: Policy | None, mx: dict[str, Any]) -> str:
    if policy is None:
        if txt["status"] == "found":
            return "policy published but not usable: mail goes out as without MTA-STS"
        return "no MTA-STS policy: opportunistic TLS"
    if policy.mode is Mode.NONE:
        return "policy mode none: opportunistic TLS"
    allowed = [h["host"] for h in mx["hosts"] if h["allowed"]]
    if not allowed:
        return f"{policy.mode.value}: no MX host matches the policy; enforce would defer all mail"
    return f"{policy.mode.value}: verified TLS required to {', '.join(allowed)}"


async def run_policy_check(cfg: Config, domain: str, as_json: bool) -> int:
    domain = domain.strip().rstrip(".").lower()
    resolver = make_resolver(tuple(cfg.dns.nameservers), cfg.dns.timeout)
    txt = await _txt(domain, cfg, resolver)
    policy_info, policy = (
        await _policy(domain, cfg, resolver) if txt["status"] == "found" else ({}, None)
    )
    cache = open_policy_cache(cfg)
    try:
        cached = cache.get(domain)
    finally:
        cache.close()
    mx = await _mx(domain, cfg, resolver, policy)
    report = {
        "domain": domain,
        "txt": txt,
        "policy": policy_info or None,
        "cached": None
        if cached is None
        else {"policy_id": cached.policy_id, **_policy_dict(cached.policy)},
        "mx": mx,
        "verdict": _verdict(txt, policy, mx),
    }
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_text(report)
    return 0 if policy_info.get("status", "ok") == "ok" else 1


def _print_text(report: dict[str, Any]) -> None:
    out = sys.stdout
    txt = report["txt"]
    print(f"domain:  {report['domain']}", file=out)
    print(f"TXT:     {txt['status']}" + (f" id={txt['id']}" if "id" in txt else ""), file=out)
    policy = report["policy"]
    if policy:
        if policy["status"] == "ok":
            print(f"policy:  mode={policy['mode']} max_age={policy['max_age']}", file=out)
            for pattern in policy["mx"]:
                print(f"         mx: {pattern}", file=out)
        else:
            print(f"policy:  {policy['result']}: {policy['detail']}", file=out)
    if report["cached"]:
        c = report["cached"]
        print(f"cached:  id={c['policy_id']} mode={c['mode']}", file=out)
    for host in report["mx"]["hosts"]:
        allowed = {None: "-", True: "allowed", False: "NOT in policy"}[host["allowed"]]
        print(f"MX:      {host['host']}  {allowed}", file=out)
    if report["mx"]["status"] != "ok":
        print(f"MX:      {report['mx']['status']}", file=out)
    print(f"verdict: {report['verdict']}", file=out)
