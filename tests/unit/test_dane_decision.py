"""The TLS decision with DANE as one more input (relay/delivery/decision.py): per MX host,
DANE evidence first (RFC 7672 §2.2, RFC 8461 §2), else the domain-wide decision."""

from __future__ import annotations

from policy.model import Mode, Policy, PolicyLookup, TlsRptResult
from relay.delivery.dane import DaneEvidence, DaneState, HostDane, Tlsa
from relay.delivery.decision import TlsPolicySource, decide_tls
from relay.delivery.dnssec import Security
from relay.delivery.overrides import OverrideRule, TlsOverride
from relay.delivery.tls import TlsRequirement

EE = Tlsa(3, 1, 1, b"\x01" * 32)
PKIX = Tlsa(1, 1, 1, b"\x01" * 32)


def _enforce(domain: str = "d.test") -> PolicyLookup:
    policy = Policy(Mode.ENFORCE, ("mx1.d.test",), 86400, "(test)")
    return PolicyLookup(domain, policy, "1", "cached")


def _none(domain: str = "d.test") -> PolicyLookup:
    return PolicyLookup(domain, None, None, "none")


def _evidence(*hosts: HostDane) -> DaneEvidence:
    return DaneEvidence("d.test", Security.SECURE, {h.host: h for h in hosts})


USABLE = HostDane("mx1.d.test", DaneState.USABLE, "ok", (EE, PKIX))
UNUSABLE = HostDane("mx1.d.test", DaneState.UNUSABLE, "pkix only", (PKIX,))
FAILED = HostDane("mx1.d.test", DaneState.FAILED, "SERVFAIL")
NOT_DANE = HostDane("mx1.d.test", DaneState.NOT_APPLICABLE, "insecure")


def test_usable_tlsa_decides_even_over_an_enforce_policy() -> None:
    decision = decide_tls(_enforce(), None, tls_required_no=False, dane=_evidence(USABLE))
    rule = decision.for_mx("mx1.d.test.")
    assert rule.requirement is TlsRequirement.DANE
    assert rule.source is TlsPolicySource.DANE
    assert rule.tlsa == (EE,)  # only the usable records are matched
    assert rule.records == (EE, PKIX)  # what reports show
    assert rule.refused is None
    assert decision.source_for("mx1.d.test") is TlsPolicySource.DANE


def test_dane_host_is_not_held_to_the_sts_mx_patterns() -> None:
    other = HostDane("mx9.other.test", DaneState.USABLE, "ok", (EE,))
    decision = decide_tls(_enforce(), None, tls_required_no=False, dane=_evidence(other))
    assert decision.for_mx("mx9.other.test").refused is None
    assert decision.for_mx("mx8.other.test").refused is TlsRptResult.VALIDATION_FAILURE


def test_failed_tlsa_lookup_refuses_the_host_never_falls_back() -> None:
    for published in (_enforce(), _none()):
        decision = decide_tls(published, None, tls_required_no=False, dane=_evidence(FAILED))
        rule = decision.for_mx("mx1.d.test")
        assert rule.refused is TlsRptResult.DNSSEC_INVALID
        assert rule.source is TlsPolicySource.DANE


def test_all_unusable_means_tls_without_authentication_unless_sts_asks_more() -> None:
    plain = decide_tls(_none(), None, tls_required_no=False, dane=_evidence(UNUSABLE))
    assert plain.for_mx("mx1.d.test").requirement is TlsRequirement.ENCRYPTED
    enforce = decide_tls(_enforce(), None, tls_required_no=False, dane=_evidence(UNUSABLE))
    assert enforce.for_mx("mx1.d.test").requirement is TlsRequirement.VERIFIED
    assert enforce.for_mx("mx1.d.test").source is TlsPolicySource.STS


def test_no_dane_evidence_follows_the_domain_decision() -> None:
    decision = decide_tls(_enforce(), None, tls_required_no=False, dane=_evidence(NOT_DANE))
    rule = decision.for_mx("mx1.d.test")
    assert (rule.requirement, rule.source) == (TlsRequirement.VERIFIED, TlsPolicySource.STS)
    assert decide_tls(_none(), None, tls_required_no=False).for_mx("mx1.d.test").source is (
        TlsPolicySource.NONE
    )


def test_tls_required_no_and_opportunistic_override_waive_dane() -> None:
    waived = decide_tls(_none(), None, tls_required_no=True, dane=_evidence(FAILED))
    assert waived.for_mx("mx1.d.test").requirement is TlsRequirement.OPPORTUNISTIC
    override = OverrideRule(TlsOverride.OPPORTUNISTIC)
    relaxed = decide_tls(_none(), override, tls_required_no=False, dane=_evidence(USABLE))
    assert relaxed.for_mx("mx1.d.test").source is not TlsPolicySource.DANE


def test_require_verified_override_does_not_waive_dane() -> None:
    override = OverrideRule(TlsOverride.REQUIRE_VERIFIED, ("mx1.d.test",))
    decision = decide_tls(_none(), override, tls_required_no=False, dane=_evidence(USABLE))
    assert decision.for_mx("mx1.d.test").requirement is TlsRequirement.DANE
