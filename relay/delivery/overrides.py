"""Per-domain TLS overrides set by the operator (`tls.overrides`), applied to policy lookups.

Owns what each override means and the `tls_override` event logged whenever one changes
the TLS decision of an attempt. It transforms the `PolicyLookup` an attempt receives and
knows nothing of sessions, the queue or the cache (the cached policy is never touched).

- `require-verified`: the domain is treated as if it published an `enforce` policy listing
  its own MX hosts: STARTTLS, a certificate that chains to a trusted root, is in date and
  names the MX host; otherwise the mail waits (like Postfix's `verify` level, without DANE).
- `opportunistic`: the escape hatch for a receiver whose TLS is broken while its policy says
  `enforce`: the attempt goes out with opportunistic STARTTLS as if there were no policy.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from enum import StrEnum

import dns.asyncresolver

from policy.model import Mode, Policy, PolicyLookup
from relay.delivery.mx import MxList, resolve_mx
from relay.events import EventLog

OVERRIDE_POLICY_ID = "override"


class TlsOverride(StrEnum):
    REQUIRE_VERIFIED = "require-verified"
    OPPORTUNISTIC = "opportunistic"


def parse_overrides(entries: Sequence[str]) -> dict[str, TlsOverride]:
    """{"domain": TlsOverride} from config entries "domain=action" (validated by config)."""
    out: dict[str, TlsOverride] = {}
    for entry in entries:
        domain, _, action = entry.partition("=")
        out[domain.strip().lower().removesuffix(".")] = TlsOverride(action.strip().lower())
    return out


class TlsOverrides:
    """The overrides in force; `replace()` swaps them (SIGHUP) without a restart."""

    def __init__(
        self,
        entries: Sequence[str],
        *,
        resolver: dns.asyncresolver.Resolver,
        dns_timeout: float,
        events: EventLog,
    ) -> None:
        self._by_domain = parse_overrides(entries)
        self._resolver = resolver
        self._dns_timeout = dns_timeout
        self._events = events
        self._rng = random.Random()  # noqa: S311 - MX order is irrelevant here

    def replace(self, entries: Sequence[str]) -> None:
        self._by_domain = parse_overrides(entries)

    def get(self, domain: str) -> TlsOverride | None:
        return self._by_domain.get(domain.lower().removesuffix("."))

    async def apply(self, queue_id: str | None, domain: str, lookup: PolicyLookup) -> PolicyLookup:
        """The lookup this attempt should use; logs `tls_override` when it differs."""
        override = self.get(domain)
        mode = lookup.policy.mode if lookup.policy is not None else None
        if override is TlsOverride.OPPORTUNISTIC and mode is Mode.ENFORCE:
            self._log(queue_id, domain, override, "opportunistic", "policy mode enforce")
            return replace(lookup, policy=None, policy_id=None, source=OVERRIDE_POLICY_ID)
        if override is TlsOverride.REQUIRE_VERIFIED and mode is not Mode.ENFORCE:
            hosts = await self.mx_hosts(domain)
            policy = Policy(mode=Mode.ENFORCE, mx=hosts, max_age=0, text="")
            before = f"policy mode {mode.value}" if mode is not None else "no MTA-STS policy"
            self._log(queue_id, domain, override, "verified", before)
            return PolicyLookup(domain, policy, OVERRIDE_POLICY_ID, OVERRIDE_POLICY_ID)
        return lookup

    async def mx_hosts(self, domain: str) -> tuple[str, ...]:
        """The domain's MX host names (its own name for an implicit MX); () on failure,
        in which case the attempt's own MX lookup reports the problem."""
        found = await resolve_mx(domain, self._resolver, timeout=self._dns_timeout, rng=self._rng)
        if isinstance(found, MxList):
            return tuple(h.rstrip(".").lower() for h in found.hosts)
        return ()

    def _log(
        self, queue_id: str | None, domain: str, override: TlsOverride, decision: str, was: str
    ) -> None:
        self._events.tls_override(
            queue_id=queue_id,
            domain=domain,
            mx=None,
            override=override.value,
            decision=decision,
            reason=f"{was} overridden by tls.overrides",
        )
