"""The HTTPS policy fetch (RFC 8461 §3.2, §3.3): one GET, bounded in time and size.

Owns the HTTP side of MTA-STS through httpx and turns every outcome into a value
(Fetched or FetchFailed, with its RFC 8460 result type); no exception leaves this module.
Knows nothing about DNS (the caller resolves the policy host), the cache or the relay.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from policy.model import Policy, TlsRptResult
from policy.parse import InvalidPolicy, parse_policy
from policy.webpki import classify_certificate_error

WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"
_USER_AGENT = "sts-relay (MTA-STS policy fetch)"


@dataclass(frozen=True, slots=True)
class Fetched:
    policy: Policy


@dataclass(frozen=True, slots=True)
class FetchFailed:
    result: TlsRptResult
    detail: str


class _Refused(Exception):
    """A response this module will not take as a policy (internal control flow)."""

    def __init__(self, result: TlsRptResult, detail: str) -> None:
        super().__init__(detail)
        self.failure = FetchFailed(result, detail)


async def fetch_policy(
    domain: str,
    *,
    addresses: Sequence[str],
    ssl_context: ssl.SSLContext,
    port: int = 443,
    deadline: float = 20.0,
    max_bytes: int = 65536,
) -> Fetched | FetchFailed:
    """GET https://mta-sts.<domain>/.well-known/mta-sts.txt from each address in turn.

    SNI, the Host header and certificate verification all use `mta-sts.<domain>`
    (§3.3, §7.1), whatever address is dialled. One deadline covers every attempt
    (STS-29): httpx timeouts are per phase and per read, so a slow drip defeats them.
    """
    host = f"mta-sts.{domain.lower().removesuffix('.')}"
    if not addresses:
        return FetchFailed(TlsRptResult.STS_POLICY_FETCH_ERROR, f"no address for {host}")
    failures: list[FetchFailed] = []
    try:
        async with (
            asyncio.timeout(deadline),
            _client(ssl_context, deadline) as client,
        ):
            for address in addresses:
                outcome = await _fetch_one(client, host, address, port, max_bytes)
                if isinstance(outcome, Fetched):
                    return outcome
                failures.append(outcome)
    except TimeoutError:
        failures.append(
            FetchFailed(
                TlsRptResult.STS_POLICY_FETCH_ERROR,
                f"policy fetch from {host} exceeded the {deadline:g} s deadline",
            )
        )
    return _most_telling(failures)


def _client(ssl_context: ssl.SSLContext, deadline: float) -> httpx.AsyncClient:
    # RFC 8461 §3.3: no redirects, no HTTP caching; trust_env=False so proxy variables
    # and .netrc credentials from the environment never apply (STS-35).
    return httpx.AsyncClient(
        verify=ssl_context,
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(deadline),
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=0),
    )


def _url(address: str, port: int) -> str:
    ip = ipaddress.ip_address(address)
    literal = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"https://{literal}:{port}{WELL_KNOWN_PATH}"


async def _fetch_one(
    client: httpx.AsyncClient, host: str, address: str, port: int, max_bytes: int
) -> Fetched | FetchFailed:
    try:
        url = _url(address, port)
    except ValueError:
        return FetchFailed(TlsRptResult.STS_POLICY_FETCH_ERROR, f"bad address {address!r}")
    headers = {
        "Host": host if port == 443 else f"{host}:{port}",
        "User-Agent": _USER_AGENT,
        "Accept": "text/plain",
        # Identity only: the byte cap then bounds memory (no decompression bomb).
        "Accept-Encoding": "identity",
    }
    try:
        request = client.build_request(
            "GET", url, headers=headers, extensions={"sni_hostname": host}
        )
        response = await client.send(request, stream=True)
        try:
            body = await _read_policy_body(response, max_bytes)
        finally:
            await response.aclose()
    except _Refused as refused:
        return refused.failure
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, ssl.SSLError, OSError) as exc:
        return _transport_failure(exc, host, address)
    try:
        return Fetched(parse_policy(body))
    except InvalidPolicy as exc:
        return FetchFailed(TlsRptResult.STS_POLICY_INVALID, f"invalid policy from {host}: {exc}")


async def _read_policy_body(response: httpx.Response, max_bytes: int) -> bytes:
    # RFC 8461 §3.3: only 200 is a policy (not 2xx, not 304, never a redirect target).
    if response.status_code != 200:
        raise _Refused(TlsRptResult.STS_POLICY_FETCH_ERROR, f"HTTP status {response.status_code}")
    media_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    # RFC 8461 §3.2 SHOULD (STS-27): text/plain, parameters ignored; missing is refused.
    if media_type != "text/plain":
        raise _Refused(
            TlsRptResult.STS_POLICY_FETCH_ERROR,
            f"Content-Type {media_type[:60]!r} is not text/plain",
        )
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise _Refused(
            TlsRptResult.STS_POLICY_FETCH_ERROR, f"unexpected Content-Encoding {encoding[:40]!r}"
        )
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise _Refused(
            TlsRptResult.STS_POLICY_FETCH_ERROR,
            f"Content-Length {int(declared)} exceeds {max_bytes} bytes",
        )
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > max_bytes:
            # A truncated body must never be parsed as a complete policy (STS-28).
            raise _Refused(
                TlsRptResult.STS_POLICY_FETCH_ERROR, f"policy body exceeds {max_bytes} bytes"
            )
    return bytes(body)


def _transport_failure(exc: BaseException, host: str, address: str) -> FetchFailed:
    cert_error = _find_cert_error(exc)
    if cert_error is not None:
        kind = classify_certificate_error(cert_error)
        reason = " ".join(str(cert_error.verify_message or cert_error).split())[:160]
        return FetchFailed(
            TlsRptResult.STS_WEBPKI_INVALID,
            f"certificate of {host} at {address} not valid ({kind}): {reason}",
        )
    reason = " ".join(str(exc).split())[:160] or type(exc).__name__
    return FetchFailed(
        TlsRptResult.STS_POLICY_FETCH_ERROR,
        f"fetching from {host} at {address} failed: {type(exc).__name__}: {reason}",
    )


def _find_cert_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _most_telling(failures: list[FetchFailed]) -> FetchFailed:
    # A bad certificate or body says more than a refused connection or a timeout at
    # another address; otherwise the last failure (the deadline, when it struck).
    for failure in failures:
        if failure.result is not TlsRptResult.STS_POLICY_FETCH_ERROR:
            return failure
    if failures:
        return failures[-1]
    return FetchFailed(TlsRptResult.STS_POLICY_FETCH_ERROR, "no policy fetch attempted")
