"""TLS session resumption on MX connections (policy/webpki.py `ResumingContext`), against
real STARTTLS sinks with trustme certificates, under asyncio's loop and uvloop.

A resumed handshake skips OpenSSL's certificate checks, so these tests hold the rules that
keep it as strict as a full one: a session is offered only to the exact MX name it was made
for, through the context that verified it (never from an opportunistic context into a
verified one, never across two contexts), never on DANE connections (the chain is matched on
every handshake), and a failed or abandoned handshake forgets it. The MX name is checked
against the policy before any connection, resumed or not.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import dns.asyncresolver
import dns.nameserver
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailqueue.model import DsnRequest
from policy.model import Mode, Policy, PolicyLookup, TlsRptResult
from policy.webpki import (
    SESSION_LIFETIME_S,
    ResumingContext,
    SessionCache,
    client_context,
    unverified_context,
)
from relay.config import load_config
from relay.delivery.attempt import AttemptSettings, attempt_domain
from relay.delivery.client import Connection, connect, quit_politely
from relay.delivery.dane import Tlsa
from relay.delivery.decision import decide_tls
from relay.delivery.envelope import Envelope
from relay.delivery.outcome import Deferred, Delivered, Hop, Outcome
from relay.delivery.pool import ConnectionPool
from relay.delivery.tls import TlsRequirement
from relay.events import EventLog
from relay.metrics import Metrics
from tests.support.dane_lab import ca_issued
from tests.support.smtp import MxSink
from tests.support.waiting import eventually, read_events
from tests.support.world import World, to_toml

BODY = b"Subject: resume\r\n\r\nbody\r\n"
LOOPS = ("asyncio", "uvloop")


def _loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


def in_world(loop: str, tmp_path: Path, scenario: Callable[[World], Awaitable[None]]) -> None:
    """Run `scenario` against a fresh lab world on an event loop of kind `loop`."""

    async def main() -> None:
        world = World(tmp_path / "lab")
        await world.start()
        try:
            await world.add_bounce_sink()
            await scenario(world)
        finally:
            await world.stop()

    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        runner.run(main())


def _lookup(domain: str, mode: Mode | None, mx: Sequence[str] = ()) -> PolicyLookup:
    if mode is None:
        return PolicyLookup(domain=domain, policy=None, policy_id=None, source="none")
    policy = Policy(mode=mode, mx=tuple(mx) or (f"mx1.{domain}",), max_age=86400, text="(t)")
    return PolicyLookup(domain=domain, policy=policy, policy_id="1", source="cached")


class Lab:
    """attempt_domain with resuming contexts and one message per connection (no pooling:
    every message needs a new connection, hence a handshake)."""

    def __init__(self, world: World, metrics: Metrics | None = None) -> None:
        self.world = world
        self.metrics = metrics or Metrics()
        self.settings = AttemptSettings(
            port=world.delivery_port,
            helo="relay.test",
            verified_ctx=client_context(str(world.pki.ca_file), resume=True),
            unverified_ctx=unverified_context(resume=True),
            connect_timeout=5.0,
            command_timeout=10.0,
            dns_timeout=2.0,
            allow_loopback_mx=True,
            max_messages_per_connection=1,
            on_tls_handshake=self.metrics.observe_tls_handshake,
        )
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", world.dns.port)]
        self.resolver = resolver
        self.pool = ConnectionPool(self.settings.pool_limits())

    @property
    def verified(self) -> ResumingContext:
        ctx = self.settings.verified_ctx
        assert isinstance(ctx, ResumingContext)
        return ctx

    @property
    def unverified(self) -> ResumingContext:
        ctx = self.settings.unverified_ctx
        assert isinstance(ctx, ResumingContext)
        return ctx

    async def send(
        self, domain: str, mode: Mode | None = Mode.ENFORCE, mx: Sequence[str] = ()
    ) -> Outcome:
        envelope = Envelope("app@src.test", [f"u@{domain}"], BODY, DsnRequest())
        outcomes = await attempt_domain(
            domain,
            envelope,
            decision=decide_tls(_lookup(domain, mode, mx), None, tls_required_no=False),
            settings=self.settings,
            resolver=self.resolver,
            rng=random.Random(1),
            pool=self.pool,
        )
        assert len(outcomes) == 1
        return next(iter(outcomes.values()))

    def handshakes(self, kind: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "sts_relay_delivery_tls_sessions_total", {"handshake": kind}
        )
        return value or 0.0


def _delivered_hop(outcome: Outcome) -> Hop:
    assert isinstance(outcome, Delivered), outcome
    hop = outcome.reason.hop
    assert hop is not None
    assert hop.tls is not None
    return hop


def _offered(ctx: ssl.SSLContext, name: str) -> ssl.SSLSession | None:
    """The session `ctx` offers to `name` when a TLS object is created (as the loop does)."""
    return ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=name).session


# --- resumption ---------------------------------------------------------------------


@pytest.mark.parametrize("tls_version", ["TLSv1.3", "TLSv1.2"])
@pytest.mark.parametrize("loop", LOOPS)
def test_a_new_connection_resumes_the_verified_session(
    loop: str, tls_version: str, tmp_path: Path
) -> None:
    async def scenario(world: World) -> None:
        sink = await world.sts_domain("resume.test")
        assert sink.cert is not None
        sink.cert.maximum_version = ssl.TLSVersion[tls_version.replace(".", "_")]
        lab = Lab(world)
        first = _delivered_hop(await lab.send("resume.test"))
        kept = lab.verified.sessions.offer("mx1.resume.test")
        assert kept is not None
        second = _delivered_hop(await lab.send("resume.test"))
        third = _delivered_hop(await lab.send("resume.test"))
        assert (first.tls_resumed, second.tls_resumed, third.tls_resumed) == (False, True, True)
        # Only a full handshake replaces the session (its deadline stays the first one's).
        assert lab.verified.sessions.offer("mx1.resume.test") is kept
        assert first.tls == second.tls == tls_version
        assert first.verified
        assert second.verified
        assert third.verified
        assert sink.connections == 3
        assert len(sink.messages) == 3
        assert all(m.sni == "mx1.resume.test" for m in sink.messages)
        assert (lab.handshakes("full"), lab.handshakes("resumed")) == (1, 2)

    in_world(loop, tmp_path, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_session_is_offered_to_its_own_name_only(loop: str, tmp_path: Path) -> None:
    """One server, one certificate for two names (so it could resume either): a session
    made for mx1.a.test is never offered to mx1.b.test."""

    async def scenario(world: World) -> None:
        ip = world.allocate_ip()
        names = ["mx1.a-names.test", "mx1.b-names.test"]
        sink = await world.add_mx(names[0], ip, cert_names=names)
        world.dns.add(names[1], "A", ip)
        world.mx_record("a-names.test", (10, names[0]))
        world.mx_record("b-names.test", (10, names[1]))
        lab = Lab(world)
        a1 = _delivered_hop(await lab.send("a-names.test"))
        assert _offered(lab.verified, names[0]) is not None
        assert _offered(lab.verified, names[1]) is None
        assert _offered(lab.verified, names[0].upper()) is None  # the exact name only
        b1 = _delivered_hop(await lab.send("b-names.test"))
        b2 = _delivered_hop(await lab.send("b-names.test"))
        a2 = _delivered_hop(await lab.send("a-names.test"))
        assert [h.tls_resumed for h in (a1, b1, b2, a2)] == [False, False, True, True]
        assert [m.sni for m in sink.messages] == [names[0], names[1], names[1], names[0]]

    in_world(loop, tmp_path, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_opportunistic_session_never_stands_in_for_verification(
    loop: str, tmp_path: Path
) -> None:
    """A session made without verification (no policy, untrusted certificate) is kept by
    the opportunistic context only: once an enforce policy applies, the certificate is
    verified in a full handshake, and refused."""

    async def scenario(world: World) -> None:
        sink = await world.sts_domain("kinds.test", mode=None, cert_kind="self")
        lab = Lab(world)
        assert not _delivered_hop(await lab.send("kinds.test", mode=None)).verified
        assert _delivered_hop(await lab.send("kinds.test", mode=None)).tls_resumed
        assert _offered(lab.unverified, "mx1.kinds.test") is not None
        assert _offered(lab.verified, "mx1.kinds.test") is None
        refused = await lab.send("kinds.test", Mode.ENFORCE)
        assert isinstance(refused, Deferred), refused
        assert refused.reason.tlsrpt is TlsRptResult.CERTIFICATE_NOT_TRUSTED
        assert len(sink.messages) == 2

    in_world(loop, tmp_path, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_sessions_are_not_used_across_contexts(loop: str, tmp_path: Path) -> None:
    """A verified session is not offered by another verified context (another trust store
    or relay), nor by the opportunistic context, and the reverse."""

    async def scenario(world: World) -> None:
        await world.sts_domain("contexts.test")
        one, other = Lab(world), Lab(world)
        assert not _delivered_hop(await one.send("contexts.test")).tls_resumed
        assert _offered(other.verified, "mx1.contexts.test") is None
        assert not _delivered_hop(await other.send("contexts.test")).tls_resumed
        assert _offered(one.unverified, "mx1.contexts.test") is None
        opportunistic = _delivered_hop(await one.send("contexts.test", mode=None))
        assert not opportunistic.tls_resumed
        assert not opportunistic.verified
        assert _delivered_hop(await one.send("contexts.test")).tls_resumed
        assert _delivered_hop(await one.send("contexts.test", mode=None)).tls_resumed
        # Python itself refuses a session of another context.
        session = _offered(one.verified, "mx1.contexts.test")
        assert session is not None
        with pytest.raises(ValueError, match="different SSLContext"):
            other.verified.wrap_bio(
                ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="mx1.contexts.test"
            ).session = session

    in_world(loop, tmp_path, scenario)


def _tlsa_ee(leaf_der: bytes) -> Tlsa:
    spki = (
        x509.load_der_x509_certificate(leaf_der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return Tlsa(3, 1, 1, hashlib.sha256(spki).digest())


@pytest.mark.parametrize("loop", LOOPS)
def test_dane_connections_never_resume(loop: str, tmp_path: Path) -> None:
    """With a verified session of the same MX name kept, a DANE connection still makes a
    full handshake and matches the chain the server sent (RFC 7672 §3)."""

    async def scenario(world: World) -> None:
        host = "mx1.dane-resume.test"
        cert = ca_issued(world.pki.ca, [host], tmp_path / "certs")  # WebPKI and DANE-EE
        sink = MxSink(world.allocate_ip(), world.delivery_port, hostname=host, cert=cert.context)
        await sink.start()
        world.sinks[host] = sink
        world.dns.add(host, "A", sink.ip)
        world.mx_record("dane-resume.test", (10, host))
        lab = Lab(world)
        _delivered_hop(await lab.send("dane-resume.test"))
        kept = _offered(lab.verified, host)
        assert kept is not None
        for _ in range(2):
            conn = await connect(
                sink.ip, host, TlsRequirement.DANE, lab.settings.dialer, (_tlsa_ee(cert.leaf),)
            )
            assert isinstance(conn, Connection), conn
            ssl_object = conn.smtp.ssl_object
            assert ssl_object is not None
            assert not ssl_object.session_reused
            assert not conn.tls_resumed
            assert conn.verified
            assert conn.dane is not None
            await quit_politely(conn.smtp, 5.0)
        assert lab.handshakes("full") == 3
        assert lab.handshakes("resumed") == 0
        assert _offered(lab.verified, host) is not None  # DANE neither used nor replaced it
        assert _delivered_hop(await lab.send("dane-resume.test")).tls_resumed

    in_world(loop, tmp_path, scenario)


async def test_a_session_expires_an_hour_after_its_full_handshake(world: World) -> None:
    await world.sts_domain("expire.test")
    lab = Lab(world)
    clock = Clock()
    lab.verified.sessions = SessionCache(clock=clock)
    assert not _delivered_hop(await lab.send("expire.test")).tls_resumed
    clock.now += SESSION_LIFETIME_S - 1
    assert _delivered_hop(await lab.send("expire.test")).tls_resumed
    clock.now += 1
    assert not _delivered_hop(await lab.send("expire.test")).tls_resumed
    assert _delivered_hop(await lab.send("expire.test")).tls_resumed
    assert (lab.handshakes("full"), lab.handshakes("resumed")) == (2, 2)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


# --- the checks made after a full handshake still hold ---------------------------------


async def test_a_resumable_mx_is_still_refused_by_a_policy_that_does_not_list_it(
    world: World,
) -> None:
    sink = await world.sts_domain("listed.test")
    world.mx_record("unlisted.test", (10, "mx1.listed.test"))
    world.dns.add("alias.listed.test", "A", sink.ip)  # same server, a name not in its cert
    world.mx_record("alias.test", (10, "alias.listed.test"))
    lab = Lab(world)
    _delivered_hop(await lab.send("listed.test"))
    assert _delivered_hop(await lab.send("listed.test")).tls_resumed
    # A policy that does not list the MX: refused before any connection.
    refused = await lab.send("unlisted.test", mx=("mx.unlisted.test",))
    assert isinstance(refused, Deferred), refused
    assert refused.reason.tlsrpt is TlsRptResult.VALIDATION_FAILURE
    assert sink.connections == 2
    # Listed under another name: that name gets no session, and the certificate does not
    # name it.
    mismatch = await lab.send("alias.test", mx=("alias.listed.test",))
    assert isinstance(mismatch, Deferred), mismatch
    assert mismatch.reason.tlsrpt is TlsRptResult.CERTIFICATE_HOST_MISMATCH
    assert sink.sessions[-1].sni is None or sink.sessions[-1].sni == "alias.listed.test"
    assert _delivered_hop(await lab.send("listed.test")).tls_resumed
    assert len(sink.messages) == 3


async def test_a_failed_handshake_forgets_the_session(world: World, tmp_path: Path) -> None:
    sink = await world.sts_domain("forget.test")
    lab = Lab(world)
    _delivered_hop(await lab.send("forget.test"))
    assert _offered(lab.verified, "mx1.forget.test") is not None
    # Another server at the name's address: it cannot resume (no shared ticket keys), and
    # its certificate is not trusted.
    await sink.stop()
    impostor = MxSink(
        sink.ip,
        sink.port,
        hostname="mx1.forget.test",
        cert=world.pki.server_context(["mx1.forget.test"], "self"),
    )
    await impostor.start()
    refused = await lab.send("forget.test")
    assert isinstance(refused, Deferred), refused
    assert refused.reason.tlsrpt is TlsRptResult.CERTIFICATE_NOT_TRUSTED
    assert _offered(lab.verified, "mx1.forget.test") is None
    await impostor.stop()
    await sink.start()
    assert not _delivered_hop(await lab.send("forget.test")).tls_resumed


@pytest.fixture
async def stalled_tls_ip(world: World) -> AsyncIterator[str]:
    """An MX on a fresh lab IP that agrees to STARTTLS and never does the handshake."""
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        writer.write(b"220 stalled ESMTP\r\n")
        while line := await reader.readline():
            if line.upper().startswith(b"EHLO"):
                writer.write(b"250-stalled\r\n250 STARTTLS\r\n")
            elif line.upper().startswith(b"STARTTLS"):
                writer.write(b"220 go ahead\r\n")
                await writer.drain()
                await asyncio.Event().wait()  # the handshake never comes
            await writer.drain()

    ip = world.allocate_ip()
    server = await asyncio.start_server(serve, ip, world.delivery_port)
    try:
        yield ip
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_an_abandoned_handshake_forgets_the_session(
    world: World, stalled_tls_ip: str
) -> None:
    await world.sts_domain("abandon.test")
    lab = Lab(world)
    _delivered_hop(await lab.send("abandon.test"))
    assert _offered(lab.verified, "mx1.abandon.test") is not None
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):  # the attempt's deadline cuts the handshake off
            await connect(
                stalled_tls_ip, "mx1.abandon.test", TlsRequirement.VERIFIED, lab.settings.dialer
            )
    assert _offered(lab.verified, "mx1.abandon.test") is None


# --- the relay as a whole: wiring, log field and metric --------------------------------


async def test_the_relay_logs_and_counts_resumed_sessions(world: World, tmp_path: Path) -> None:
    import aiosmtplib

    from relay.app import serve

    await world.sts_domain("wired.test")
    raw = world.relay_config(tmp_path / "state", delivery={"max_messages_per_connection": 1})
    path = tmp_path / "relay.toml"
    path.write_text(to_toml(raw), encoding="utf-8")
    cfg = load_config(path, {})
    log, stop = io.StringIO(), asyncio.Event()
    task = asyncio.create_task(serve(cfg, EventLog(log), stop))

    def deliveries() -> list[dict[str, object]]:
        events = read_events(log.getvalue().splitlines())
        return [e for e in events if e["event"] == "delivery"]

    try:
        await eventually(lambda: "listening" in log.getvalue())
        host, _, port = cfg.listen.addresses[0].rpartition(":")
        for n in range(2):
            async with aiosmtplib.SMTP(hostname=host, port=int(port), start_tls=False) as smtp:
                await smtp.sendmail("app@src.test", [f"u{n}@wired.test"], BODY)
            await eventually(lambda: len(deliveries()) > n)  # noqa: B023 - awaited here
        first, second = deliveries()
        assert (first["status"], second["status"]) == ("sent", "sent")
        assert (first["tls_resumed"], second["tls_resumed"]) == (False, True)
        assert first["verified"]
        assert second["verified"]
        metrics = next(e for e in read_events(log.getvalue().splitlines()) if "address" in e)
        assert metrics["event"] == "metrics_listening"
        reader, writer = await asyncio.open_connection(*_hostport(str(metrics["address"])))
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n")
        await writer.drain()
        body = (await reader.read()).decode()
        writer.close()
        assert 'sts_relay_delivery_tls_sessions_total{handshake="full"} 1.0' in body
        assert 'sts_relay_delivery_tls_sessions_total{handshake="resumed"} 1.0' in body
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await task


def _hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)
