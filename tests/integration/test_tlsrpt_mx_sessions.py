"""Every MX session of an attempt counts for TLS reporting (RFC 8460 §4.3, §4.4), against
real loopback sinks: a failure on one MX before a success on the next is kept, sessions
that never reached TLS are not (§4.3.4), and a pooled connection counts once per policy
domain however many messages it carries.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

import dns.asyncresolver
import dns.nameserver
import pytest

from mailqueue.model import DsnRequest
from policy.model import Mode, Policy, PolicyLookup, TlsRptResult
from policy.webpki import client_context, unverified_context
from relay.delivery.attempt import AttemptSettings, MxTlsResult, attempt_domain
from relay.delivery.decision import decide_tls
from relay.delivery.envelope import Envelope
from relay.delivery.outcome import Delivered, Outcome
from relay.delivery.overrides import OverrideRule, TlsOverride
from relay.delivery.pool import ConnectionPool
from relay.reporting import SessionRecorder
from tests.support.world import World
from tlsrpt.counter import SessionCounter
from tlsrpt.model import Failure
from tlsrpt.store import ReportStore

BODY = b"Subject: hello\r\n\r\nbody\r\n"
NOON = 1772625600.0  # 2026-03-04 12:00Z
DAY = "2026-03-04"


def _lookup(domain: str, mode: Mode | None, mx: Sequence[str]) -> PolicyLookup:
    if mode is None:
        return PolicyLookup(domain=domain, policy=None, policy_id=None, source="none")
    policy = Policy(mode=mode, mx=tuple(mx), max_age=86400, text="(t)")
    return PolicyLookup(domain=domain, policy=policy, policy_id="1", source="cached")


class Lab:
    """attempt_domain against the world with one shared pool, collecting MX sessions."""

    def __init__(self, world: World) -> None:
        self.settings = AttemptSettings(
            port=world.delivery_port,
            helo="relay.test",
            verified_ctx=client_context(str(world.pki.ca_file)),
            unverified_ctx=unverified_context(),
            connect_timeout=5.0,
            command_timeout=10.0,
            dns_timeout=2.0,
            allow_loopback_mx=True,
        )
        self.pool = ConnectionPool(self.settings.pool_limits())
        self.resolver = dns.asyncresolver.Resolver(configure=False)
        self.resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", world.dns.port)]

    async def send(
        self, domain: str, lookup: PolicyLookup, override: OverrideRule | None = None
    ) -> tuple[Outcome, list[MxTlsResult]]:
        tried: list[MxTlsResult] = []
        outcomes = await attempt_domain(
            domain,
            Envelope("app@src.test", [f"u@{domain}"], BODY, DsnRequest()),
            decision=decide_tls(lookup, override, tls_required_no=False),
            settings=self.settings,
            resolver=self.resolver,
            rng=random.Random(3),
            pool=self.pool,
            sessions=tried,
        )
        (outcome,) = outcomes.values()
        return outcome, tried


@pytest.fixture
async def lab(world: World) -> AsyncIterator[Lab]:
    lab = Lab(world)  # the world's bounce sink has already fixed the MX port
    yield lab
    lab.pool.close_all()


async def test_bad_mx_then_good_mx_gives_one_failure_and_one_success(
    world: World, lab: Lab
) -> None:
    bad = await world.add_mx("mx1.two.test", world.allocate_ip(), cert_kind="self")
    good = await world.add_mx("mx2.two.test", world.allocate_ip())
    world.mx_record("two.test", (10, "mx1.two.test"), (20, "mx2.two.test"))
    lookup = _lookup("two.test", Mode.ENFORCE, ("*.two.test",))

    outcome, tried = await lab.send("two.test", lookup)

    assert isinstance(outcome, Delivered), outcome
    assert outcome.reason.hop is not None
    assert outcome.reason.hop.mx == "mx2.two.test"
    assert tried == [
        MxTlsResult("mx1.two.test", bad.ip, TlsRptResult.CERTIFICATE_NOT_TRUSTED),
        MxTlsResult("mx2.two.test", good.ip, None),
    ]
    assert len(good.messages) == 1
    assert not bad.messages


async def test_opportunistic_override_still_reports_the_failure_against_the_published_policy(
    world: World, lab: Lab, tmp_path: Path
) -> None:
    """The operator's escape hatch delivers to an enforce domain whose certificate names
    another host, and the domain's owner still learns of it: the session counts as
    certificate-host-mismatch under its published policy, never as a success."""
    sink = await world.add_mx(
        "mx1.broken.test", world.allocate_ip(), cert_names=["mx.elsewhere.test"]
    )
    world.mx_record("broken.test", (10, "mx1.broken.test"))
    lookup = _lookup("broken.test", Mode.ENFORCE, ("mx1.broken.test",))

    outcome, tried = await lab.send("broken.test", lookup, OverrideRule(TlsOverride.OPPORTUNISTIC))

    assert isinstance(outcome, Delivered), outcome
    assert outcome.reason.tlsrpt is TlsRptResult.CERTIFICATE_HOST_MISMATCH
    assert len(sink.messages) == 1
    assert tried == [
        MxTlsResult("mx1.broken.test", sink.ip, TlsRptResult.CERTIFICATE_HOST_MISMATCH)
    ]
    store = ReportStore(tmp_path / "db.sqlite3")
    try:
        counter = SessionCounter(store)
        SessionRecorder(counter, clock=lambda: NOON).record("broken.test", lookup, tried, BODY)
        await counter.close()
        (count,) = store.counts(DAY)
        assert count.failure is not None
        assert count.failure.result is TlsRptResult.CERTIFICATE_HOST_MISMATCH
        assert count.policy.type.value == "sts"
    finally:
        store.close()


async def test_mx_outside_the_policy_and_a_refused_connection(world: World, lab: Lab) -> None:
    # mx1 is not in the policy (never contacted), mx2 refuses TCP, mx3 takes the mail.
    await world.add_mx("mx1.walk.test", world.allocate_ip())
    await world.add_mx("mx2.walk.test", world.allocate_ip())
    await world.remove_mx("mx2.walk.test")
    good = await world.add_mx("mx3.walk.test", world.allocate_ip())
    world.mx_record(
        "walk.test", (10, "mx1.walk.test"), (20, "mx2.walk.test"), (30, "mx3.walk.test")
    )
    lookup = _lookup("walk.test", Mode.ENFORCE, ("mx2.walk.test", "mx3.walk.test"))

    outcome, tried = await lab.send("walk.test", lookup)

    assert isinstance(outcome, Delivered), outcome
    # RFC 8460 §4.3.4: the refused TCP connection to mx2 is not a session.
    assert tried == [
        MxTlsResult("mx1.walk.test", "", TlsRptResult.VALIDATION_FAILURE),
        MxTlsResult("mx3.walk.test", good.ip, None),
    ]


async def test_plaintext_delivery_without_policy_is_starttls_not_supported(
    world: World, lab: Lab
) -> None:
    sink = await world.add_mx("mx1.plain.test", world.allocate_ip(), starttls=False)
    world.mx_record("plain.test", (10, "mx1.plain.test"))

    outcome, tried = await lab.send("plain.test", _lookup("plain.test", None, ()))

    assert isinstance(outcome, Delivered), outcome
    assert tried == [MxTlsResult("mx1.plain.test", sink.ip, TlsRptResult.STARTTLS_NOT_SUPPORTED)]


async def test_pooled_connection_counts_once_per_policy_domain(world: World, lab: Lab) -> None:
    # Two domains share one MX; their policies both list it, so one connection carries all.
    sink = await world.add_mx("mx.shared.test", world.allocate_ip())
    for domain in ("a.test", "b.test"):
        world.mx_record(domain, (10, "mx.shared.test"))
    counted: dict[str, list[MxTlsResult]] = {"a.test": [], "b.test": []}
    for domain in ("a.test", "a.test", "a.test", "b.test", "b.test", "a.test"):
        lookup = _lookup(domain, Mode.ENFORCE, ("mx.shared.test",))
        outcome, tried = await lab.send(domain, lookup)
        assert isinstance(outcome, Delivered), outcome
        counted[domain].extend(tried)

    assert sink.connections == 1
    assert len(sink.messages) == 6
    only = MxTlsResult("mx.shared.test", sink.ip, None)
    assert counted == {"a.test": [only], "b.test": [only]}


async def test_recorder_counts_each_mx_session(tmp_path: Path) -> None:
    store = ReportStore(tmp_path / "db.sqlite3")
    try:
        counter = SessionCounter(store)
        recorder = SessionRecorder(counter, clock=lambda: NOON)
        lookup = _lookup("two.test", Mode.ENFORCE, ("*.two.test",))
        tried = [
            MxTlsResult("MX1.two.test.", "127.0.0.31", TlsRptResult.CERTIFICATE_NOT_TRUSTED),
            MxTlsResult("mx2.two.test", "127.0.0.32", None),
        ]
        recorder.record("two.test", lookup, tried, BODY)
        await counter.close()
        counts = {
            c.failure and replace(c.failure, sending_ip=""): c.count for c in store.counts(DAY)
        }
        failure = Failure(TlsRptResult.CERTIFICATE_NOT_TRUSTED, "mx1.two.test", "127.0.0.31")
        assert counts == {None: 1, failure: 1}
    finally:
        store.close()
