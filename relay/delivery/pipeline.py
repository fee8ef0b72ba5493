"""One lease's way through delivery: MX lookup, policy, TLS decision, attempt, last chance.

Owns the order of the steps for one (message, domain) lease and nothing that outlives it:
it looks up the MX hosts, the domain's MTA-STS policy and, when DANE is on (`dns.dnssec`),
the DANE evidence of its MX hosts (`dane.DaneLookup`: DNSSEC status, TLSA records, looked
up for all hosts at once before the walk), computes the TLS decision
(`decision.decide_tls`, pure), lets `attempt` talk to the MX hosts, and, when the message's
lifetime is over, checks for a newer policy before turning deferrals into bounces (RFC 8461
§5.1; a REQUIRETLS message that no MX could take bounces with 5.7.30, RFC 8689). It
returns the outcomes as a value; it never writes to the queue (the scheduler records,
`bounce` writes DSNs) and it never decides what a lease may do in time (the scheduler's
deadline bounds it).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import dns.asyncresolver

from mailqueue.model import Lease
from policy.model import PolicyLookup
from policy.resolver import PolicyResolver
from relay.delivery.attempt import AttemptSettings, MxTlsResult, attempt_domain, is_tls_refusal
from relay.delivery.dane import DaneEvidence, DaneLookup
from relay.delivery.decision import TlsDecision, TlsPolicySource, decide_tls
from relay.delivery.envelope import Envelope
from relay.delivery.mx import DnsTempFail, MxList, NoSuchDomain, NullMx, resolve_mx
from relay.delivery.outcome import Bounced, Deferred, Outcome
from relay.delivery.overrides import OverrideRule
from relay.delivery.pool import ConnectionPool
from relay.delivery.tls import TlsRequirement, tls_required_no
from relay.events import EventLog

# (domain, published lookup, MX TLS results, message) after each attempt: TLSRPT counting
# (relay/reporting.py). The lookup is what the domain published, never what was decided.
TlsResultHook = Callable[[str, PolicyLookup, Sequence[MxTlsResult], bytes], None]


@dataclass(frozen=True, slots=True)
class LeaseResult:
    """What the attempt of one lease came to: one outcome per leased recipient, and the
    TLS decision in force (with its inputs) for the `delivery` events."""

    outcomes: dict[str, Outcome]
    decision: TlsDecision | None  # None when no decision was reached (cut off, errors, held)
    held: bool = False  # not tried: the domain is held as unreachable (holds.py)


class Pipeline:
    """Runs the attempt of one lease; shared by every lease of one scheduler."""

    def __init__(
        self,
        *,
        policies: PolicyResolver,
        resolver: dns.asyncresolver.Resolver,
        attempt_settings: AttemptSettings,
        pool: ConnectionPool,
        events: EventLog,
        overrides: Callable[[str], OverrideRule | None] = lambda _domain: None,
        tls_hook: TlsResultHook | None = None,
        rng: random.Random | None = None,
        dane: DaneLookup | None = None,
    ) -> None:
        self._policies = policies
        self._resolver = resolver
        self._attempt = attempt_settings
        self._pool = pool
        self._events = events
        self._overrides = overrides
        self._tls_hook = tls_hook
        self._rng = rng or random.Random()  # noqa: S311 - MX shuffling, not security
        self._dane = dane  # None: DANE off (dns.dnssec, relay/delivery/dnssec.py)

    async def run(self, lease: Lease, data: bytes, *, expired: bool) -> LeaseResult:
        """Attempt `lease` once (and once more after a §5.1 re-check when `expired`)."""
        addresses = [r.address for r in lease.recipients]
        mx = await resolve_mx(
            lease.domain, self._resolver, timeout=self._attempt.dns_timeout, rng=self._rng
        )
        published = await self._policy_for(lease.domain, mx)
        dane = await self._dane_for(lease.domain, mx)
        decision = self._decide(lease, data, published, dane)
        outcomes = await self._attempt_once(lease, data, addresses, decision, mx)
        if expired and any(isinstance(o, Deferred) for o in outcomes.values()):
            decision, outcomes = await self._last_chance(lease, data, decision, outcomes)
            outcomes = {
                address: expire_outcome(o, lease.requiretls) for address, o in outcomes.items()
            }
        return LeaseResult(outcomes, decision)

    async def _policy_for(
        self, domain: str, mx: MxList | NullMx | NoSuchDomain | DnsTempFail
    ) -> PolicyLookup:
        """The MTA-STS policy, looked up only when DNS has not already settled the fate of
        the domain: a null MX (RFC 7505 §3, NMX-01) or a domain that does not exist bounces
        without any policy work (no TXT query, no fetch, no TLS)."""
        if isinstance(mx, NullMx | NoSuchDomain):
            return PolicyLookup(domain=domain, policy=None, policy_id=None, source="none")
        return await self._policies.resolve(domain)

    async def _dane_for(
        self, domain: str, mx: MxList | NullMx | NoSuchDomain | DnsTempFail
    ) -> DaneEvidence | None:
        """RFC 7672 §2.2: the DANE evidence of every MX host (DNSSEC status of the MX, address
        and TLSA answers), or None when DANE is off or DNS already decided."""
        if self._dane is None or not isinstance(mx, MxList):
            return None
        return await self._dane.gather(domain, mx)

    def _decide(
        self,
        lease: Lease,
        data: bytes,
        published: PolicyLookup,
        dane: DaneEvidence | None = None,
    ) -> TlsDecision:
        decision = decide_tls(
            published,
            self._overrides(lease.domain),
            tls_required_no=tls_required_no(data),
            dane=dane,
            requiretls=lease.requiretls,
        )
        if decision.changed_by_request:
            rule = decision.override
            relaxed = decision.requirement is not TlsRequirement.VERIFIED
            self._events.tls_override(
                queue_id=lease.queue_id,
                domain=lease.domain,
                mx=None,
                override=rule.action.value
                if rule is not None and decision.source is TlsPolicySource.OVERRIDE
                else decision.source.value,
                decision="opportunistic" if relaxed else "verified",
                reason=decision.reason,
            )
        return decision

    async def _attempt_once(
        self,
        lease: Lease,
        data: bytes,
        addresses: list[str],
        decision: TlsDecision,
        mx: MxList | NullMx | NoSuchDomain | DnsTempFail | None = None,
    ) -> dict[str, Outcome]:
        tried: list[MxTlsResult] = []
        outcomes = await attempt_domain(
            lease.domain,
            Envelope(lease.sender, addresses, data, lease.dsn, requiretls=lease.requiretls),
            decision=decision,
            settings=self._attempt,
            resolver=self._resolver,
            rng=self._rng,
            pool=self._pool,
            mx=mx,
            sessions=tried,
        )
        if self._tls_hook is not None:  # RFC 8460: every MX conversation; in memory, no I/O
            try:
                self._tls_hook(lease.domain, decision.published, tried, data)
            except Exception as exc:  # noqa: BLE001 - counting must never lose outcomes
                self._events.worker_error(
                    queue_id=lease.queue_id, domain=lease.domain, error=f"tlsrpt: {exc!r}"
                )
        return outcomes

    async def _last_chance(
        self,
        lease: Lease,
        data: bytes,
        decision: TlsDecision,
        outcomes: dict[str, Outcome],
    ) -> tuple[TlsDecision, dict[str, Outcome]]:
        """The lifetime is over: before bouncing, look for a newer policy (RFC 8461 §5.1)."""
        fresh = await self._policies.recheck(lease.domain)
        before = decision.published
        if fresh.policy_id == before.policy_id and fresh.policy == before.policy:
            return decision, outcomes
        deferred = [a for a, o in outcomes.items() if isinstance(o, Deferred)]
        decision = self._decide(lease, data, fresh, decision.dane)
        retried = await self._attempt_once(lease, data, deferred, decision)
        return decision, {**outcomes, **retried}


def expire_outcome(outcome: Outcome, requiretls: bool = False) -> Outcome:
    """A deferral at the end of the lifetime becomes a bounce (RFC 3463 4.4.7); for a
    REQUIRETLS message that waited because no MX met its TLS demands (not authenticated,
    TLS failed, REQUIRETLS not offered), RFC 8689's 5.7.30 "REQUIRETLS support required"."""
    if not isinstance(outcome, Deferred):
        return outcome
    last = outcome.reason
    text = f"delivery time expired; last error: {last.text}"
    if requiretls and is_tls_refusal(last):
        text = f"REQUIRETLS support required: {text}"
        return Bounced(replace(last, text=text, status="5.7.30"))
    return Bounced(replace(last, text=text, status="4.4.7"))
