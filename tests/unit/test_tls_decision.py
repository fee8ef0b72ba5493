"""relay/delivery/decision.py: the TLS decision as a pure function of its inputs.

What the domain published (its MTA-STS lookup), what the operator configured
(`tls.overrides`) and what the message asked (`TLS-Required: No`) go in; the requirement,
the MX names allowed and the deciding mechanism come out, with the inputs untouched.
IDs refer to the RFC checklist (STS-nn).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.model import Mode, Policy, PolicyLookup, TlsRptResult
from relay.delivery.decision import TlsPolicySource, decide_tls
from relay.delivery.overrides import OverrideRule, TlsOverride, parse_override
from relay.delivery.tls import TlsRequirement

PATTERNS = ("mx1.d.test", "*.d.test")
OPPORTUNISTIC = OverrideRule(TlsOverride.OPPORTUNISTIC)
REQUIRE = OverrideRule(TlsOverride.REQUIRE_VERIFIED, ("mx.trusted.test",))


def _lookup(mode: Mode | None, mx: tuple[str, ...] = PATTERNS) -> PolicyLookup:
    policy = None if mode is None else Policy(mode=mode, mx=mx, max_age=86400, text="")
    return PolicyLookup(domain="d.test", policy=policy, policy_id="1", source="cached")


@pytest.mark.parametrize(
    ("mode", "requirement", "source"),
    [
        (Mode.ENFORCE, TlsRequirement.VERIFIED, TlsPolicySource.STS),
        (Mode.TESTING, TlsRequirement.REPORT, TlsPolicySource.STS),
        (Mode.NONE, TlsRequirement.OPPORTUNISTIC, TlsPolicySource.NONE),
        (None, TlsRequirement.OPPORTUNISTIC, TlsPolicySource.NONE),
    ],
)
def test_the_published_mode_decides_without_overrides(
    mode: Mode | None, requirement: TlsRequirement, source: TlsPolicySource
) -> None:
    decision = decide_tls(_lookup(mode), None, tls_required_no=False)
    assert decision.requirement is requirement
    assert decision.source is source
    assert decision.blocked is None


@pytest.mark.parametrize(
    ("mode", "host", "expected"),
    [
        (Mode.ENFORCE, "mx1.d.test", None),
        (Mode.ENFORCE, "MX1.D.TEST.", None),  # STS-82
        (Mode.ENFORCE, "other.d.test", None),  # wildcard, one label
        (Mode.ENFORCE, "a.b.d.test", TlsRptResult.VALIDATION_FAILURE),  # STS-81
        (Mode.ENFORCE, "evil.test", TlsRptResult.VALIDATION_FAILURE),  # STS-80
        (Mode.ENFORCE, "*.d.test", TlsRptResult.VALIDATION_FAILURE),  # STS-101
        (Mode.ENFORCE, "mx_1.d.test", TlsRptResult.VALIDATION_FAILURE),
        (Mode.TESTING, "evil.test", TlsRptResult.VALIDATION_FAILURE),
        (Mode.NONE, "evil.test", None),
        (None, "*.d.test", None),
    ],
)
def test_published_verdict_on_mx_names(
    mode: Mode | None, host: str, expected: TlsRptResult | None
) -> None:
    decision = decide_tls(_lookup(mode), None, tls_required_no=False)
    assert decision.published_verdict(host) is expected
    # Only an enforced decision refuses a host; testing uses it and reports.
    refused = decision.refuses_mx(host)
    assert refused is (expected if mode is Mode.ENFORCE else None)


def test_opportunistic_override_on_enforce_delivers_but_keeps_the_published_policy() -> None:
    published = _lookup(Mode.ENFORCE)
    decision = decide_tls(published, OPPORTUNISTIC, tls_required_no=False)
    assert decision.requirement is TlsRequirement.REPORT  # verification tried, not required
    assert decision.source is TlsPolicySource.OVERRIDE
    assert decision.changed_by_request
    assert decision.published is published  # never rewritten
    assert decision.refuses_mx("evil.test") is None
    # What the TLS report counts is still the published policy's verdict.
    assert decision.published_verdict("evil.test") is TlsRptResult.VALIDATION_FAILURE
    assert decision.published_requires_validation


def test_tls_required_no_on_enforce_is_reported_as_its_own_source() -> None:
    decision = decide_tls(_lookup(Mode.ENFORCE), None, tls_required_no=True)
    assert decision.requirement is TlsRequirement.REPORT
    assert decision.source is TlsPolicySource.TLS_REQUIRED_NO
    assert "TLS-Required: No" in decision.reason


@pytest.mark.parametrize("mode", [Mode.TESTING, Mode.NONE, None])
def test_tls_required_no_without_enforce_changes_nothing(mode: Mode | None) -> None:
    plain = decide_tls(_lookup(mode), None, tls_required_no=False)
    asked = decide_tls(_lookup(mode), None, tls_required_no=True)
    assert (asked.requirement, asked.source) == (plain.requirement, plain.source)
    assert not asked.changed_by_request


@pytest.mark.parametrize("mode", [Mode.TESTING, Mode.NONE, None])
def test_require_verified_uses_its_own_patterns_not_dns(mode: Mode | None) -> None:
    decision = decide_tls(_lookup(mode), REQUIRE, tls_required_no=False)
    assert decision.requirement is TlsRequirement.VERIFIED
    assert decision.source is TlsPolicySource.OVERRIDE
    assert decision.mx_patterns == ("mx.trusted.test",)
    assert decision.refuses_mx("mx.trusted.test") is None
    # A name a DNS spoofer put in the MX RRset is refused, whatever DNS says.
    assert decision.refuses_mx("mx.attacker.test") is TlsRptResult.VALIDATION_FAILURE


def test_require_verified_beats_tls_required_no() -> None:
    decision = decide_tls(_lookup(None), REQUIRE, tls_required_no=True)
    assert decision.requirement is TlsRequirement.VERIFIED


def test_an_enforce_policy_is_not_replaced_by_require_verified() -> None:
    decision = decide_tls(_lookup(Mode.ENFORCE), REQUIRE, tls_required_no=False)
    assert decision.source is TlsPolicySource.STS
    assert decision.mx_patterns == PATTERNS
    assert not decision.changed_by_request


def test_an_unreadable_policy_cache_blocks_delivery() -> None:
    unknown = PolicyLookup("d.test", None, None, "unavailable", detail="policy cache unreadable")
    for override in (None, OPPORTUNISTIC, REQUIRE):
        for asked in (False, True):
            decision = decide_tls(unknown, override, tls_required_no=asked)
            assert decision.blocked is not None
            assert decision.requirement is TlsRequirement.VERIFIED
            assert decision.refuses_mx("mx1.d.test") is not None


modes = st.sampled_from([Mode.ENFORCE, Mode.TESTING, Mode.NONE, None])
overrides = st.sampled_from([None, OPPORTUNISTIC, REQUIRE])


@given(mode=modes, override=overrides, asked=st.booleans())
def test_decisions_never_rewrite_inputs_and_enforce_is_never_plaintext_silently(
    mode: Mode | None, override: OverrideRule | None, asked: bool
) -> None:
    published = _lookup(mode)
    decision = decide_tls(published, override, tls_required_no=asked)
    assert decision.published == _lookup(mode)
    assert decision.override is override
    if mode is Mode.ENFORCE and decision.requirement is not TlsRequirement.VERIFIED:
        # Only the operator or the message may relax enforce, and it says so.
        assert decision.changed_by_request
        assert decision.requirement is TlsRequirement.REPORT


@pytest.mark.parametrize(
    ("entry", "domain", "rule"),
    [
        ("b.test=opportunistic", "b.test", OPPORTUNISTIC),
        (
            "a.test=require-verified match=mx.a.test:*.a.test",
            "a.test",
            OverrideRule(TlsOverride.REQUIRE_VERIFIED, ("mx.a.test", "*.a.test")),
        ),
    ],
)
def test_parse_override(entry: str, domain: str, rule: OverrideRule) -> None:
    assert parse_override(entry) == (domain, rule)
