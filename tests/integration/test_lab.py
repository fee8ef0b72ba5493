"""Proofs that each lab server behaves as the integration and end-to-end tests assume."""

from __future__ import annotations

import asyncio
import ssl
import tomllib
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.resolver
import httpx
import pytest

from tests.support.certs import TestPKI
from tests.support.dns import DnsServer
from tests.support.https import OVERSIZE_LENGTH, PolicyServer
from tests.support.smtp import MxSink
from tests.support.waiting import eventually, read_events
from tests.support.world import World, to_toml

P1 = "version: STSv1\r\nmode: enforce\r\nmx: mx1.d.test\r\nmax_age: 86400\r\n"


# -- DNS ---------------------------------------------------------------------------------


def resolver_for(server: DnsServer, lifetime: float = 2.0) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [server.address[0]]
    resolver.port = server.address[1]
    resolver.lifetime = lifetime
    resolver.timeout = lifetime
    return resolver


async def test_dns_answers_mx_a_and_multi_string_txt(dns_server: DnsServer) -> None:
    dns_server.add("d.test", "MX", "10 mx1.d.test.")
    dns_server.add("mx1.d.test", "A", "127.0.0.11")
    dns_server.txt("_mta-sts.d.test", ("v=STSv1; ", "id=1"))
    resolver = resolver_for(dns_server)

    mx = await resolver.resolve("d.test", "MX")
    assert [(r.preference, r.exchange.to_text()) for r in mx] == [(10, "mx1.d.test.")]
    a = await resolver.resolve("MX1.D.TEST.", "A")
    assert [r.address for r in a] == ["127.0.0.11"]
    txt = await resolver.resolve("_mta-sts.d.test", "TXT")
    assert [r.strings for r in txt] == [(b"v=STSv1; ", b"id=1")]
    assert ("_mta-sts.d.test", "TXT") in dns_server.queries
    assert dns_server.queried("mx1.d.test", "A")


async def test_dns_follows_cname_chain(dns_server: DnsServer) -> None:
    dns_server.add("_mta-sts.c.test", "CNAME", "_mta-sts.hop.test.")
    dns_server.add("_mta-sts.hop.test", "CNAME", "sts.provider.test.")
    dns_server.txt("sts.provider.test", "v=STSv1; id=7")
    answer = await resolver_for(dns_server).resolve("_mta-sts.c.test", "TXT")
    assert [r.strings for r in answer] == [(b"v=STSv1; id=7",)]
    assert answer.canonical_name.to_text() == "sts.provider.test."
    assert len(answer.response.answer) == 3


async def test_dns_nxdomain_and_nodata_differ(dns_server: DnsServer) -> None:
    dns_server.add("mx1.d.test", "A", "127.0.0.11")
    resolver = resolver_for(dns_server)
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("absent.test", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        await resolver.resolve("mx1.d.test", "AAAA")
    with pytest.raises(dns.resolver.NoAnswer):  # empty non-terminal exists (RFC 8020)
        await resolver.resolve("d.test", "TXT")
    dns_server.remove("mx1.d.test")
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("mx1.d.test", "A")


async def test_dns_long_txt_falls_back_to_tcp(dns_server: DnsServer) -> None:
    records = [f"record {i} " + "x" * 200 for i in range(5)]
    dns_server.txt("big.test", *records)
    answer = await resolver_for(dns_server).resolve("big.test", "TXT")
    assert sorted(b"".join(r.strings).decode() for r in answer) == sorted(records)


async def test_dns_servfail_and_nxdomain_injection(dns_server: DnsServer) -> None:
    dns_server.txt("_mta-sts.f.test", "v=STSv1; id=1")
    resolver = resolver_for(dns_server)
    dns_server.fail("_mta-sts.f.test", "TXT", "servfail")
    with pytest.raises(dns.resolver.NoNameservers):
        await resolver.resolve("_mta-sts.f.test", "TXT")
    dns_server.fail("_mta-sts.f.test", "TXT", "nxdomain")
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("_mta-sts.f.test", "TXT")
    dns_server.clear_failure("_mta-sts.f.test", "TXT")
    answer = await resolver.resolve("_mta-sts.f.test", "TXT")
    assert answer[0].strings == (b"v=STSv1; id=1",)


@pytest.mark.parametrize("mode", ["garbage", "truncate"])
async def test_dns_malformed_replies_fail(dns_server: DnsServer, mode: str) -> None:
    dns_server.txt("_mta-sts.g.test", "v=STSv1; id=1")
    dns_server.fail("_mta-sts.g.test", "TXT", mode)  # type: ignore[arg-type]
    with pytest.raises(dns.exception.DNSException):
        await resolver_for(dns_server, lifetime=1.0).resolve("_mta-sts.g.test", "TXT")
    if mode == "truncate":
        assert dns_server.queries.count(("_mta-sts.g.test", "TXT")) >= 2  # UDP, then TCP


async def test_dns_timeout_never_answers(dns_server: DnsServer) -> None:
    dns_server.add("mx1.t.test", "A", "127.0.0.11")
    dns_server.fail("mx1.t.test", None, "timeout")
    with pytest.raises(dns.resolver.LifetimeTimeout):
        await resolver_for(dns_server, lifetime=0.5).resolve("mx1.t.test", "A")
    assert dns_server.queried("mx1.t.test", "A")


# -- certificates ------------------------------------------------------------------------


async def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, name: str) -> str:
    async def close_at_once(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(close_at_once, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname=name
        )
        version = str(writer.get_extra_info("ssl_object").version())
        writer.close()
        await writer.wait_closed()
        return version
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("names", "kind", "code"),
    [
        (["mx1.d.test"], "expired", 10),  # X509_V_ERR_CERT_HAS_EXPIRED
        (["mx1.d.test"], "future", 9),  # X509_V_ERR_CERT_NOT_YET_VALID
        (["other.test"], "good", 62),  # X509_V_ERR_HOSTNAME_MISMATCH
        (["mx1.d.test"], "self", 20),  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        (["mx1.d.test"], "cn_only", 62),  # the CN is not a name (RFC 6125)
    ],
)
async def test_cert_kinds_fail_verification(
    tmp_path: Path, names: list[str], kind: str, code: int
) -> None:
    pki = TestPKI(tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError) as excinfo:
        await _handshake(pki.server_context(names, kind), pki.client_context(), "mx1.d.test")
    assert excinfo.value.verify_code == code


@pytest.mark.parametrize("names", [["mx1.d.test"], ["*.d.test"]])
async def test_good_and_wildcard_certs_verify(tmp_path: Path, names: list[str]) -> None:
    pki = TestPKI(tmp_path)
    version = await _handshake(pki.server_context(names), pki.client_context(), "mx1.d.test")
    assert version in {"TLSv1.2", "TLSv1.3"}
    assert pki.ca_file.read_text().startswith("-----BEGIN CERTIFICATE-----")


async def test_cn_only_would_pass_a_lax_client(tmp_path: Path) -> None:
    """Shows the cn_only certificate is otherwise valid: only CN matching tells it apart."""
    pki = TestPKI(tmp_path)
    lax = pki.client_context()
    lax.hostname_checks_common_name = True
    assert await _handshake(pki.server_context(["mx1.d.test"], "cn_only"), lax, "mx1.d.test")


def legacy_client(pki: TestPKI) -> ssl.SSLContext:
    """A client that still accepts TLS 1.0/1.1, to show the tls11 kind really speaks 1.1."""
    ctx = pki.client_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


async def test_tls11_kind_speaks_only_tls11(tmp_path: Path) -> None:
    pki = TestPKI(tmp_path)
    server_ctx = pki.server_context(["mx1.d.test"], "tls11")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _handshake(server_ctx, pki.client_context(), "mx1.d.test")
    assert await _handshake(server_ctx, legacy_client(pki), "mx1.d.test") == "TLSv1.1"


# -- HTTPS policy host -------------------------------------------------------------------


@pytest.fixture
async def policy_server(tmp_path: Path) -> AsyncIterator[PolicyServer]:
    server = PolicyServer(TestPKI(tmp_path))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def client_for(server: PolicyServer, timeout: float = 5.0) -> httpx.AsyncClient:
    """httpx pointed at the lab: host name kept for SNI/Host, connection to 127.0.0.10."""
    transport = httpx.AsyncHTTPTransport(verify=server.pki.client_context())
    return httpx.AsyncClient(
        transport=_PinnedTransport(transport, server.ip),
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(timeout),
    )


class _PinnedTransport(httpx.AsyncBaseTransport):
    """Connects to the lab IP while keeping the URL's host for SNI and Host (no DNS here)."""

    def __init__(self, inner: httpx.AsyncHTTPTransport, ip: str) -> None:
        self._inner = inner
        self._ip = ip

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        request.extensions["sni_hostname"] = host
        request.url = request.url.copy_with(host=self._ip)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def policy_url(server: PolicyServer, domain: str, path: str = "/.well-known/mta-sts.txt") -> str:
    return f"https://mta-sts.{domain}:{server.port}{path}"


async def test_policy_served_with_sni_and_request_log(policy_server: PolicyServer) -> None:
    policy_server.serve("d.test", P1)
    async with client_for(policy_server) as client:
        response = await client.get(policy_url(policy_server, "d.test"))
    assert response.status_code == 200
    assert response.text == P1
    assert response.headers["content-type"] == "text/plain"
    [request] = policy_server.requests
    assert (request.method, request.path, request.sni) == (
        "GET",
        "/.well-known/mta-sts.txt",
        "mta-sts.d.test",
    )
    assert request.host == "mta-sts.d.test"
    assert "user-agent" in request.headers
    assert policy_server.requests_for("d.test") == [request]


async def test_policy_status_type_and_forget(policy_server: PolicyServer) -> None:
    policy_server.serve("e.test", P1, status=404, content_type=None, headers={"X-A": "1"})
    async with client_for(policy_server) as client:
        response = await client.get(policy_url(policy_server, "e.test"))
        assert (response.status_code, response.headers.get("x-a")) == (404, "1")
        assert "content-type" not in response.headers
        policy_server.serve("e.test", P1)
        assert (await client.get(policy_url(policy_server, "e.test"))).status_code == 200
        policy_server.forget("e.test")
        assert (await client.get(policy_url(policy_server, "e.test"))).status_code == 404


@pytest.mark.parametrize(
    ("kind", "names", "code"),
    [("expired", None, 10), ("self", None, 20), ("good", ["wrong.test"], 62)],
)
async def test_policy_host_certificates(
    policy_server: PolicyServer, kind: str, names: list[str] | None, code: int
) -> None:
    policy_server.serve("c.test", P1, cert=kind)
    if names:
        policy_server.cert_names("mta-sts.c.test", names)
    async with client_for(policy_server) as client:
        with pytest.raises(httpx.ConnectError) as excinfo:
            await client.get(policy_url(policy_server, "c.test"))
    cause = excinfo.value.__context__
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__context__
    assert isinstance(cause, ssl.SSLCertVerificationError)
    assert cause.verify_code == code
    assert policy_server.handshakes == ["mta-sts.c.test"]
    assert policy_server.requests == []


async def test_policy_host_tls11_only(policy_server: PolicyServer) -> None:
    policy_server.serve("old.test", P1, cert="tls11")
    async with client_for(policy_server) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(policy_url(policy_server, "old.test"))
    assert policy_server.requests == []
    _reader, writer = await asyncio.open_connection(
        policy_server.ip,
        policy_server.port,
        ssl=legacy_client(policy_server.pki),
        server_hostname="mta-sts.old.test",
    )
    assert writer.get_extra_info("ssl_object").version() == "TLSv1.1"
    writer.close()
    await writer.wait_closed()


async def test_policy_redirect_is_offered_not_followed(policy_server: PolicyServer) -> None:
    policy_server.serve("r.test", P1)
    policy_server.misbehave("r.test", "redirect")
    async with client_for(policy_server) as client:
        response = await client.get(policy_url(policy_server, "r.test"))
        assert response.status_code == 301
        assert response.headers["location"] == "https://mta-sts.r.test/p.txt"
        target = await client.get(policy_url(policy_server, "r.test", "/p.txt"))
    assert "mode: enforce" in target.text
    assert [r.path for r in policy_server.requests] == ["/.well-known/mta-sts.txt", "/p.txt"]


@pytest.mark.parametrize("mode", ["oversize", "oversize_chunked"])
async def test_policy_oversize(policy_server: PolicyServer, mode: str) -> None:
    policy_server.serve("big.test", P1)
    policy_server.misbehave("big.test", mode)  # type: ignore[arg-type]
    async with client_for(policy_server) as client:
        response = await client.get(policy_url(policy_server, "big.test"))
    assert len(response.content) == OVERSIZE_LENGTH
    assert response.content.startswith(P1.encode())
    chunked = response.headers.get("transfer-encoding") == "chunked"
    assert chunked == (mode == "oversize_chunked")
    if not chunked:
        assert response.headers["content-length"] == str(OVERSIZE_LENGTH)


@pytest.mark.parametrize("mode", ["refuse", "tls_close"])
async def test_policy_refuse_and_tls_close(policy_server: PolicyServer, mode: str) -> None:
    policy_server.serve("x.test", P1)
    policy_server.misbehave("x.test", mode)  # type: ignore[arg-type]
    async with client_for(policy_server) as client:
        with pytest.raises(httpx.TransportError):
            await client.get(policy_url(policy_server, "x.test"))
    assert policy_server.handshakes == ["mta-sts.x.test"]
    assert policy_server.requests == []


@pytest.mark.parametrize("mode", ["hang", "drip"])
async def test_policy_hang_and_drip_outlast_a_deadline(
    policy_server: PolicyServer, mode: str
) -> None:
    policy_server.serve("slow.test", P1)
    policy_server.misbehave("slow.test", mode)  # type: ignore[arg-type]
    policy_server.drip_interval = 0.05
    received = bytearray()

    async def read_all(client: httpx.AsyncClient) -> None:
        async with asyncio.timeout(1.5):
            async with client.stream("GET", policy_url(policy_server, "slow.test")) as resp:
                async for chunk in resp.aiter_raw():
                    received.extend(chunk)

    # A drip sends a byte every 0.05 s, so a 0.5 s per-read timeout never fires: only the
    # overall deadline ends the fetch (STS-26).
    async with client_for(policy_server, timeout=0.5 if mode == "drip" else 5.0) as client:
        with pytest.raises(TimeoutError):
            await read_all(client)
    assert len(policy_server.requests) == 1
    assert received == b""  # neither completed even the response head


# -- SMTP sinks --------------------------------------------------------------------------


async def test_sink_starttls_records_tls_sni_and_message(tmp_path: Path) -> None:
    pki = TestPKI(tmp_path)
    sink = MxSink("127.0.0.11", cert=pki.server_context(["mx1.d.test"]), hostname="mx1.d.test")
    await sink.start()
    try:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.11",
            port=sink.port,
            start_tls=False,
            local_hostname="relay.test",
            timeout=5,
        )
        await client.connect()
        await client.starttls(server_hostname="mx1.d.test", tls_context=pki.client_context())
        await client.sendmail("app@src.test", ["u@d.test"], b"Subject: hi\r\n\r\nbody\r\n")
        await client.quit()
    finally:
        await sink.stop()
    [message] = sink.messages
    assert message.mail_from == "app@src.test"
    assert message.rcpt_tos == ["u@d.test"]
    assert message.data == b"Subject: hi\r\n\r\nbody\r\n"
    assert message.tls_version in {"TLSv1.2", "TLSv1.3"}
    assert message.sni == "mx1.d.test"
    assert message.ehlo == "relay.test"
    assert message.peer[0] == "127.0.0.1"
    assert (sink.connections, sink.mail_commands) == (1, 1)
    [session] = sink.sessions
    assert session.sni == "mx1.d.test"
    verbs = [c.split()[0] for c in session.commands]
    assert verbs == ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


async def test_sink_scripted_replies_and_plain_smtp() -> None:
    sink = MxSink(
        "127.0.0.20",
        starttls=False,
        rcpt_replies={"gone@d.test": "550 5.1.1 no such user"},
    )
    await sink.start()
    try:
        async with aiosmtplib.SMTP(hostname="127.0.0.20", port=sink.port, start_tls=False) as c:
            assert not c.supports_extension("starttls")
            await c.mail("")  # the null sender, as a DSN uses
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
                await c.rcpt("gone@d.test")
            assert refused.value.code == 550
            await c.rcpt("u@d.test")
            await c.data(b"x\r\n")
        sink.data_reply = "451 4.3.0 try later"
        async with aiosmtplib.SMTP(hostname="127.0.0.20", port=sink.port, start_tls=False) as c:
            with pytest.raises(aiosmtplib.SMTPDataError):
                await c.sendmail("app@src.test", ["u@d.test"], b"y\r\n")
    finally:
        await sink.stop()
    [message] = sink.messages
    assert (message.mail_from, message.rcpt_tos, message.tls_version) == ("<>", ["u@d.test"], None)
    assert (sink.connections, sink.mail_commands) == (2, 2)


async def test_sink_starttls_reply(tmp_path: Path) -> None:
    pki = TestPKI(tmp_path)
    sink = MxSink(
        "127.0.0.11",
        cert=pki.server_context(["mx1.d.test"]),
        starttls_reply="454 4.7.0 TLS not available",
    )
    await sink.start()
    try:
        async with aiosmtplib.SMTP(hostname="127.0.0.11", port=sink.port, start_tls=False) as c:
            await c.ehlo()
            assert c.supports_extension("starttls")
            with pytest.raises(aiosmtplib.SMTPResponseException) as excinfo:
                await c.starttls(server_hostname="mx1.d.test", tls_context=pki.client_context())
            assert excinfo.value.code == 454
    finally:
        await sink.stop()
    assert sink.messages == []
    assert sink.mail_commands == 0


# -- the world ---------------------------------------------------------------------------


async def test_world_fixture_builds_f0(world: World, tmp_path: Path) -> None:
    sink = await world.sts_domain("d.test", ip="127.0.0.11")
    resolver = resolver_for(world.dns)
    assert [r.exchange.to_text() for r in await resolver.resolve("d.test", "MX")] == ["mx1.d.test."]
    txt = await resolver.resolve("_mta-sts.d.test", "TXT")
    assert txt[0].strings == (b"v=STSv1; id=1",)
    src = await resolver.resolve("mx.src.test", "A")
    assert [r.address for r in src] == ["127.0.0.20"]
    assert sink.port == world.bounce_sink.port == world.delivery_port
    assert world.bounce_sink.cert is None

    async with client_for(world.policy_server) as client:
        body = (await client.get(policy_url(world.policy_server, "d.test"))).text
    assert body == P1

    async with aiosmtplib.SMTP(
        hostname="127.0.0.11", port=world.delivery_port, start_tls=False
    ) as c:
        await c.starttls(server_hostname="mx1.d.test", tls_context=world.pki.client_context())
        await c.sendmail("app@src.test", ["u@d.test"], b"m\r\n")
    message = await eventually(lambda: world.sink("mx1.d.test").messages)
    assert message[0].sni == "mx1.d.test"

    config = world.relay_config(tmp_path / "state", queue={"max_lifetime": 60})
    parsed = tomllib.loads(to_toml(config))
    assert parsed == config
    assert parsed["delivery"]["port"] == world.delivery_port
    assert parsed["dns"]["nameservers"] == [world.dns.nameserver]
    assert parsed["queue"] == {"retry_schedule": [1, 2, 4], "max_lifetime": 60}


def test_to_toml_escapes_and_nests() -> None:
    config = {"a": {"s": 'q"\\\n\u00e9', "b": False, "f": 1.5, "t": {"x": [1, 2]}}, "top": 1}
    assert tomllib.loads(to_toml(config)) == config


async def test_eventually_and_read_events() -> None:
    state = {"n": 0}

    def bump() -> bool:
        state["n"] += 1
        return state["n"] >= 3

    assert await eventually(bump, timeout=2, interval=0.01)
    with pytest.raises(AssertionError, match="never"):
        await eventually(lambda: False, timeout=0.1, interval=0.01, message="never")
    events = read_events(['{"event": "received", "ts": 1}', "", b'{"event": "x"}'])
    assert [e["event"] for e in events] == ["received", "x"]
    with pytest.raises(ValueError, match="not a JSON object"):
        read_events(["Traceback (most recent call last):"])
    assert read_events(["junk", "[1]"], strict=False) == []
