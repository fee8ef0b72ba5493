"""One delivery attempt against the lab: real DNS, real STARTTLS sinks, trustme certificates.

Policies are given as `PolicyLookup` values (fetching is tested elsewhere); everything else
(MX lookup, address lookup, SMTP, TLS, SNI, certificate checks) runs over loopback sockets.
IDs refer to /work/shared/RFC-CHECKLIST.md.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import dns.asyncresolver
import dns.nameserver
import pytest

from policy.model import Mode, Policy, PolicyLookup, TlsRptResult
from policy.webpki import client_context, unverified_context
from relay.delivery.attempt import AttemptSettings, attempt_domain
from relay.delivery.decision import decide_tls
from relay.delivery.envelope import Envelope
from relay.delivery.outcome import Bounced, Deferred, Delivered, Outcome
from tests.conftest import SilentHost
from tests.support.dns import FailureMode
from tests.support.world import World

SENDER = "app@src.test"


def _resolver(world: World) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", world.dns.port)]
    return resolver


def _settings(world: World, **changes: float) -> AttemptSettings:
    return AttemptSettings(
        port=world.delivery_port,
        helo="relay.test",
        verified_ctx=client_context(str(world.pki.ca_file)),
        unverified_ctx=unverified_context(),
        connect_timeout=changes.get("connect_timeout", 5.0),
        command_timeout=changes.get("command_timeout", 10.0),
        dns_timeout=2.0,
        allow_loopback_mx=bool(changes.get("allow_loopback_mx", True)),
    )


def _lookup(domain: str, mode: Mode | None, mx: Sequence[str] = ()) -> PolicyLookup:
    if mode is None:
        return PolicyLookup(domain=domain, policy=None, policy_id=None, source="none")
    patterns = tuple(mx) or (f"mx1.{domain}",)
    policy = Policy(mode=mode, mx=patterns, max_age=86400, text="(test)")
    return PolicyLookup(domain=domain, policy=policy, policy_id="1", source="cached")


async def _attempt(
    world: World,
    domain: str,
    lookup: PolicyLookup,
    recipients: Sequence[str] | None = None,
    data: bytes = b"Subject: hello\r\n\r\nbody\r\n",
    **changes: float,
) -> dict[str, Outcome]:
    rcpts = list(recipients or [f"u@{domain}"])
    return await attempt_domain(
        domain,
        Envelope(SENDER, rcpts, data),
        decision=decide_tls(lookup, None, tls_required_no=False),
        settings=_settings(world, **changes),
        resolver=_resolver(world),
        rng=random.Random(7),
    )


def _only(outcomes: dict[str, Outcome]) -> Outcome:
    assert len(outcomes) == 1
    return next(iter(outcomes.values()))


async def test_enforce_good_certificate_delivers_verified_with_sni(world: World) -> None:
    sink = await world.sts_domain("enforce-ok.test", mode=None)
    outcome = _only(
        await _attempt(world, "enforce-ok.test", _lookup("enforce-ok.test", Mode.ENFORCE))
    )
    assert isinstance(outcome, Delivered), outcome
    hop = outcome.reason.hop
    assert hop is not None
    assert hop.verified
    assert hop.mx == "mx1.enforce-ok.test"
    assert hop.tls in ("TLSv1.2", "TLSv1.3")
    assert outcome.reason.status == "2.0.0"
    assert outcome.reason.tlsrpt is None
    assert outcome.reason.reply is not None
    assert outcome.reason.reply.startswith("250")
    [message] = sink.messages
    assert message.sni == "mx1.enforce-ok.test"  # STS-97
    assert message.rcpt_tos == ["u@enforce-ok.test"]
    assert message.mail_from == SENDER
    assert message.ehlo == "relay.test"
    # STS-100: a fresh EHLO after STARTTLS, nothing else in the clear.
    verbs = [command.split()[0] for command in sink.sessions[0].commands]
    assert verbs[:3] == ["EHLO", "STARTTLS", "EHLO"]
    assert verbs[3:6] == ["MAIL", "RCPT", "DATA"]


async def test_mx_written_with_root_dot_and_capitals_still_matches(world: World) -> None:
    # STS-82, STS-97: case and the trailing dot are ignored; SNI carries no dot.
    domain = "enforce-fqdn.test"
    sink = await world.add_mx("mx1.enforce-fqdn.test", world.allocate_ip())
    world.mx_record(domain, (10, "MX1.Enforce-FQDN.test."))
    outcome = _only(await _attempt(world, domain, _lookup(domain, Mode.ENFORCE)))
    assert isinstance(outcome, Delivered), outcome
    assert sink.messages[0].sni == "mx1.enforce-fqdn.test"


@pytest.mark.parametrize(
    ("domain", "cert_kind", "cert_names", "expected"),
    [
        ("enforce-wrong-name.test", "good", ["other.test"], TlsRptResult.CERTIFICATE_HOST_MISMATCH),
        ("enforce-self.test", "self", None, TlsRptResult.CERTIFICATE_NOT_TRUSTED),
        ("enforce-expired.test", "expired", None, TlsRptResult.CERTIFICATE_EXPIRED),
        ("enforce-cn-only.test", "cn_only", None, TlsRptResult.CERTIFICATE_HOST_MISMATCH),
        ("enforce-tls11.test", "tls11", None, TlsRptResult.VALIDATION_FAILURE),
    ],
)
async def test_enforce_certificate_failures_defer_without_mail(
    world: World,
    domain: str,
    cert_kind: str,
    cert_names: list[str] | None,
    expected: TlsRptResult,
) -> None:
    # STS-92..95, STS-98: deferred with the RFC 8460 type; nothing sent in the clear.
    host = f"mx1.{domain}"
    world.mx_record(domain, (10, host))
    sink = await world.add_mx(host, world.allocate_ip(), cert_kind=cert_kind, cert_names=cert_names)
    outcome = _only(await _attempt(world, domain, _lookup(domain, Mode.ENFORCE)))
    assert isinstance(outcome, Deferred), outcome
    assert outcome.reason.tlsrpt is expected
    assert outcome.reason.status == "4.7.5"
    assert outcome.reason.hop is not None
    assert outcome.reason.hop.mx == host
    assert sink.connections >= 1
    assert sink.mail_commands == 0
    assert sink.messages == []


async def test_enforce_mx_not_in_policy_is_never_contacted(world: World) -> None:
    # STS-80, STS-86: validation-failure; no address lookup, no connection.
    domain = "enforce-wrong-mx.test"
    world.mx_record(domain, (10, f"evil.{domain}"))
    evil = await world.add_mx(f"evil.{domain}", world.allocate_ip())
    outcome = _only(await _attempt(world, domain, _lookup(domain, Mode.ENFORCE)))
    assert isinstance(outcome, Deferred), outcome
    assert outcome.reason.tlsrpt is TlsRptResult.VALIDATION_FAILURE
    assert outcome.reason.status == "4.7.5"
    assert evil.connections == 0
    assert not world.dns.queried(f"evil.{domain}", "A")


async def test_enforce_without_starttls_defers_and_sends_no_mail(world: World) -> None:
    # STS-90
    sink = await world.sts_domain("enforce-plain.test", mode=None, starttls=False)
    lookup = _lookup("enforce-plain.test", Mode.ENFORCE)
    outcome = _only(await _attempt(world, "enforce-plain.test", lookup))
    assert isinstance(outcome, Deferred), outcome
    assert outcome.reason.tlsrpt is TlsRptResult.STARTTLS_NOT_SUPPORTED
    assert sink.connections == 1
    assert sink.mail_commands == 0


async def test_enforce_starttls_refused_defers_without_plaintext(world: World) -> None:
    # STS-91: 454 to STARTTLS; no MAIL in the clear, no second connection.
    sink = await world.sts_domain(
        "enforce-454.test", mode=None, starttls_reply="454 4.7.0 TLS not available"
    )
    outcome = _only(
        await _attempt(world, "enforce-454.test", _lookup("enforce-454.test", Mode.ENFORCE))
    )
    assert isinstance(outcome, Deferred), outcome
    assert outcome.reason.tlsrpt is TlsRptResult.STARTTLS_NOT_SUPPORTED
    assert sink.connections == 1
    assert sink.mail_commands == 0


async def test_bad_preferred_mx_then_good_second_mx_delivers(world: World) -> None:
    # STS-84 A, SMTP-02: walk in preference order; the bad host counts as a transient failure.
    domain = "enforce-second.test"
    world.mx_record(domain, (10, f"mx1.{domain}"), (20, f"mx2.{domain}"))
    bad = await world.add_mx(f"mx1.{domain}", world.allocate_ip(), cert_kind="self")
    good = await world.add_mx(f"mx2.{domain}", world.allocate_ip())
    lookup = _lookup(domain, Mode.ENFORCE, mx=(f"*.{domain}",))
    outcome = _only(await _attempt(world, domain, lookup))
    assert isinstance(outcome, Delivered), outcome
    assert outcome.reason.hop is not None
    assert outcome.reason.hop.mx == f"mx2.{domain}"
    assert bad.connections == 1
    assert bad.mail_commands == 0
    assert len(good.messages) == 1
    assert good.messages[0].sni == f"mx2.{domain}"


async def test_good_preferred_mx_leaves_second_untouched(world: World) -> None:
    # STS-84 B
    domain = "enforce-first.test"
    world.mx_record(domain, (10, f"mx1.{domain}"), (20, f"mx2.{domain}"))
    first = await world.add_mx(f"mx1.{domain}", world.allocate_ip())
    second = await world.add_mx(f"mx2.{domain}", world.allocate_ip())
    lookup = _lookup(domain, Mode.ENFORCE, mx=(f"*.{domain}",))
    assert isinstance(_only(await _attempt(world, domain, lookup)), Delivered)
    assert len(first.messages) == 1
    assert second.connections == 0


async def test_testing_mode_delivers_despite_bad_certificate_and_records_it(world: World) -> None:
    # STS-111 A: delivered unverified; what enforce would have refused is on the reason.
    sink = await world.sts_domain("testing-self.test", mode=None, cert_kind="self")
    lookup = _lookup("testing-self.test", Mode.TESTING)
    outcome = _only(await _attempt(world, "testing-self.test", lookup))
    assert isinstance(outcome, Delivered), outcome
    assert outcome.reason.tlsrpt is TlsRptResult.CERTIFICATE_NOT_TRUSTED
    hop = outcome.reason.hop
    assert hop is not None
    assert hop.tls is not None
    assert not hop.verified
    [message] = sink.messages
    assert message.tls_version is not None


async def test_testing_mode_mx_not_in_policy_is_used_and_recorded(world: World) -> None:
    domain = "testing-wrong-mx.test"
    world.mx_record(domain, (10, f"evil.{domain}"))
    evil = await world.add_mx(f"evil.{domain}", world.allocate_ip())
    outcome = _only(await _attempt(world, domain, _lookup(domain, Mode.TESTING)))
    assert isinstance(outcome, Delivered), outcome
    assert outcome.reason.tlsrpt is TlsRptResult.VALIDATION_FAILURE
    assert len(evil.messages) == 1


async def test_testing_mode_without_starttls_delivers_in_plaintext(world: World) -> None:
    # STS-111 B
    sink = await world.sts_domain("testing-plain.test", mode=None, starttls=False)
    lookup = _lookup("testing-plain.test", Mode.TESTING)
    outcome = _only(await _attempt(world, "testing-plain.test", lookup))
    assert isinstance(outcome, Delivered), outcome
    assert outcome.reason.tlsrpt is TlsRptResult.STARTTLS_NOT_SUPPORTED
    assert outcome.reason.hop is not None
    assert outcome.reason.hop.tls is None
    assert len(sink.messages) == 1
    assert sink.messages[0].tls_version is None


async def test_no_policy_plaintext_mx_delivers_in_the_clear(world: World) -> None:
    sink = await world.sts_domain("nopolicy-plain.test", mode=None, starttls=False)
    outcome = _only(await _attempt(world, "nopolicy-plain.test", _lookup("x", None)))
    assert isinstance(outcome, Delivered), outcome
    hop = outcome.reason.hop
    assert hop is not None
    assert hop.tls is None
    assert not hop.verified
    assert outcome.reason.tlsrpt is None
    assert len(sink.messages) == 1


@pytest.mark.parametrize("mode", [None, Mode.NONE])
async def test_no_policy_uses_opportunistic_tls_with_any_certificate(
    world: World, mode: Mode | None
) -> None:
    # STS-112 probe: C-self is accepted without a policy (unverified TLS).
    domain = f"probe-{mode or 'nopolicy'}.test"
    sink = await world.sts_domain(domain, mode=None, cert_kind="self")
    outcome = _only(await _attempt(world, domain, _lookup(domain, mode)))
    assert isinstance(outcome, Delivered), outcome
    hop = outcome.reason.hop
    assert hop is not None
    assert hop.tls is not None
    assert not hop.verified
    assert outcome.reason.tlsrpt is None
    assert sink.messages[0].tls_version is not None


async def test_opportunistic_starttls_failure_falls_back_to_plaintext(world: World) -> None:
    # The connection dies at STARTTLS: a fresh plaintext session delivers. (A TLS 1.1-only
    # MX gets TLS 1.1 now: tests/e2e/test_opportunistic_old_tls.py.)
    domain = "nopolicy-starttls-dies.test"
    sink = await world.sts_domain(domain, mode=None, drop_on=frozenset({"STARTTLS"}))
    outcome = _only(await _attempt(world, domain, _lookup("x", None)))
    assert isinstance(outcome, Delivered), outcome
    assert outcome.reason.hop is not None
    assert outcome.reason.hop.tls is None
    assert sink.connections == 2
    assert sink.messages[0].tls_version is None


async def test_per_recipient_replies_in_one_transaction(world: World) -> None:
    # SMTP-09, SMTP-12
    domain = "rcpt-mix.test"
    sink = await world.sts_domain(
        domain,
        mode=None,
        rcpt_replies={
            f"a@{domain}": "550 5.1.1 no such user",
            f"c@{domain}": "451 4.2.0 mailbox busy",
        },
    )
    rcpts = [f"a@{domain}", f"b@{domain}", f"c@{domain}"]
    outcomes = await _attempt(world, domain, _lookup(domain, Mode.ENFORCE), recipients=rcpts)
    a, b, c = (outcomes[r] for r in rcpts)
    assert isinstance(a, Bounced)
    assert a.reason.status == "5.1.1"
    assert a.reason.reply == "550 5.1.1 no such user"
    assert isinstance(b, Delivered)
    assert b.reason.hop is not None
    assert b.reason.hop.verified
    assert isinstance(c, Deferred)
    assert c.reason.status == "4.2.0"
    assert c.reason.tlsrpt is None
    [message] = sink.messages
    assert message.rcpt_tos == [f"b@{domain}"]
    assert sink.mail_commands == 1


async def test_null_sender_stays_null(world: World) -> None:
    # SMTP-18: a bounce is relayed with MAIL FROM:<>.
    domain = "null-sender.test"
    sink = await world.sts_domain(domain, mode=None)
    outcomes = await attempt_domain(
        domain,
        Envelope("", [f"u@{domain}"], b"Subject: bounce\r\n\r\nbody\r\n"),
        decision=decide_tls(_lookup(domain, None), None, tls_required_no=False),
        settings=_settings(world),
        resolver=_resolver(world),
        rng=random.Random(1),
    )
    assert isinstance(_only(outcomes), Delivered)
    assert sink.messages[0].mail_from == "<>"
    assert "MAIL FROM:<> SIZE=25" in sink.sessions[0].commands


async def test_two_recipients_share_one_transaction(world: World) -> None:
    domain = "two-rcpts.test"
    sink = await world.sts_domain(domain, mode=None)
    rcpts = [f"u1@{domain}", f"u2@{domain}"]
    outcomes = await _attempt(world, domain, _lookup(domain, None), recipients=rcpts)
    assert all(isinstance(o, Delivered) for o in outcomes.values())
    [message] = sink.messages
    assert message.rcpt_tos == rcpts


async def test_554_after_data_bounces_every_recipient_once(world: World) -> None:
    # SMTP-10: no second try at the same (or another) host.
    domain = "data-554.test"
    sink = await world.sts_domain(domain, mode=None, data_reply="554 5.6.0 content rejected")
    rcpts = [f"u1@{domain}", f"u2@{domain}"]
    outcomes = await _attempt(world, domain, _lookup(domain, Mode.ENFORCE), recipients=rcpts)
    for outcome in outcomes.values():
        assert isinstance(outcome, Bounced), outcome
        assert outcome.reason.status == "5.6.0"
        assert outcome.reason.reply == "554 5.6.0 content rejected"
    assert sink.connections == 1


async def test_451_after_data_defers_every_recipient(world: World) -> None:
    domain = "data-451.test"
    await world.sts_domain(domain, mode=None, data_reply="451 4.3.0 try again")
    outcome = _only(await _attempt(world, domain, _lookup(domain, None)))
    assert isinstance(outcome, Deferred)
    assert outcome.reason.status == "4.3.0"


async def test_null_mx_bounces_without_any_connection(world: World) -> None:
    # NMX-01, NMX-02: the domain's own A record is not used either.
    domain = "null-mx.test"
    world.mx_record(domain, (0, "."))
    sink = await world.add_mx(domain, world.allocate_ip(), starttls=False)
    outcome = _only(await _attempt(world, domain, _lookup(domain, Mode.ENFORCE)))
    assert isinstance(outcome, Bounced), outcome
    assert outcome.reason.status == "5.1.10"
    assert sink.connections == 0
    assert not world.dns.queried(domain, "A")


async def test_null_mx_mixed_with_real_mx_uses_the_real_one(world: World) -> None:
    # NMX-04: "." is never looked up or contacted.
    domain = "null-mixed.test"
    world.mx_record(domain, (0, "."), (10, f"mx1.{domain}"))
    sink = await world.add_mx(f"mx1.{domain}", world.allocate_ip())
    outcome = _only(await _attempt(world, domain, _lookup(domain, None)))
    assert isinstance(outcome, Delivered), outcome
    assert len(sink.messages) == 1


async def test_nxdomain_bounces(world: World) -> None:
    # SMTP-05
    outcome = _only(await _attempt(world, "no-such-domain.test", _lookup("x", Mode.ENFORCE)))
    assert isinstance(outcome, Bounced), outcome
    assert outcome.reason.status == "5.1.2"


@pytest.mark.parametrize("mode", ["servfail", "garbage"])
async def test_mx_lookup_failure_defers(world: World, mode: FailureMode) -> None:
    # SMTP-06: a temporary DNS error is never a bounce.
    domain = f"mx-{mode}.test"
    sink = await world.sts_domain(domain, mode=None)
    world.dns.fail(domain, "MX", mode)
    outcome = _only(await _attempt(world, domain, _lookup(domain, None)))
    assert isinstance(outcome, Deferred), outcome
    assert outcome.reason.status == "4.4.3"
    assert sink.connections == 0


async def test_mx_address_lookup_failure_defers(world: World) -> None:
    domain = "addr-servfail.test"
    sink = await world.sts_domain(domain, mode=None)
    world.dns.fail(f"mx1.{domain}", None, "servfail")
    outcome = _only(await _attempt(world, domain, _lookup(domain, None)))
    assert isinstance(outcome, Deferred), outcome
    assert outcome.reason.status == "4.4.3"
    assert sink.connections == 0


async def test_loopback_mx_refused_unless_allowed(world: World) -> None:
    domain = "loopback-mx.test"
    sink = await world.sts_domain(domain, mode=None)
    outcome = _only(await _attempt(world, domain, _lookup(domain, None), allow_loopback_mx=False))
    assert isinstance(outcome, Deferred), outcome
    assert outcome.reason.status == "4.4.4"
    assert "loopback" in outcome.reason.text
    assert sink.connections == 0


async def test_second_address_is_tried_when_first_is_refused(world: World) -> None:
    # SMTP-07: mx1 has two A records; nothing listens on the first.
    domain = "two-addresses.test"
    host = f"mx1.{domain}"
    dead_ip = world.allocate_ip()
    world.mx_record(domain, (10, host))
    world.dns.add(host, "A", dead_ip)
    sink = await world.add_mx(host, world.allocate_ip())
    outcome = _only(await _attempt(world, domain, _lookup(domain, Mode.ENFORCE)))
    assert isinstance(outcome, Delivered), outcome
    assert outcome.reason.hop is not None
    assert outcome.reason.hop.ip == sink.ip
    assert len(sink.messages) == 1


async def test_every_address_refused_defers_with_no_answer(world: World) -> None:
    domain = "all-refused.test"
    host = f"mx1.{domain}"
    world.mx_record(domain, (10, host))
    world.dns.add(host, "A", world.allocate_ip())
    outcome = _only(await _attempt(world, domain, _lookup(domain, None)))
    assert isinstance(outcome, Deferred), outcome
    assert outcome.reason.status == "4.4.1"
    assert outcome.reason.tlsrpt is None


async def test_implicit_mx_is_the_domain_itself(world: World) -> None:
    # SMTP-03, STS-87: no MX records; the domain's A record and its name for the policy.
    domain = "implicit-mx.test"
    sink = await world.add_mx(domain, world.allocate_ip())
    outcome = _only(await _attempt(world, domain, _lookup(domain, Mode.ENFORCE, mx=(domain,))))
    assert isinstance(outcome, Delivered), outcome
    assert outcome.reason.hop is not None
    assert outcome.reason.hop.verified
    assert sink.messages[0].sni == domain
    refused = _only(await _attempt(world, domain, _lookup(domain, Mode.ENFORCE)))
    assert isinstance(refused, Deferred), refused
    assert refused.reason.tlsrpt is TlsRptResult.VALIDATION_FAILURE


async def test_mx_host_without_address_does_not_fall_back_to_domain(world: World) -> None:
    # SMTP-04
    domain = "mx-noaddr.test"
    world.mx_record(domain, (10, f"nohost.{domain}"))
    sink = await world.add_mx(domain, world.allocate_ip(), starttls=False)
    outcome = _only(await _attempt(world, domain, _lookup(domain, None)))
    assert isinstance(outcome, Deferred), outcome
    assert sink.connections == 0


async def test_body_is_sent_with_crlf_and_dot_stuffing(world: World) -> None:
    # SMTP-14, SMTP-15: the sink un-stuffs, so the line arrives intact; no bare LF.
    domain = "dots.test"
    sink = await world.sts_domain(domain, mode=None)
    data = b"Subject: dots\n\n.hidden\r\nlast line\n"
    outcome = _only(await _attempt(world, domain, _lookup(domain, None), data=data))
    assert isinstance(outcome, Delivered), outcome
    received = sink.messages[0].data
    assert b"\r\n.hidden\r\n" in received
    assert b"\n" not in received.replace(b"\r\n", b"")


async def test_silent_server_times_out_and_defers(world: World, silent_ip: SilentHost) -> None:
    silent_server, _ = silent_ip
    domain = "silent.test"
    world.mx_record(domain, (10, f"mx1.{domain}"))
    world.dns.add(f"mx1.{domain}", "A", silent_server)
    outcomes = await _attempt(world, domain, _lookup(domain, None), connect_timeout=0.5)
    outcome = _only(outcomes)
    assert isinstance(outcome, Deferred), outcome
    assert outcome.reason.status.startswith("4.")
