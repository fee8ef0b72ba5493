"""REQUIRETLS (RFC 8689 §4.2.1) as one more input of the pure TLS decision
(relay/delivery/decision.py): per MX host, who may receive a REQUIRETLS message and how.

A host qualifies only when DANE (usable TLSA records) or an MTA-STS policy in enforce or
testing mode (testing applied as enforce) authenticates it; nothing the message or the
operator says relaxes that. IDs refer to /work/shared/RFC-CHECKLIST.md (RTLS-03/04/06).
"""

from __future__ import annotations

import pytest

from policy.model import Mode, Policy, PolicyLookup, TlsRptResult
from relay.delivery.dane import DaneEvidence, DaneState, HostDane, Tlsa
from relay.delivery.decision import TlsPolicySource, decide_tls
from relay.delivery.dnssec import Security
from relay.delivery.overrides import OverrideRule, TlsOverride
from relay.delivery.tls import TlsRequirement

MX = "mx1.d.test"
EE = Tlsa(3, 1, 1, b"\x01" * 32)
PKIX = Tlsa(1, 1, 1, b"\x01" * 32)
USABLE = HostDane(MX, DaneState.USABLE, "ok", (EE,))
UNUSABLE = HostDane(MX, DaneState.UNUSABLE, "pkix only", (PKIX,))
FAILED = HostDane(MX, DaneState.FAILED, "SERVFAIL")
OPPORTUNISTIC = OverrideRule(TlsOverride.OPPORTUNISTIC)
REQUIRE_VERIFIED = OverrideRule(TlsOverride.REQUIRE_VERIFIED, (MX,))


def _published(mode: Mode | None, mx: tuple[str, ...] = (MX,)) -> PolicyLookup:
    if mode is None:
        return PolicyLookup("d.test", None, None, "none")
    return PolicyLookup("d.test", Policy(mode, mx, 86400, "(test)"), "1", "cached")


def _dane(host: HostDane | None) -> DaneEvidence | None:
    return None if host is None else DaneEvidence("d.test", Security.SECURE, {host.host: host})


# (policy mode, override, TLS-Required: No, DANE evidence of the host) -> the host's rule:
# requirement and source when it qualifies, None when REQUIRETLS leaves it unused.
QUALIFIES = [
    (Mode.ENFORCE, None, False, None, (TlsRequirement.VERIFIED, TlsPolicySource.STS)),
    (Mode.TESTING, None, False, None, (TlsRequirement.VERIFIED, TlsPolicySource.STS)),
    (Mode.ENFORCE, None, True, None, (TlsRequirement.VERIFIED, TlsPolicySource.STS)),
    (Mode.ENFORCE, OPPORTUNISTIC, False, None, (TlsRequirement.VERIFIED, TlsPolicySource.STS)),
    (Mode.TESTING, REQUIRE_VERIFIED, False, None, (TlsRequirement.VERIFIED, TlsPolicySource.STS)),
    (None, None, False, USABLE, (TlsRequirement.DANE, TlsPolicySource.DANE)),
    (None, None, True, USABLE, (TlsRequirement.DANE, TlsPolicySource.DANE)),
    (None, OPPORTUNISTIC, False, USABLE, (TlsRequirement.DANE, TlsPolicySource.DANE)),
    (Mode.ENFORCE, None, False, USABLE, (TlsRequirement.DANE, TlsPolicySource.DANE)),
    (Mode.ENFORCE, None, False, UNUSABLE, (TlsRequirement.VERIFIED, TlsPolicySource.STS)),
    (None, None, False, None, None),
    (Mode.NONE, None, False, None, None),
    (None, None, True, None, None),
    (None, OPPORTUNISTIC, False, None, None),
    (None, REQUIRE_VERIFIED, False, None, None),
    (None, None, False, UNUSABLE, None),
    (Mode.NONE, None, True, UNUSABLE, None),
]


@pytest.mark.parametrize(("mode", "override", "tls_required_no", "host", "expected"), QUALIFIES)
def test_who_may_receive_a_requiretls_message(
    mode: Mode | None,
    override: OverrideRule | None,
    tls_required_no: bool,
    host: HostDane | None,
    expected: tuple[TlsRequirement, TlsPolicySource] | None,
) -> None:
    decision = decide_tls(
        _published(mode),
        override,
        tls_required_no=tls_required_no,
        dane=_dane(host),
        requiretls=True,
    )
    rule = decision.for_mx(MX)
    assert decision.requiretls is True
    assert rule.requiretls is True  # the option is passed on, the pool keeps it apart
    assert rule.refused is None
    if expected is None:
        assert rule.requiretls_unmet is not None, rule
    else:
        assert rule.requiretls_unmet is None, rule
        assert (rule.requirement, rule.source) == expected
    assert not decision.changed_by_request  # no override, no TLS-Required: No in force


def test_without_requiretls_the_same_inputs_decide_as_before() -> None:
    for mode in (None, Mode.NONE, Mode.TESTING, Mode.ENFORCE):
        for tls_required_no in (False, True):
            plain = decide_tls(_published(mode), None, tls_required_no=tls_required_no)
            rule = plain.for_mx(MX)
            assert (plain.requiretls, rule.requiretls, rule.requiretls_unmet) == (
                False,
                False,
                None,
            )
    testing = decide_tls(_published(Mode.TESTING), None, tls_required_no=False)
    assert testing.requirement is TlsRequirement.REPORT


def test_testing_policy_names_are_enforced_under_requiretls() -> None:
    # Testing applied as enforce: an MX the policy does not list is refused like enforce.
    decision = decide_tls(
        _published(Mode.TESTING, ("mx2.d.test",)), None, tls_required_no=False, requiretls=True
    )
    assert decision.for_mx(MX).refused is TlsRptResult.VALIDATION_FAILURE
    assert decision.for_mx("mx2.d.test").refused is None
    assert "applied as enforce" in decision.reason


def test_failed_tlsa_lookup_still_refuses_the_host() -> None:
    decision = decide_tls(
        _published(Mode.ENFORCE), None, tls_required_no=False, dane=_dane(FAILED), requiretls=True
    )
    rule = decision.for_mx(MX)
    assert rule.refused is TlsRptResult.DNSSEC_INVALID
    assert rule.source is TlsPolicySource.DANE


def test_unreadable_policy_cache_blocks_as_before() -> None:
    unavailable = PolicyLookup("d.test", None, None, "unavailable")
    decision = decide_tls(unavailable, None, tls_required_no=False, requiretls=True)
    assert decision.blocked is not None
    assert decision.requiretls is True


def test_the_reason_says_why_no_host_qualifies() -> None:
    decision = decide_tls(_published(Mode.NONE), None, tls_required_no=True, requiretls=True)
    unmet = decision.for_mx(MX).requiretls_unmet
    assert unmet is not None
    assert "no DANE TLSA records" in unmet
    assert "policy mode none" in unmet
    assert "TLS-Required: No ignored" in decision.reason
