"""DANE for SMTP (RFC 7672) over real servers: a signed zone, unbound validating it, STARTTLS sinks.

Each test publishes one domain under the signed `dane.test` (or, for the insecure cases,
outside it), gathers the DANE evidence through the validating resolver exactly as the
pipeline does (`DaneLookup.gather`, AD bit of a resolver on loopback), decides
(`decide_tls`) and attempts delivery. IDs refer to /work/shared/RFC-CHECKLIST.md.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver

from policy.model import Mode, Policy, PolicyLookup, TlsRptResult
from policy.webpki import client_context, unverified_context
from relay.app import make_resolver
from relay.delivery.attempt import AttemptSettings, MxTlsResult, attempt_domain
from relay.delivery.dane import DaneEvidence, DaneLookup, DaneState, dane_lookup
from relay.delivery.decision import TlsDecision, TlsPolicySource, decide_tls
from relay.delivery.dnssec import Security, dnssec_in_force
from relay.delivery.envelope import Envelope
from relay.delivery.mx import MxList, resolve_mx
from relay.delivery.outcome import Deferred, Delivered, Outcome
from tests.support.dane_lab import DaneWorld, ca_issued, self_signed, tlsa

SENDER = "app@src.test"
BODY = b"Subject: dane\r\n\r\nbody\r\n"
WRONG = "3 1 1 " + "00" * 32


@dataclass
class Attempt:
    outcome: Outcome
    decision: TlsDecision
    evidence: DaneEvidence
    sessions: list[MxTlsResult]


def _resolver(world: DaneWorld, timeout: float) -> dns.asyncresolver.Resolver:
    return make_resolver((world.validator.nameserver,), timeout)


def _settings(world: DaneWorld) -> AttemptSettings:
    return AttemptSettings(
        port=world.delivery_port,
        helo="relay.test",
        verified_ctx=client_context(str(world.pki.ca_file)),
        unverified_ctx=unverified_context(),
        connect_timeout=5.0,
        command_timeout=10.0,
        dns_timeout=2.0,
        allow_loopback_mx=True,
    )


def _enforce(domain: str, mx: Sequence[str] = ()) -> PolicyLookup:
    policy = Policy(Mode.ENFORCE, tuple(mx) or (f"mx1.{domain}",), 86400, "(test)")
    return PolicyLookup(domain=domain, policy=policy, policy_id="1", source="cached")


def _no_policy(domain: str) -> PolicyLookup:
    return PolicyLookup(domain=domain, policy=None, policy_id=None, source="none")


async def _attempt(
    world: DaneWorld,
    domain: str,
    published: PolicyLookup | None = None,
    *,
    tls_required_no: bool = False,
    dns_timeout: float = 2.0,
) -> Attempt:
    resolver = _resolver(world, dns_timeout)
    lookup = dane_lookup(
        dnssec_in_force("auto", (world.validator.nameserver,)), resolver, timeout=dns_timeout
    )
    assert isinstance(lookup, DaneLookup), "a resolver on loopback: DANE on"
    rng = random.Random(7)
    mx = await resolve_mx(domain, resolver, timeout=dns_timeout, rng=rng)
    assert isinstance(mx, MxList), mx
    evidence = await lookup.gather(domain, mx)
    decision = decide_tls(
        published or _no_policy(domain), None, tls_required_no=tls_required_no, dane=evidence
    )
    sessions: list[MxTlsResult] = []
    outcomes = await attempt_domain(
        domain,
        Envelope(SENDER, [f"u@{domain}"], BODY),
        decision=decision,
        settings=_settings(world),
        resolver=resolver,
        rng=rng,
        mx=mx,
        sessions=sessions,
    )
    (outcome,) = outcomes.values()
    return Attempt(outcome, decision, evidence, sessions)


async def test_dane_ee_match_with_a_self_signed_certificate_is_delivered_verified(
    dane_world: DaneWorld,
) -> None:
    domain = "ee-match.dane.test"
    cert = self_signed([f"mx1.{domain}"], dane_world.certs_dir())
    record = tlsa(cert.leaf, 3, 1, 1)
    sink = await dane_world.dane_mx(domain, cert, [record])
    done = await _attempt(dane_world, domain)
    assert isinstance(done.outcome, Delivered), done.outcome
    hop = done.outcome.reason.hop
    assert hop is not None
    assert hop.verified is True
    assert hop.dane == record
    assert hop.tls is not None
    assert done.decision.source_for(hop.mx) is TlsPolicySource.DANE
    assert done.evidence.mx is Security.SECURE
    assert len(sink.messages) == 1
    assert sink.messages[0].sni == f"mx1.{domain}"  # DANE-10: SNI = the TLSA base domain
    (session,) = done.sessions
    assert session.result is None
    assert session.tlsa == (record,)


async def test_dane_ee_mismatch_defers_and_sends_nothing(dane_world: DaneWorld) -> None:
    domain = "ee-mismatch.dane.test"
    cert = self_signed([f"mx1.{domain}"], dane_world.certs_dir())
    sink = await dane_world.dane_mx(domain, cert, [WRONG])
    done = await _attempt(dane_world, domain)
    assert isinstance(done.outcome, Deferred), done.outcome
    assert done.outcome.reason.tlsrpt is TlsRptResult.TLSA_INVALID
    assert done.outcome.reason.status.startswith("4.")
    assert sink.messages == []
    assert sink.mail_commands == 0
    assert [s.result for s in done.sessions] == [TlsRptResult.TLSA_INVALID]


async def test_dane_ee_ignores_names_and_dates(dane_world: DaneWorld) -> None:
    # DANE-06: an expired certificate for another name, matched by its SPKI: delivered.
    domain = "ee-expired.dane.test"
    cert = self_signed(["other.test"], dane_world.certs_dir(), expired=True)
    await dane_world.dane_mx(domain, cert, [tlsa(cert.leaf, 3, 0, 2)])
    done = await _attempt(dane_world, domain)
    assert isinstance(done.outcome, Delivered), done.outcome
    assert done.outcome.reason.hop is not None
    assert done.outcome.reason.hop.verified is True


async def test_dane_ta_chain_to_the_anchor_with_the_right_name_is_delivered(
    dane_world: DaneWorld,
) -> None:
    domain = "ta-ok.dane.test"
    cert = ca_issued(dane_world.dane_ca, [f"mx1.{domain}"], dane_world.certs_dir())
    assert cert.issuer is not None
    record = tlsa(cert.issuer, 2, 0, 1)
    sink = await dane_world.dane_mx(domain, cert, [record])
    done = await _attempt(dane_world, domain)
    assert isinstance(done.outcome, Delivered), done.outcome
    assert done.outcome.reason.hop is not None
    assert done.outcome.reason.hop.dane == record
    assert len(sink.messages) == 1


async def test_dane_ta_with_a_leaf_for_another_name_defers(dane_world: DaneWorld) -> None:
    domain = "ta-name.dane.test"
    cert = ca_issued(dane_world.dane_ca, ["other.test"], dane_world.certs_dir())
    assert cert.issuer is not None
    sink = await dane_world.dane_mx(domain, cert, [tlsa(cert.issuer, 2, 1, 1)])
    done = await _attempt(dane_world, domain)
    assert isinstance(done.outcome, Deferred), done.outcome
    assert done.outcome.reason.tlsrpt is TlsRptResult.CERTIFICATE_HOST_MISMATCH
    assert sink.messages == []


async def test_rollover_second_record_matches(dane_world: DaneWorld) -> None:
    domain = "rollover.dane.test"
    cert = self_signed([f"mx1.{domain}"], dane_world.certs_dir())
    right = tlsa(cert.leaf, 3, 1, 1)
    await dane_world.dane_mx(domain, cert, [WRONG, right])
    done = await _attempt(dane_world, domain)
    assert isinstance(done.outcome, Delivered), done.outcome
    assert done.outcome.reason.hop is not None
    assert done.outcome.reason.hop.dane == right


async def test_sha2_512_is_preferred_over_sha2_256(dane_world: DaneWorld) -> None:
    # DANE-09 (RFC 7671 §9): a right SHA2-256 record beside a wrong SHA2-512 one of the
    # same usage and selector is ignored.
    domain = "agility.dane.test"
    cert = self_signed([f"mx1.{domain}"], dane_world.certs_dir())
    await dane_world.dane_mx(domain, cert, [tlsa(cert.leaf, 3, 1, 1), "3 1 2 " + "11" * 64])
    done = await _attempt(dane_world, domain)
    assert isinstance(done.outcome, Deferred), done.outcome
    assert done.outcome.reason.tlsrpt is TlsRptResult.TLSA_INVALID


async def test_bogus_tlsa_signature_defers_without_contacting_the_mx(
    dane_world: DaneWorld,
) -> None:
    domain = "bogus.dane.test"
    cert = self_signed([f"mx1.{domain}"], dane_world.certs_dir())
    sink = await dane_world.dane_mx(domain, cert, [tlsa(cert.leaf)])
    dane_world.signed.bogus(f"_25._tcp.mx1.{domain}", "TLSA")
    done = await _attempt(dane_world, domain)
    assert isinstance(done.outcome, Deferred), done.outcome
    assert done.outcome.reason.tlsrpt is TlsRptResult.DNSSEC_INVALID
    host = done.evidence.host(f"mx1.{domain}")
    assert host is not None
    assert host.state is DaneState.FAILED
    assert sink.connections == 0  # never a fallback to opportunistic TLS
    assert [s.result for s in done.sessions] == [TlsRptResult.DNSSEC_INVALID]


async def test_tlsa_lookup_timing_out_defers(dane_world: DaneWorld) -> None:
    domain = "tlsa-timeout.dane.test"
    cert = self_signed([f"mx1.{domain}"], dane_world.certs_dir())
    sink = await dane_world.dane_mx(domain, cert, [tlsa(cert.leaf)])
    dane_world.dns.fail(f"_25._tcp.mx1.{domain}", "TLSA", "timeout")
    done = await _attempt(dane_world, domain, dns_timeout=1.0)
    assert isinstance(done.outcome, Deferred), done.outcome
    assert done.outcome.reason.tlsrpt is TlsRptResult.DNSSEC_INVALID
    assert sink.connections == 0


async def test_insecure_zone_means_no_dane_opportunistic(dane_world: DaneWorld) -> None:
    # Outside the signed apex: the TLSA records (wrong ones, even) are not DNSSEC-secure,
    # so DANE does not apply; without MTA-STS, opportunistic TLS delivers.
    domain = "insecure-dane.test"
    cert = self_signed([f"mx1.{domain}"], dane_world.certs_dir())
    sink = await dane_world.dane_mx(domain, cert, [WRONG])
    done = await _attempt(dane_world, domain)
    assert done.evidence.mx is Security.INSECURE
    assert isinstance(done.outcome, Delivered), done.outcome
    hop = done.outcome.reason.hop
    assert hop is not None
    assert hop.tls is not None
    assert hop.verified is False
    assert hop.dane is None
    assert done.decision.source_for(hop.mx) is TlsPolicySource.NONE
    assert len(sink.messages) == 1


async def test_insecure_zone_falls_back_to_mta_sts(dane_world: DaneWorld) -> None:
    domain = "insecure-sts.test"
    await dane_world.sts_domain(domain, mode=None, cert_kind="good")
    dane_world.dns.add(f"_25._tcp.mx1.{domain}", "TLSA", WRONG)
    done = await _attempt(dane_world, domain, _enforce(domain))
    assert isinstance(done.outcome, Delivered), done.outcome
    hop = done.outcome.reason.hop
    assert hop is not None
    assert hop.verified is True
    assert done.decision.source_for(hop.mx) is TlsPolicySource.STS


async def test_mta_sts_never_rescues_a_failing_dane_validation(dane_world: DaneWorld) -> None:
    # STS-120 / DANE-11: C-good passes the enforce policy, the TLSA record does not match.
    domain = "sts-and-dane.dane.test"
    host = f"mx1.{domain}"
    good = dane_world.pki.server_context([host], "good")
    sink = await dane_world.dane_mx(domain, good, [WRONG])
    done = await _attempt(dane_world, domain, _enforce(domain))
    assert isinstance(done.outcome, Deferred), done.outcome
    assert done.outcome.reason.tlsrpt is TlsRptResult.TLSA_INVALID
    assert sink.messages == []


async def test_only_pkix_records_mean_unauthenticated_tls(dane_world: DaneWorld) -> None:
    # DANE-08: PKIX-TA/PKIX-EE are unusable for SMTP: TLS is required, not authenticated.
    domain = "pkix-only.dane.test"
    cert = self_signed([f"mx1.{domain}"], dane_world.certs_dir())
    await dane_world.dane_mx(domain, cert, [tlsa(cert.leaf, 1, 1, 1), tlsa(cert.leaf, 0, 0, 1)])
    done = await _attempt(dane_world, domain)
    assert isinstance(done.outcome, Delivered), done.outcome
    hop = done.outcome.reason.hop
    assert hop is not None
    assert hop.tls is not None
    assert hop.verified is False
    assert hop.dane is None
    assert done.decision.source_for(hop.mx) is TlsPolicySource.DANE


async def test_only_pkix_records_without_starttls_defer(dane_world: DaneWorld) -> None:
    domain = "pkix-plain.dane.test"
    sink = await dane_world.dane_mx(domain, None, ["1 1 1 " + "22" * 32])
    done = await _attempt(dane_world, domain)
    assert isinstance(done.outcome, Deferred), done.outcome
    assert done.outcome.reason.tlsrpt is TlsRptResult.STARTTLS_NOT_SUPPORTED
    assert sink.messages == []
    assert sink.mail_commands == 0


async def test_dane_mx_without_starttls_defers(dane_world: DaneWorld) -> None:
    domain = "dane-plain.dane.test"
    sink = await dane_world.dane_mx(domain, None, [WRONG])
    done = await _attempt(dane_world, domain)
    assert isinstance(done.outcome, Deferred), done.outcome
    assert done.outcome.reason.tlsrpt is TlsRptResult.STARTTLS_NOT_SUPPORTED
    assert sink.mail_commands == 0


async def test_tls_required_no_waives_dane(dane_world: DaneWorld) -> None:
    # RFC 8689 §5: the message asks for recipient policies (DANE included) to be ignored.
    domain = "waived.dane.test"
    cert = self_signed([f"mx1.{domain}"], dane_world.certs_dir())
    sink = await dane_world.dane_mx(domain, cert, [WRONG])
    done = await _attempt(dane_world, domain, tls_required_no=True)
    assert isinstance(done.outcome, Delivered), done.outcome
    assert done.outcome.reason.hop is not None
    assert done.outcome.reason.hop.dane is None
    assert len(sink.messages) == 1


async def test_secure_zone_without_tlsa_records_is_not_dane(dane_world: DaneWorld) -> None:
    # RFC 7672 §2.2: authenticated denial of TLSA records: pre-DANE opportunistic TLS.
    domain = "no-tlsa.dane.test"
    cert = self_signed([f"mx1.{domain}"], dane_world.certs_dir())
    await dane_world.dane_mx(domain, cert, [])
    done = await _attempt(dane_world, domain)
    host = done.evidence.host(f"mx1.{domain}")
    assert host is not None
    assert host.state is DaneState.NOT_APPLICABLE
    assert host.tlsa is Security.SECURE
    assert isinstance(done.outcome, Delivered), done.outcome
    assert done.outcome.reason.hop is not None
    assert done.outcome.reason.hop.verified is False
