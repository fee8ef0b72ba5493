"""policy.discover, policy.fetch and PolicyResolver against the lab's real DNS server and
HTTPS policy host on loopback (RFC-CHECKLIST 1.1, 1.2; STS-07, STS-34)."""

from __future__ import annotations

import ssl
from pathlib import Path

import dns.asyncresolver
import pytest

from policy.cache import PolicyCache
from policy.discover import Found, NotFound, TempFail, discover, lookup_addresses
from policy.fetch import Fetched, FetchFailed, fetch_policy
from policy.model import Mode, StsRecord, TlsRptResult
from policy.resolver import PolicyResolver
from policy.webpki import client_context
from tests.support.dns import DnsServer
from tests.support.https import REDIRECT_PATH
from tests.support.world import World, policy_body

DEADLINE = 3.0


def resolver_for(server: DnsServer, lifetime: float = 2.0) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [server.address[0]]
    resolver.port = server.address[1]
    resolver.lifetime = lifetime
    resolver.timeout = lifetime
    return resolver


def context(world: World) -> ssl.SSLContext:
    return client_context(str(world.pki.ca_file))


async def fetch(world: World, domain: str, deadline: float = DEADLINE) -> Fetched | FetchFailed:
    return await fetch_policy(
        domain,
        addresses=[world.policy_server.ip],
        ssl_context=context(world),
        port=world.policy_server.port,
        deadline=deadline,
    )


def failed(outcome: Fetched | FetchFailed, result: TlsRptResult) -> FetchFailed:
    assert isinstance(outcome, FetchFailed), outcome
    assert outcome.result is result, outcome
    assert "\n" not in outcome.detail
    return outcome


# -- fetch ---------------------------------------------------------------------------------


async def test_valid_fetch_uses_policy_host_name(world: World) -> None:
    # STS-20, STS-21, STS-35
    world.publish_policy("ok.test")
    outcome = await fetch(world, "ok.test")
    assert isinstance(outcome, Fetched), outcome
    assert outcome.policy.mode is Mode.ENFORCE
    assert outcome.policy.mx == ("mx1.ok.test",)
    assert outcome.policy.text == policy_body("enforce", ["mx1.ok.test"], 86400)
    (request,) = world.policy_server.requests_for("ok.test")
    assert (request.method, request.path) == ("GET", "/.well-known/mta-sts.txt")
    assert (request.host, request.sni) == ("mta-sts.ok.test", "mta-sts.ok.test")
    assert request.headers["host"] == f"mta-sts.ok.test:{world.policy_server.port}"
    for header in ("cookie", "authorization", "if-none-match", "if-modified-since"):
        assert header not in request.headers


async def test_no_http_cache_validators(world: World) -> None:
    # STS-26 (a): validators offered by the server are never sent back.
    world.policy_server.serve(
        "etag.test",
        policy_body("enforce", ["mx1.etag.test"], 86400),
        headers={"ETag": '"v1"', "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"},
    )
    for _ in range(2):
        assert isinstance(await fetch(world, "etag.test"), Fetched)
    second = world.policy_server.requests_for("etag.test")[1]
    assert "if-none-match" not in second.headers
    assert "if-modified-since" not in second.headers


async def test_wrong_name_certificate_is_webpki_invalid(world: World) -> None:
    # STS-22 (a): SNI and verification both use mta-sts.<domain>, not the dialled IP.
    world.publish_policy("wrongname.test")
    world.policy_server.cert_names("mta-sts.wrongname.test", ["other.test"])
    outcome = failed(await fetch(world, "wrongname.test"), TlsRptResult.STS_WEBPKI_INVALID)
    assert "certificate-host-mismatch" in outcome.detail
    assert world.policy_server.handshakes[-1] == "mta-sts.wrongname.test"
    assert world.policy_server.requests_for("wrongname.test") == []


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("self", "certificate-not-trusted"),
        ("expired", "certificate-expired"),
        ("future", "certificate-not-trusted"),
        ("cn_only", "certificate-host-mismatch"),
    ],
)
async def test_bad_certificates_are_webpki_invalid(world: World, kind: str, why: str) -> None:
    # STS-22 (b, c, d), STS-95 for the policy host
    domain = f"cert-{kind.replace('_', '-')}.test"
    world.publish_policy(domain, cert=kind)
    outcome = failed(await fetch(world, domain), TlsRptResult.STS_WEBPKI_INVALID)
    assert why in outcome.detail
    assert world.policy_server.requests_for(domain) == []


async def test_untrusted_when_ca_not_configured(world: World) -> None:
    world.publish_policy("noca.test")
    outcome = await fetch_policy(
        "noca.test",
        addresses=[world.policy_server.ip],
        ssl_context=client_context(None),
        port=world.policy_server.port,
        deadline=DEADLINE,
    )
    assert "certificate-not-trusted" in failed(outcome, TlsRptResult.STS_WEBPKI_INVALID).detail


async def test_wildcard_certificate_accepted(world: World) -> None:
    # STS-23
    world.publish_policy("wild.test")
    world.policy_server.cert_names("mta-sts.wild.test", ["*.wild.test"])
    assert isinstance(await fetch(world, "wild.test"), Fetched)


async def test_tls11_only_host_is_a_fetch_error(world: World) -> None:
    # STS-33
    world.publish_policy("old.test", cert="tls11")
    failed(await fetch(world, "old.test"), TlsRptResult.STS_POLICY_FETCH_ERROR)


@pytest.mark.parametrize("status", [404, 500, 202, 204, 206, 304])
async def test_only_status_200(world: World, status: int) -> None:
    # STS-24, STS-26 (b)
    domain = f"status{status}.test"
    world.policy_server.serve(
        domain, policy_body("enforce", [f"mx1.{domain}"], 86400), status=status
    )
    outcome = failed(await fetch(world, domain), TlsRptResult.STS_POLICY_FETCH_ERROR)
    assert str(status) in outcome.detail


async def test_redirect_not_followed(world: World) -> None:
    # STS-25
    world.publish_policy("redir.test")
    world.policy_server.misbehave("redir.test", "redirect")
    outcome = failed(await fetch(world, "redir.test"), TlsRptResult.STS_POLICY_FETCH_ERROR)
    assert "301" in outcome.detail
    paths = [r.path for r in world.policy_server.requests_for("redir.test")]
    assert paths == ["/.well-known/mta-sts.txt"]
    assert REDIRECT_PATH not in paths


@pytest.mark.parametrize(
    "content_type",
    ["text/html", "application/octet-stream", "application/json+text/plain", "text/plainx", None],
)
async def test_media_type_refused(world: World, content_type: str | None) -> None:
    # STS-27
    world.policy_server.serve(
        "type.test", policy_body("enforce", ["mx1.type.test"], 86400), content_type=content_type
    )
    failed(await fetch(world, "type.test"), TlsRptResult.STS_POLICY_FETCH_ERROR)


@pytest.mark.parametrize(
    "content_type",
    ["text/plain; charset=utf-8", "TEXT/PLAIN", "text/plain ; charset=US-ASCII; x=y"],
)
async def test_media_type_parameters_ignored(world: World, content_type: str) -> None:
    world.policy_server.serve(
        "type.test", policy_body("enforce", ["mx1.type.test"], 86400), content_type=content_type
    )
    assert isinstance(await fetch(world, "type.test"), Fetched)


@pytest.mark.parametrize("mode", ["oversize", "oversize_chunked"])
async def test_oversized_body_refused(world: World, mode: str) -> None:
    # STS-28: a truncated body is never parsed as a policy.
    world.publish_policy("big.test")
    world.policy_server.misbehave("big.test", mode)  # type: ignore[arg-type]
    outcome = failed(await fetch(world, "big.test"), TlsRptResult.STS_POLICY_FETCH_ERROR)
    assert "65536" in outcome.detail


@pytest.mark.parametrize("mode", ["drip", "hang"])
async def test_slow_server_cut_off_by_one_deadline(world: World, mode: str) -> None:
    # STS-29: per-read timeouts would never fire on a drip; the overall deadline does.
    world.publish_policy("slow.test")
    world.policy_server.misbehave("slow.test", mode)  # type: ignore[arg-type]
    world.policy_server.drip_interval = 0.1
    outcome = failed(await fetch(world, "slow.test", 1.0), TlsRptResult.STS_POLICY_FETCH_ERROR)
    assert "deadline" in outcome.detail


@pytest.mark.parametrize("mode", ["refuse", "tls_close"])
async def test_connection_failures(world: World, mode: str) -> None:
    # STS-30
    world.publish_policy("down.test")
    world.policy_server.misbehave("down.test", mode)  # type: ignore[arg-type]
    failed(await fetch(world, "down.test"), TlsRptResult.STS_POLICY_FETCH_ERROR)


async def test_invalid_body_is_policy_invalid(world: World) -> None:
    # STS-31
    world.publish_policy("garbage.test", body="garbage\r\n")
    outcome = failed(await fetch(world, "garbage.test"), TlsRptResult.STS_POLICY_INVALID)
    assert "line 1" in outcome.detail


async def test_next_address_after_refused_one(world: World) -> None:
    world.publish_policy("multi.test")
    outcome = await fetch_policy(
        "multi.test",
        addresses=["127.0.0.9", "::1", world.policy_server.ip],
        ssl_context=context(world),
        port=world.policy_server.port,
        deadline=DEADLINE,
    )
    assert isinstance(outcome, Fetched), outcome


async def test_no_address(world: World) -> None:
    outcome = await fetch_policy(
        "none.test", addresses=[], ssl_context=context(world), deadline=DEADLINE
    )
    assert "no address" in failed(outcome, TlsRptResult.STS_POLICY_FETCH_ERROR).detail


# -- discovery -----------------------------------------------------------------------------


async def test_discover_single_record(world: World) -> None:
    # STS-01, STS-04
    world.dns.txt("_mta-sts.d.test", "v=spf1 -all", "verification=abc", "v=STSv1; id=1")
    assert await discover("d.test", resolver_for(world.dns), 2.0) == Found(StsRecord("1"))
    assert world.dns.queried("_mta-sts.d.test", "TXT")


async def test_discover_multi_string_record(world: World) -> None:
    # STS-06: strings joined with nothing in between.
    world.dns.txt("_mta-sts.d.test", ("v=STSv1; id=", "abc"))
    assert await discover("d.test", resolver_for(world.dns), 2.0) == Found(StsRecord("abc"))


async def test_discover_follows_cname(world: World) -> None:
    # STS-07
    world.dns.add("_mta-sts.d.test", "CNAME", "_mta-sts.prov.test.")
    world.dns.txt("_mta-sts.prov.test", "v=STSv1; id=7")
    assert await discover("d.test", resolver_for(world.dns), 2.0) == Found(StsRecord("7"))


@pytest.mark.parametrize(
    "records",
    [
        [],
        ["v=STSv1; id=1", "v=STSv1; id=2"],  # STS-03
        ["v=STSv1; id=a_b"],  # STS-05
        ["V=STSv1; id=1"],  # STS-08
        ["v=STSv1; id=1; note=café"],  # STS-11
    ],
    ids=["nxdomain", "two-records", "bad-id", "upper-v", "non-ascii"],
)
async def test_discover_no_policy(world: World, records: list[str]) -> None:
    if records:
        world.dns.txt("_mta-sts.d.test", *records)
    assert isinstance(await discover("d.test", resolver_for(world.dns), 2.0), NotFound)


async def test_discover_nodata(world: World) -> None:
    world.dns.add("_mta-sts.d.test", "A", "127.0.0.1")
    assert isinstance(await discover("d.test", resolver_for(world.dns), 2.0), NotFound)


@pytest.mark.parametrize("mode", ["servfail", "timeout", "garbage"])
async def test_discover_temporary_failures(world: World, mode: str) -> None:
    # STS-12, STS-65: values, never exceptions.
    world.dns.txt("_mta-sts.d.test", "v=STSv1; id=1")
    world.dns.fail("_mta-sts.d.test", "TXT", mode)  # type: ignore[arg-type]
    outcome = await discover("d.test", resolver_for(world.dns, 0.5), 0.5)
    assert isinstance(outcome, TempFail), outcome
    assert "\n" not in outcome.detail


async def test_discover_bad_name_is_a_value(world: World) -> None:
    outcome = await discover("a..b", resolver_for(world.dns), 1.0)
    assert isinstance(outcome, TempFail | NotFound)


async def test_lookup_addresses(world: World) -> None:
    world.dns.add("mta-sts.d.test", "AAAA", "::1")
    world.dns.add("mta-sts.d.test", "A", "127.0.0.10")
    resolver = resolver_for(world.dns)
    assert await lookup_addresses("mta-sts.d.test", resolver, 2.0) == ["127.0.0.10", "::1"]
    assert await lookup_addresses("mta-sts.absent.test", resolver, 2.0) == []
    world.dns.fail("mta-sts.d.test", None, "timeout")
    assert await lookup_addresses("mta-sts.d.test", resolver_for(world.dns, 0.3), 0.3) == []


# -- resolver end to end -----------------------------------------------------------------


def policy_resolver(world: World, tmp_path: Path) -> PolicyResolver:
    return PolicyResolver(
        PolicyCache(tmp_path / "state.sqlite3"),
        resolver_for(world.dns),
        context(world),
        https_port=world.policy_server.port,
        fetch_deadline=DEADLINE,
        dns_timeout=2.0,
    )


async def test_resolver_fetches_then_uses_cache(world: World, tmp_path: Path) -> None:
    # STS-16, STS-60, STS-61, STS-64
    world.publish_policy("d.test")
    resolver = policy_resolver(world, tmp_path)
    first = await resolver.resolve("d.test")
    assert (first.source, first.policy_id, first.failure) == ("fetched", "1", None)
    world.policy_server.misbehave("d.test", "refuse")
    second = await resolver.resolve("d.test")
    assert (second.source, second.policy) == ("cached", first.policy)
    world.dns.remove("_mta-sts.d.test", "TXT")
    third = await resolver.resolve("d.test")
    assert (third.source, third.policy) == ("cached", first.policy)
    assert len(world.policy_server.requests_for("d.test")) == 1


async def test_resolver_txt_cname_still_fetches_from_recipient_domain(
    world: World, tmp_path: Path
) -> None:
    # STS-07: the policy host stays mta-sts.<recipient domain>.
    world.publish_policy("d.test")
    world.dns.remove("_mta-sts.d.test", "TXT")
    world.dns.add("_mta-sts.d.test", "CNAME", "_mta-sts.prov.test.")
    world.dns.txt("_mta-sts.prov.test", "v=STSv1; id=7")
    lookup = await policy_resolver(world, tmp_path).resolve("d.test")
    assert (lookup.source, lookup.policy_id) == ("fetched", "7")
    (request,) = world.policy_server.requests_for("d.test")
    assert (request.host, request.sni) == ("mta-sts.d.test", "mta-sts.d.test")


async def test_resolver_delegated_policy_host_needs_own_name(world: World, tmp_path: Path) -> None:
    # STS-34: mta-sts.d.test CNAME to the provider; the certificate names only the provider.
    world.publish_policy("d.test")
    world.dns.remove("mta-sts.d.test", "A")
    world.dns.add("mta-sts.d.test", "CNAME", "mta-sts.prov.test.")
    world.dns.add("mta-sts.prov.test", "A", world.policy_server.ip)
    world.policy_server.cert_names("mta-sts.d.test", ["mta-sts.prov.test"])
    lookup = await policy_resolver(world, tmp_path).resolve("d.test")
    assert (lookup.policy, lookup.failure) == (None, TlsRptResult.STS_WEBPKI_INVALID)


async def test_resolver_no_policy_host_address(world: World, tmp_path: Path) -> None:
    # STS-30: TXT present, no policy obtainable, nothing cached -> no policy, reported.
    world.dns.txt("_mta-sts.d.test", "v=STSv1; id=1")
    lookup = await policy_resolver(world, tmp_path).resolve("d.test")
    assert (lookup.policy, lookup.source) == (None, "none")
    assert lookup.failure is TlsRptResult.STS_POLICY_FETCH_ERROR


def _body_of_size(domain: str, size: int) -> str:
    """A valid policy padded with extension fields (RFC 8461 §3.2) to exactly `size` bytes."""
    body = policy_body("enforce", [f"mx1.{domain}"], 86400)
    line = "ext: " + "x" * 1000 + "\r\n"
    while len(body) + len(line) <= size - 12:
        body += line
    filler = size - len(body) - len("ext: \r\n")
    body += "ext: " + "y" * filler + "\r\n"
    assert len(body.encode()) == size
    return body


@pytest.mark.parametrize(("size", "accepted"), [(65536, True), (65537, False)])
async def test_size_limit_is_64_kib_exactly(world: World, size: int, accepted: bool) -> None:
    # STS-28 at the boundary: 64 KiB is allowed, one byte more is not.
    domain = f"size{size}.test"
    world.policy_server.serve(domain, _body_of_size(domain, size))
    outcome = await fetch(world, domain)
    if accepted:
        assert isinstance(outcome, Fetched), outcome
    else:
        assert "65536" in failed(outcome, TlsRptResult.STS_POLICY_FETCH_ERROR).detail
