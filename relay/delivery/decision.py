"""The TLS decision of one delivery attempt: a value computed by one pure function.

`decide_tls` takes what the recipient domain published (its MTA-STS lookup), what the
operator configured for it (`tls.overrides`) and what the message asked (RFC 8689
`TLS-Required: No`), and returns a `TlsDecision`: how every session must secure itself,
which MX names it may use, which mechanism decided (`tls_policy` of the `delivery` event)
and why. The inputs are kept on the decision untouched, so events, metrics and TLS reports
see what was published beside what was decided. No I/O; nothing here knows sockets.

DANE (RFC 7672) is one more input: per-MX TLSA evidence with its DNSSEC status
(`dane.DaneEvidence`), judged host by host (`TlsDecision.for_mx`). Where a host has a secure
TLSA RRset, DANE decides for that host before MTA-STS or an override's patterns (RFC 8461
§2: MTA-STS never overrides a failing DANE validation, and never rescues one): usable
records → the chain must match one (`TlsRequirement.DANE`); only unusable records → TLS
without authentication, unless MTA-STS asks for more; a bogus or failed TLSA lookup → the
host is not used (`dnssec-invalid`), never a fallback to MTA-STS or cleartext. A message's
`TLS-Required: No` and an `opportunistic` override waive DANE as they waive MTA-STS
(RFC 8689 §5). Hosts without DANE evidence follow the domain-wide decision.

REQUIRETLS (RFC 8689 §4.2.1) is one more input, the message's own demand: a host may
receive such a message only when its name and certificate are authenticated by DANE
(usable TLSA records) or by an MTA-STS policy in `enforce` or `testing` mode (testing is
then applied as enforce); every other host is not used (`MxRule.requiretls_unmet`) and the
mail waits, to bounce with 5.7.30 at the end of its lifetime. Nothing relaxes it:
`TLS-Required: No` is ignored beside it (RFC 8689 §3), an `opportunistic` override does not
apply to it, and a `require-verified` override does not qualify a host (its names come from
the operator, while RFC 8689 §4.2.1 asks for an MX name proven by DNSSEC or MTA-STS). That
the host offers REQUIRETLS after STARTTLS is checked on the connection (`client`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from enum import StrEnum

from policy.match import is_valid_hostname, mx_matches
from policy.model import Mode, PolicyLookup, TlsRptResult
from relay.delivery.dane import DaneEvidence, DaneState, Tlsa
from relay.delivery.overrides import OverrideRule, TlsOverride
from relay.delivery.tls import TlsRequirement


class TlsPolicySource(StrEnum):
    """The mechanism that decided (`tls_policy` in the `delivery` event)."""

    DANE = "dane"  # the MX host's DNSSEC-secure TLSA records (RFC 7672)
    STS = "sts"  # the domain's MTA-STS policy (enforce or testing)
    OVERRIDE = "override"  # the operator's tls.overrides entry for the domain
    TLS_REQUIRED_NO = "tls-required-no"  # the message's TLS-Required: No (RFC 8689 §5)
    NONE = "none"  # nothing published applies: opportunistic STARTTLS


@dataclass(frozen=True, slots=True)
class MxRule:
    """How one MX host may be used under a decision (`TlsDecision.for_mx`).

    `refused`: the host may not receive the mail (never contacted), with the RFC 8460
    result type; `detail` says why. `tlsa`: under DANE, the usable records to match;
    `records`: the TLSA RRset as published (what TLS reports show, RFC 8460 §4.5).
    `requiretls_unmet`: the message demands REQUIRETLS and nothing authenticates this host
    (neither DANE nor MTA-STS): it is not contacted; no RFC 8460 failure of the domain's.
    `requiretls`: sessions must pass REQUIRETLS on (the host must offer it)."""

    requirement: TlsRequirement
    source: TlsPolicySource
    tlsa: tuple[Tlsa, ...] = ()
    records: tuple[Tlsa, ...] = ()
    refused: TlsRptResult | None = None
    detail: str | None = None
    requiretls: bool = False
    requiretls_unmet: str | None = None

    @property
    def dane(self) -> bool:
        return self.source is TlsPolicySource.DANE


@dataclass(frozen=True, slots=True)
class TlsDecision:
    """What one attempt requires of TLS, and the inputs it was computed from.

    `requirement`: how each session secures itself. `mx_patterns`: the MX names allowed to
    receive the mail (None: any); only enforced under VERIFIED. `blocked`: when set, the
    decision could not be made safely (our own store failed): nothing is attempted and every
    recipient waits, never a downgrade. `reason`: one line for logs.
    """

    requirement: TlsRequirement
    mx_patterns: tuple[str, ...] | None
    source: TlsPolicySource
    reason: str
    published: PolicyLookup
    override: OverrideRule | None = None
    tls_required_no: bool = False
    blocked: str | None = None
    dane: DaneEvidence | None = None  # None: DANE off (dns.dnssec) or not looked up
    requiretls: bool = False  # the message demands REQUIRETLS (RFC 8689)
    # Under REQUIRETLS, why no host qualifies by the domain-wide inputs ("no MTA-STS policy
    # in enforce or testing mode"); only DANE can still qualify a host. None otherwise.
    requiretls_unmet: str | None = None
    # `for_mx` by host: a decision never changes, and each host is asked several times
    # per attempt (the MX walk, the `delivery` events, the posture tally).
    _rules: dict[str, MxRule] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def dane_waived(self) -> bool:
        """`TLS-Required: No` or an `opportunistic` override set DANE aside (RFC 8689 §5);
        never for a REQUIRETLS message."""
        opportunistic = self.override is not None and (
            self.override.action is TlsOverride.OPPORTUNISTIC
        )
        return not self.requiretls and (self.tls_required_no or opportunistic)

    def for_mx(self, mx_host: str) -> MxRule:
        """The rule for one MX host: its own DANE evidence first (RFC 7672 §2.2, RFC 8461
        §2), else the domain-wide decision; under REQUIRETLS, only a host authenticated by
        DANE or MTA-STS (RFC 8689 §4.2.1)."""
        rule = self._rules.get(mx_host)
        if rule is None:
            rule = self._rules[mx_host] = self._rule_for(mx_host)
        return rule

    def _rule_for(self, mx_host: str) -> MxRule:
        evidence = None
        if self.dane is not None and not self.dane_waived:
            evidence = self.dane.host(mx_host)
        if evidence is not None:
            dane = TlsPolicySource.DANE
            match evidence.state:
                case DaneState.FAILED:
                    return MxRule(
                        TlsRequirement.DANE,
                        dane,
                        records=evidence.records,
                        refused=TlsRptResult.DNSSEC_INVALID,
                        detail=evidence.detail,
                    )
                case DaneState.USABLE:
                    return MxRule(
                        TlsRequirement.DANE,
                        dane,
                        evidence.usable,
                        evidence.records,
                        requiretls=self.requiretls,
                    )
                case DaneState.UNUSABLE if self.requiretls_unmet is not None:
                    # RFC 8689 §4.2.1: TLS without authentication does not do.
                    why = f"its TLSA records are all unusable ({self.requiretls_unmet})"
                    return MxRule(
                        TlsRequirement.ENCRYPTED,
                        dane,
                        records=evidence.records,
                        requiretls=True,
                        requiretls_unmet=why,
                    )
                case DaneState.UNUSABLE if self.requirement is not TlsRequirement.VERIFIED:
                    return MxRule(TlsRequirement.ENCRYPTED, dane, records=evidence.records)
                case _:
                    pass
        unmet = self.requiretls_unmet
        return MxRule(
            self.requirement,
            self.source,
            refused=self.refuses_mx(mx_host),
            requiretls=self.requiretls,
            requiretls_unmet=None if unmet is None else f"no DANE TLSA records ({unmet})",
        )

    def source_for(self, mx_host: str | None) -> TlsPolicySource:
        """What decided for `mx_host` (`tls_policy` of its `delivery` event)."""
        return self.source if mx_host is None else self.for_mx(mx_host).source

    @property
    def changed_by_request(self) -> bool:
        """An operator override or the message itself changed what was published."""
        return self.source in (TlsPolicySource.OVERRIDE, TlsPolicySource.TLS_REQUIRED_NO)

    def refuses_mx(self, mx_host: str) -> TlsRptResult | None:
        """Why this MX may not receive the mail under this decision (None: it may).

        RFC 8461 §4.1: the name as DNS gave it (before CNAME expansion, STS-83) must match
        a pattern, and be a valid LDH host name (STS-101)."""
        if self.requirement is not TlsRequirement.VERIFIED or self.mx_patterns is None:
            return None
        return _name_verdict(mx_host, self.mx_patterns)

    def published_verdict(self, mx_host: str) -> TlsRptResult | None:
        """The verdict of the policy the domain *published* on an MX name: what a TLS
        report counts (RFC 8460), whatever an override or the message decided."""
        policy = self.published.policy
        if policy is None or policy.mode is Mode.NONE:
            return None
        return _name_verdict(mx_host, policy.mx)

    @property
    def published_requires_validation(self) -> bool:
        """The published policy asks for a validated certificate (enforce or testing)."""
        policy = self.published.policy
        return policy is not None and policy.mode is not Mode.NONE


@functools.lru_cache(maxsize=4096)  # the same few hosts against the same policies
def _name_verdict(mx_host: str, patterns: tuple[str, ...]) -> TlsRptResult | None:
    host = mx_host.rstrip(".").lower()
    if not is_valid_hostname(host) or not mx_matches(host, patterns):
        return TlsRptResult.VALIDATION_FAILURE
    return None


def decide_tls(
    published: PolicyLookup,
    override: OverrideRule | None,
    *,
    tls_required_no: bool,
    dane: DaneEvidence | None = None,
    requiretls: bool = False,
) -> TlsDecision:
    """The TLS decision for one attempt (RFC 7672, RFC 8461 §5, RFC 8689, overrides).

    `dane` is the DANE evidence of the domain's MX hosts; it decides per host
    (`TlsDecision.for_mx`) over what the rest of the inputs decide for the domain.
    `requiretls`: the message was submitted with REQUIRETLS (RFC 8689 §4.2.1)."""
    if requiretls and not published.unavailable:
        decision = _decide_requiretls(published, override, tls_required_no=tls_required_no)
    else:
        decision = _decide_domain(published, override, tls_required_no=tls_required_no)
        if requiretls:  # _decide_domain leaves it False
            decision = replace(decision, requiretls=True)
    return decision if dane is None else replace(decision, dane=dane)


def _decide_requiretls(
    published: PolicyLookup, override: OverrideRule | None, *, tls_required_no: bool
) -> TlsDecision:
    """The domain-wide decision for a REQUIRETLS message (RFC 8689 §4.2.1): verified TLS to
    the MX hosts an MTA-STS policy in enforce or testing mode names (testing is applied as
    enforce); without one, no host qualifies by the domain's inputs (DANE may still
    qualify a host, `TlsDecision.for_mx`). `TLS-Required: No` and the overrides do not
    weaken it; an override is kept on the decision for the record."""
    policy = published.policy
    ignored = " (TLS-Required: No ignored)" if tls_required_no else ""
    if policy is not None and policy.mode in (Mode.ENFORCE, Mode.TESTING):
        mode = policy.mode.value
        applied = " applied as enforce" if policy.mode is Mode.TESTING else ""
        return TlsDecision(
            TlsRequirement.VERIFIED,
            policy.mx,
            TlsPolicySource.STS,
            f"REQUIRETLS: policy mode {mode}{applied}{ignored}",
            published,
            override,
            tls_required_no,
            requiretls=True,
        )
    unmet = "no MTA-STS policy in enforce or testing mode"
    if policy is not None:
        unmet += f": policy mode {policy.mode.value}"
    return TlsDecision(
        TlsRequirement.VERIFIED,
        None,
        TlsPolicySource.NONE,
        f"REQUIRETLS: {unmet}; only DANE can authenticate an MX{ignored}",
        published,
        override,
        tls_required_no,
        requiretls=True,
        requiretls_unmet=unmet,
    )


def _decide_domain(
    published: PolicyLookup,
    override: OverrideRule | None,
    *,
    tls_required_no: bool,
) -> TlsDecision:
    """The domain-wide decision (RFC 8461 §5, RFC 8689 §5, the operator's overrides).

    Precedence, first that applies:
    1. The policy cache could not be read: blocked (defer; never fail open).
    2. `require-verified` override, unless the domain publishes enforce itself: verified TLS
       to MX hosts matching the override's own patterns (never names from unsigned DNS).
    3. An enforce policy with `opportunistic` override, or with `TLS-Required: No`: deliver
       as under `testing` (verification tried and reported against the published policy,
       failures do not stop delivery).
    4. enforce: verified TLS to MX hosts matching the policy; testing: try, report, deliver.
    5. Otherwise opportunistic STARTTLS.
    """
    policy = published.policy
    mode = policy.mode if policy is not None else None
    was = f"policy mode {mode.value}" if mode is not None else "no MTA-STS policy"
    if published.unavailable:
        why = published.detail or "policy cache unreadable"
        return TlsDecision(
            TlsRequirement.VERIFIED,
            (),
            TlsPolicySource.STS,
            f"{why}: the policy in force is unknown, mail waits",
            published,
            override,
            tls_required_no,
            blocked=why,
        )
    action = override.action if override is not None else None
    if (
        override is not None
        and override.action is TlsOverride.REQUIRE_VERIFIED
        and mode is not Mode.ENFORCE
    ):
        return TlsDecision(
            TlsRequirement.VERIFIED,
            override.mx,
            TlsPolicySource.OVERRIDE,
            f"{was} overridden by tls.overrides: require-verified",
            published,
            override,
            tls_required_no,
        )
    if mode is Mode.ENFORCE and (action is TlsOverride.OPPORTUNISTIC or tls_required_no):
        source = (
            TlsPolicySource.OVERRIDE
            if action is TlsOverride.OPPORTUNISTIC
            else TlsPolicySource.TLS_REQUIRED_NO
        )
        why = (
            "overridden by tls.overrides: opportunistic"
            if source is TlsPolicySource.OVERRIDE
            else "ignored: the message carries TLS-Required: No"
        )
        return TlsDecision(
            TlsRequirement.REPORT,
            None,
            source,
            f"policy mode enforce {why}",
            published,
            override,
            tls_required_no,
        )
    if policy is not None and mode is Mode.ENFORCE:
        return TlsDecision(
            TlsRequirement.VERIFIED,
            policy.mx,
            TlsPolicySource.STS,
            "policy mode enforce",
            published,
            override,
            tls_required_no,
        )
    if mode is Mode.TESTING:
        return TlsDecision(
            TlsRequirement.REPORT,
            None,
            TlsPolicySource.STS,
            "policy mode testing",
            published,
            override,
            tls_required_no,
        )
    return TlsDecision(
        TlsRequirement.OPPORTUNISTIC,
        None,
        TlsPolicySource.NONE,
        was,
        published,
        override,
        tls_required_no,
    )
