"""Delivery semantics against real sinks: connection reuse and its limits, broken and
dropped connections, ESMTP parameters passed on (DSN, 8BITMIME, SMTPUTF8), MX spreading
and address families. IDs refer to /work/shared/RFC-CHECKLIST.md."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

import dns.asyncresolver
import dns.nameserver
import pytest

from mailqueue.model import DsnRequest
from policy.model import Mode, Policy, PolicyLookup
from policy.webpki import client_context, unverified_context
from relay.delivery.attempt import AttemptSettings, attempt_domain
from relay.delivery.decision import decide_tls
from relay.delivery.envelope import Envelope, xtext
from relay.delivery.mx import usable_address
from relay.delivery.outcome import Bounced, Deferred, Delivered, Outcome
from relay.delivery.pool import ConnectionPool
from tests.conftest import SilentHost
from tests.support.smtp import MxSink
from tests.support.world import World

SENDER = "app@src.test"
BODY = b"Subject: hello\r\n\r\nbody\r\n"


def _resolver(world: World) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", world.dns.port)]
    return resolver


def _settings(world: World, **changes: object) -> AttemptSettings:
    settings = AttemptSettings(
        port=world.delivery_port,
        helo="relay.test",
        verified_ctx=client_context(str(world.pki.ca_file)),
        unverified_ctx=unverified_context(),
        connect_timeout=5.0,
        command_timeout=10.0,
        dns_timeout=2.0,
        allow_loopback_mx=True,
    )
    return replace(settings, **changes)  # type: ignore[arg-type]


def _lookup(domain: str, mode: Mode | None, mx: Sequence[str] = ()) -> PolicyLookup:
    if mode is None:
        return PolicyLookup(domain=domain, policy=None, policy_id=None, source="none")
    policy = Policy(mode=mode, mx=tuple(mx) or (f"mx1.{domain}",), max_age=86400, text="(t)")
    return PolicyLookup(domain=domain, policy=policy, policy_id="1", source="cached")


class Lab:
    """attempt_domain against the world, with one pool shared by every call."""

    def __init__(self, world: World, **settings: object) -> None:
        self.world = world
        self.settings = _settings(world, **settings)
        self.pool = ConnectionPool(self.settings.pool_limits())
        self.resolver = _resolver(world)
        self.rng = random.Random(3)

    async def send(
        self,
        domain: str,
        mode: Mode | None = Mode.ENFORCE,
        *,
        rcpts: Sequence[str] | None = None,
        data: bytes = BODY,
        sender: str = SENDER,
        dsn: DsnRequest | None = None,
        mx: Sequence[str] = (),
        pooled: bool = True,
    ) -> dict[str, Outcome]:
        envelope = Envelope(sender, list(rcpts or [f"u@{domain}"]), data, dsn or DsnRequest())
        return await attempt_domain(
            domain,
            envelope,
            decision=decide_tls(_lookup(domain, mode, mx), None, tls_required_no=False),
            settings=self.settings,
            resolver=self.resolver,
            rng=self.rng,
            pool=self.pool if pooled else None,
        )


@pytest.fixture
async def lab(world: World) -> AsyncIterator[Lab]:
    lab = Lab(world)
    yield lab
    lab.pool.close_all()


def _only(outcomes: dict[str, Outcome]) -> Outcome:
    assert len(outcomes) == 1
    return next(iter(outcomes.values()))


def _verbs(sink: MxSink, session: int = 0) -> list[str]:
    return [c.split()[0] for c in sink.sessions[session].commands]


# --- connection reuse ---------------------------------------------------------------


async def test_messages_for_one_mx_share_one_verified_tls_session_with_rset(lab: Lab) -> None:
    sink = await lab.world.sts_domain("reuse.test", mode=None)
    for _ in range(5):
        outcome = _only(await lab.send("reuse.test"))
        assert isinstance(outcome, Delivered), outcome
        assert outcome.reason.hop is not None
        assert outcome.reason.hop.verified
    assert sink.connections == 1
    assert len(sink.messages) == 5
    assert all(m.tls_version is not None for m in sink.messages)
    verbs = _verbs(sink)
    assert verbs[:3] == ["EHLO", "STARTTLS", "EHLO"]
    assert verbs.count("RSET") == 4
    assert verbs.count("STARTTLS") == 1
    # RSET precedes every MAIL but the first.
    assert [verbs[i - 1] for i, v in enumerate(verbs) if v == "MAIL"][1:] == ["RSET"] * 4
    assert lab.pool.reused == 4


async def test_max_messages_per_connection(world: World) -> None:
    lab = Lab(world, max_messages_per_connection=2)
    sink = await world.sts_domain("cap.test", mode=None)
    for _ in range(5):
        assert isinstance(_only(await lab.send("cap.test")), Delivered)
    assert sink.connections == 3
    assert len(sink.messages) == 5
    lab.pool.close_all()


async def test_no_reuse_with_one_message_per_connection(world: World) -> None:
    lab = Lab(world, max_messages_per_connection=1)
    sink = await world.sts_domain("noreuse.test", mode=None)
    for _ in range(3):
        assert isinstance(_only(await lab.send("noreuse.test")), Delivered)
    assert sink.connections == 3
    assert all(v != "RSET" for s in range(3) for v in _verbs(sink, s))
    lab.pool.close_all()


async def test_verified_connection_serves_another_domain_whose_policy_lists_the_mx(
    lab: Lab,
) -> None:
    world = lab.world
    sink = await world.add_mx("mx.shared.test", world.allocate_ip())
    for domain in ("a-shared.test", "b-shared.test", "c-shared.test"):
        world.mx_record(domain, (10, "mx.shared.test"))
    shared = ("mx.shared.test",)
    assert isinstance(_only(await lab.send("a-shared.test", mx=shared)), Delivered)
    assert isinstance(_only(await lab.send("b-shared.test", mx=shared)), Delivered)
    assert sink.connections == 1
    # A domain without a policy never rides on the enforce connection, nor the reverse.
    assert isinstance(_only(await lab.send("c-shared.test", None)), Delivered)
    assert sink.connections == 2
    # A policy that does not list the MX is refused before any pooled connection is used.
    refused = _only(await lab.send("c-shared.test", mx=("mx.other.test",)))
    assert isinstance(refused, Deferred)
    assert sink.connections == 2
    assert len(sink.messages) == 3


async def test_broken_pooled_connection_is_replaced_without_a_failure(lab: Lab) -> None:
    sink = await lab.world.sts_domain("stale.test", mode=None, drop_on=frozenset({"RSET"}))
    assert isinstance(_only(await lab.send("stale.test")), Delivered)
    outcome = _only(await lab.send("stale.test"))
    assert isinstance(outcome, Delivered), outcome
    assert sink.connections == 2
    assert len(sink.messages) == 2
    assert _verbs(sink, 0)[-1] == "RSET"
    assert "RSET" not in _verbs(sink, 1)


async def test_connection_closed_by_the_server_while_idle_is_not_used(lab: Lab) -> None:
    sink = await lab.world.sts_domain("idle-closed.test", mode=None)
    assert isinstance(_only(await lab.send("idle-closed.test")), Delivered)
    await sink.stop()
    await sink.start()
    outcome = _only(await lab.send("idle-closed.test"))
    assert isinstance(outcome, Delivered), outcome
    assert sink.connections == 2


async def test_per_host_limit_holds_for_concurrent_attempts(world: World) -> None:
    lab = Lab(world, max_connections_per_host=1)
    sink = await world.sts_domain("limit.test", mode=None)
    outcomes = await asyncio.gather(*(lab.send("limit.test") for _ in range(6)))
    assert all(isinstance(_only(o), Delivered) for o in outcomes)
    assert sink.connections == 1
    assert len(sink.messages) == 6
    assert lab.pool.open_count() == 1
    lab.pool.close_all()


async def test_idle_connections_are_closed_by_the_sweep(world: World) -> None:
    lab = Lab(world)
    lab.pool.limits = replace(lab.pool.limits, idle_timeout=0.0)
    await world.sts_domain("sweep.test", mode=None)
    assert isinstance(_only(await lab.send("sweep.test")), Delivered)
    assert lab.pool.idle_count() == 1
    await lab.pool.sweep()
    assert lab.pool.idle_count() == 0
    assert lab.pool.open_count() == 0
    assert _verbs(world.sink("mx1.sweep.test"))[-1] == "QUIT"


# --- dropped and stalled connections ------------------------------------------------


@pytest.mark.parametrize("pooled", [True, False])
async def test_connection_dropped_after_the_message_defers_never_sent(
    lab: Lab, pooled: bool
) -> None:
    # Issue 4 §1, RFC 5321 §6.1: no reply to the final dot → still ours, retried later.
    domain = f"drop-data-{pooled}.test".lower()
    sink = await lab.world.sts_domain(domain, mode=None, drop_after_data=True)
    outcomes = await lab.send(domain, rcpts=[f"a@{domain}", f"b@{domain}"], pooled=pooled)
    for outcome in outcomes.values():
        assert isinstance(outcome, Deferred), outcome
        assert outcome.reason.status == "4.4.2"
    assert sink.messages == []
    assert lab.pool.idle_count() == 0
    assert lab.pool.open_count() == 0


async def test_connection_dropped_at_mail_defers(lab: Lab) -> None:
    sink = await lab.world.sts_domain("drop-mail.test", mode=None, drop_on=frozenset({"MAIL"}))
    outcome = _only(await lab.send("drop-mail.test"))
    assert isinstance(outcome, Deferred), outcome
    assert sink.messages == []


async def test_a_stalled_mx_is_not_waited_for_again_and_others_go_on(
    world: World, silent_ip: SilentHost
) -> None:
    # SMTP-13 and issue 4 §5: a dead MX costs one timeout, not one per message.
    ip, held = silent_ip
    lab = Lab(world, connect_timeout=0.5)
    world.mx_record("stalled.test", (10, "mx1.stalled.test"))
    world.dns.add("mx1.stalled.test", "A", ip)
    good = await world.sts_domain("not-stalled.test", mode=None)
    first = lab.send("stalled.test", None)
    others = lab.send("not-stalled.test", None)
    stalled, delivered = await asyncio.gather(first, others)
    assert isinstance(_only(stalled), Deferred)
    assert isinstance(_only(delivered), Delivered)
    assert len(good.messages) == 1
    again = _only(await lab.send("stalled.test", None))
    assert isinstance(again, Deferred), again
    assert "timed out recently" in again.reason.text
    assert len(held) == 1
    lab.pool.close_all()


# --- ESMTP parameters ---------------------------------------------------------------

DSN = DsnRequest(
    ret="FULL",
    envid="abc+def",
    notify={"u@dsn.test": ("SUCCESS", "FAILURE")},
    orcpt={"u@dsn.test": "rfc822;orig@dsn.test"},
)


async def test_dsn_parameters_are_passed_on_when_the_mx_offers_dsn(lab: Lab) -> None:
    # DSN-04
    sink = await lab.world.sts_domain("dsn.test", mode=None, dsn=True)
    outcome = _only(await lab.send("dsn.test", dsn=DSN))
    assert isinstance(outcome, Delivered), outcome
    assert outcome.reason.hop is not None
    assert outcome.reason.hop.dsn
    (message,) = sink.messages
    assert "RET=FULL" in message.mail_options
    assert "ENVID=abc+2Bdef" in message.mail_options  # xtext (RFC 3461 §4)
    assert message.rcpt_options == ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;orig@dsn.test"]


async def test_dsn_parameters_are_not_sent_to_an_mx_without_dsn(lab: Lab) -> None:
    sink = await lab.world.sts_domain("dsn.test", mode=None)
    outcome = _only(await lab.send("dsn.test", dsn=DSN))
    assert isinstance(outcome, Delivered), outcome
    assert outcome.reason.hop is not None
    assert not outcome.reason.hop.dsn
    mail = next(c for c in sink.sessions[0].commands if c.startswith("MAIL"))
    rcpt = next(c for c in sink.sessions[0].commands if c.startswith("RCPT"))
    assert "RET=" not in mail
    assert "ENVID" not in mail
    assert rcpt == "RCPT TO:<u@dsn.test>"


def test_xtext() -> None:
    assert xtext("abc+def") == b"abc+2Bdef"
    assert xtext("a=b c") == b"a+3Db+20c"
    assert xtext("é") == b"+C3+A9"


@pytest.mark.parametrize("offered", [True, False])
async def test_8bit_body(lab: Lab, offered: bool) -> None:
    # Choice: without 8BITMIME the 8-bit body is sent as is (like Postfix).
    domain = "eight-bit.test"
    sink = await lab.world.sts_domain(domain, mode=None, eightbitmime=offered)
    data = "Subject: café\r\n\r\nnaïve\r\n".encode()
    outcome = _only(await lab.send(domain, data=data))
    assert isinstance(outcome, Delivered), outcome
    (message,) = sink.messages
    assert message.data.rstrip(b"\r\n") == data.rstrip(b"\r\n")
    assert ("BODY=8BITMIME" in message.mail_options) is offered


async def test_utf8_recipient_to_mx_without_smtputf8_bounces_5_6_7(lab: Lab) -> None:
    domain = "no-utf8.test"
    sink = await lab.world.sts_domain(domain, mode=None)
    outcomes = await lab.send(domain, rcpts=[f"jürgen@{domain}", f"ascii@{domain}"])
    utf8, ascii_ = outcomes[f"jürgen@{domain}"], outcomes[f"ascii@{domain}"]
    assert isinstance(utf8, Bounced), utf8
    assert utf8.reason.status == "5.6.7"
    assert isinstance(ascii_, Delivered), ascii_
    assert sink.messages[0].rcpt_tos == [f"ascii@{domain}"]


async def test_utf8_sender_to_mx_without_smtputf8_bounces_5_6_7(lab: Lab) -> None:
    domain = "no-utf8-sender.test"
    sink = await lab.world.sts_domain(domain, mode=None)
    outcome = _only(await lab.send(domain, sender="jürgen@src.test"))
    assert isinstance(outcome, Bounced), outcome
    assert outcome.reason.status == "5.6.7"
    assert sink.mail_commands == 0


async def test_utf8_recipient_to_mx_with_smtputf8_is_delivered(lab: Lab) -> None:
    domain = "utf8.test"
    sink = await lab.world.sts_domain(domain, mode=None, smtputf8=True)
    outcome = _only(await lab.send(domain, rcpts=[f"jürgen@{domain}"]))
    assert isinstance(outcome, Delivered), outcome
    (message,) = sink.messages
    assert "SMTPUTF8" in message.mail_options
    assert message.rcpt_tos == [f"jürgen@{domain}"]


# --- MX hosts and addresses ---------------------------------------------------------


async def test_equal_preference_mx_hosts_both_get_mail(world: World) -> None:
    # SMTP-02: 40 messages over MX 10 a, MX 10 b.
    lab = Lab(world)
    lab.rng = random.Random()
    a = await world.add_mx("a.equal.test", world.allocate_ip())
    b = await world.add_mx("b.equal.test", world.allocate_ip())
    world.mx_record("equal.test", (10, "a.equal.test"), (10, "b.equal.test"))
    for _ in range(40):
        assert isinstance(_only(await lab.send("equal.test", None, pooled=False)), Delivered)
    assert len(a.messages) + len(b.messages) == 40
    assert len(a.messages) >= 5
    assert len(b.messages) >= 5


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")


@needs_ipv6
async def test_ipv6_address_is_tried_first(lab: Lab) -> None:
    world = lab.world
    host = "mx1.v6.test"
    v4 = await world.add_mx(host, world.allocate_ip())
    v6 = MxSink("::1", world.delivery_port, hostname=host, cert=world.pki.server_context([host]))
    await v6.start()
    try:
        world.dns.add(host, "AAAA", "::1")
        world.mx_record("v6.test", (10, host))
        outcome = _only(await lab.send("v6.test"))
        assert isinstance(outcome, Delivered), outcome
        assert outcome.reason.hop is not None
        assert outcome.reason.hop.ip == "::1"
        assert len(v6.messages) == 1
        assert v4.messages == []
    finally:
        lab.pool.close_all()
        await v6.stop()


@needs_ipv6
async def test_ipv4_address_is_used_when_ipv6_is_refused(lab: Lab) -> None:
    # SMTP-07: every address of a host is tried (nothing listens on [::1] here).
    world = lab.world
    host = "mx1.v6-dead.test"
    v4 = await world.add_mx(host, world.allocate_ip())
    world.dns.add(host, "AAAA", "::1")
    world.mx_record("v6-dead.test", (10, host))
    outcome = _only(await lab.send("v6-dead.test"))
    assert isinstance(outcome, Delivered), outcome
    assert outcome.reason.hop is not None
    assert outcome.reason.hop.ip == v4.ip


def _own_non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))  # no packet is sent; picks the outgoing address
            address: str = sock.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_own_and_loopback_addresses_are_refused_unless_allowed() -> None:
    assert not usable_address("127.0.0.5", allow_loopback=False)
    assert not usable_address("::1", allow_loopback=False)
    assert not usable_address("0.0.0.0", allow_loopback=False)
    assert not usable_address("198.51.100.7", False, frozenset({"198.51.100.7"}))
    assert usable_address("192.0.2.1", allow_loopback=False)
    assert usable_address("127.0.0.5", allow_loopback=True)
    own = _own_non_loopback_address()
    if own is not None:
        assert not usable_address(own, allow_loopback=False)
