"""The TLS decision of one delivery attempt: a value computed by one pure function.

`decide_tls` takes what the recipient domain published (its MTA-STS lookup), what the
operator configured for it (`tls.overrides`) and what the message asked (RFC 8689
`TLS-Required: No`), and returns a `TlsDecision`: how every session must secure itself,
which MX names it may use, which mechanism decided (`tls_policy` of the `delivery` event)
and why. The inputs are kept on the decision untouched, so events, metrics and TLS reports
see what was published beside what was decided. No I/O; nothing here knows sockets.

DANE (RFC 7672) will be one more input: per-MX TLSA evidence that, where usable, decides
before MTA-STS (RFC 8461 §2: MTA-STS never overrides a failing DANE validation).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from policy.match import is_valid_hostname, mx_matches
from policy.model import Mode, PolicyLookup, TlsRptResult
from relay.delivery.overrides import OverrideRule, TlsOverride
from relay.delivery.tls import TlsRequirement


class TlsPolicySource(StrEnum):
    """The mechanism that decided (`tls_policy` in the `delivery` event)."""

    DANE = "dane"  # reserved: DANE TLSA records (RFC 7672)
    STS = "sts"  # the domain's MTA-STS policy (enforce or testing)
    OVERRIDE = "override"  # the operator's tls.overrides entry for the domain
    TLS_REQUIRED_NO = "tls-required-no"  # the message's TLS-Required: No (RFC 8689 §5)
    NONE = "none"  # nothing published applies: opportunistic STARTTLS


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
) -> TlsDecision:
    """The TLS decision for one attempt (RFC 8461 §5, RFC 8689 §5, the operator's overrides).

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
