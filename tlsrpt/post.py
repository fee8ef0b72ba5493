"""HTTPS delivery of a report (RFC 8460 §5.4): one POST of the gzip'd JSON.

Owns the HTTP side of reporting through httpx with the same hardening as the policy
fetch: the caller's TLS context, no proxies from the environment, no redirects, one
deadline over the whole exchange, the response body never read beyond a small cap.
Every outcome is a value; no exception leaves this module.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from tlsrpt.report import MEDIA_TYPE_GZIP

_USER_AGENT = "sts-relay (TLSRPT)"


@dataclass(frozen=True, slots=True)
class Posted:
    status: int


@dataclass(frozen=True, slots=True)
class PostFailed:
    detail: str


async def post_report(
    uri: str,
    payload: bytes,
    *,
    addresses: Sequence[str],
    ssl_context: ssl.SSLContext,
    deadline: float = 30.0,
) -> Posted | PostFailed:
    """POST `payload` to `uri`, dialling `addresses` (resolved by the caller) in turn with
    SNI and Host set to the URI's host. 200 or 201 is success (RFC 8460 §5.4)."""
    parts = urllib.parse.urlsplit(uri)
    host = (parts.hostname or "").lower().removesuffix(".")
    try:
        port = parts.port or 443
    except ValueError:
        return PostFailed(f"bad port in {uri[:80]!r}")
    if parts.scheme.lower() != "https" or not host:
        return PostFailed(f"not an https URI: {uri[:80]!r}")
    if not addresses:
        return PostFailed(f"no address for {host}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    failures: list[str] = []
    try:
        async with asyncio.timeout(deadline), _client(ssl_context, deadline) as client:
            for address in addresses:
                outcome = await _post_one(client, host, port, path, address, payload)
                if isinstance(outcome, Posted):
                    return outcome
                failures.append(outcome.detail)
    except TimeoutError:
        failures.append(f"POST to {host} exceeded the {deadline:g} s deadline")
    return PostFailed(failures[-1] if failures else "no attempt")


def _client(ssl_context: ssl.SSLContext, deadline: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        verify=ssl_context,
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(deadline),
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=0),
    )


async def _post_one(
    client: httpx.AsyncClient, host: str, port: int, path: str, address: str, payload: bytes
) -> Posted | PostFailed:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return PostFailed(f"bad address {address!r}")
    literal = f"[{ip}]" if ip.version == 6 else str(ip)
    headers = {
        "Host": host if port == 443 else f"{host}:{port}",
        "User-Agent": _USER_AGENT,
        "Content-Type": MEDIA_TYPE_GZIP,
    }
    try:
        request = client.build_request(
            "POST",
            f"https://{literal}:{port}{path}",
            headers=headers,
            content=payload,
            extensions={"sni_hostname": host},
        )
        response = await client.send(request, stream=True)
        await response.aclose()  # the body is not needed; never read it
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, ssl.SSLError, OSError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        return PostFailed(f"POST to {host} at {address} failed: {type(exc).__name__}: {reason}")
    if response.status_code in (200, 201):
        return Posted(response.status_code)
    return PostFailed(f"POST to {host} at {address}: HTTP status {response.status_code}")
