"""The lab's MTA-STS policy host: one TLS listener serving `mta-sts.<domain>` for many domains.

Owns a minimal HTTP/1.1 server (one request per connection) on 127.0.0.10. It peeks at the
TLS ClientHello to learn the SNI before the handshake, so each host name gets its own
certificate kind and even its own TLS version range (a TLS 1.1-only host for STS-33), and so
"refuse"/"tls_close" can act before TLS. Records every request. Knows nothing about DNS or SMTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from tests.support.certs import TestPKI

POLICY_PATH: Final = "/.well-known/mta-sts.txt"
REDIRECT_PATH: Final = "/p.txt"
OVERSIZE_LENGTH: Final = 131193
Misbehaviour = Literal[
    "refuse", "hang", "drip", "oversize", "oversize_chunked", "redirect", "tls_close"
]
_REASONS: Final = {200: "OK", 301: "Moved Permanently", 404: "Not Found", 405: "Not Allowed"}
# A fatal TLS alert record: handshake_failure(40).
_HANDSHAKE_FAILURE_ALERT: Final = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])
_IO_TIMEOUT: Final = 10.0


@dataclass(frozen=True)
class RequestLog:
    method: str
    path: str
    host: str | None  # Host header without port, lower case
    sni: str | None
    headers: dict[str, str]  # header names lower case


@dataclass
class _Site:
    body: bytes
    status: int
    content_type: str | None
    headers: dict[str, str]


def enforce_policy(domain: str) -> str:
    return f"version: STSv1\r\nmode: enforce\r\nmx: mx1.{domain}\r\nmax_age: 86400\r\n"


class PolicyServer:
    """HTTPS on (ip, ephemeral port); host `mta-sts.<domain>` serves that domain's policy."""

    def __init__(self, pki: TestPKI, ip: str = "127.0.0.10") -> None:
        self.pki = pki
        self.ip = ip
        self.port = 0
        self.requests: list[RequestLog] = []
        self.handshakes: list[str | None] = []  # SNI of every ClientHello seen
        self.connections = 0
        self.drip_interval = 0.5
        self._sites: dict[str, _Site] = {}
        self._modes: dict[str, Misbehaviour] = {}
        self._kinds: dict[str, str] = {}
        self._names: dict[str, tuple[str, ...]] = {}
        self._contexts: dict[tuple[tuple[str, ...], str], ssl.SSLContext] = {}
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- configuration -------------------------------------------------------------------

    def serve(
        self,
        domain: str,
        body: str | bytes,
        *,
        status: int = 200,
        content_type: str | None = "text/plain",
        headers: dict[str, str] | None = None,
        cert: str = "good",
    ) -> None:
        """Serve `body` at https://mta-sts.<domain>/.well-known/mta-sts.txt."""
        domain = _host(domain)
        raw = body.encode() if isinstance(body, str) else body
        self._sites[domain] = _Site(raw, status, content_type, dict(headers or {}))
        self._modes.pop(domain, None)
        self.cert_kind(f"mta-sts.{domain}", cert)

    def misbehave(self, domain: str, mode: Misbehaviour) -> None:
        self._modes[_host(domain)] = mode

    def forget(self, domain: str) -> None:
        """Stop serving the domain: its requests get 404."""
        self._sites.pop(_host(domain), None)
        self._modes.pop(_host(domain), None)

    def cert_kind(self, host: str, kind: str) -> None:
        self._kinds[_host(host)] = kind

    def cert_names(self, host: str, names: Sequence[str]) -> None:
        """Present a certificate for `names` (e.g. a wrong name) when `host` is asked for."""
        self._names[_host(host)] = tuple(names)

    def requests_for(self, domain: str) -> list[RequestLog]:
        host = f"mta-sts.{_host(domain)}"
        return [r for r in self.requests if host in (r.host, r.sni)]

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.ip, self.port))
        sock.listen(128)
        sock.setblocking(False)
        self._listener = sock
        self.port = sock.getsockname()[1]
        self._spawn(self._accept_loop(sock))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _addr = await loop.sock_accept(listener)
            self.connections += 1
            self._spawn(self._connection(conn))

    # -- one connection ------------------------------------------------------------------

    async def _connection(self, conn: socket.socket) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(_IO_TIMEOUT):
                sni = _sni_from_hello(await _peek_client_hello(conn))
            self.handshakes.append(sni)
            mode = self._modes.get(sni[len("mta-sts.") :]) if sni else None
            if mode == "refuse":
                return
            if mode == "tls_close":
                conn.send(_HANDSHAKE_FAILURE_ALERT)
                return
            reader, writer = await _accept_tls(conn, self._context(sni))
            await self._exchange(reader, writer, sni)
        except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            pass  # the client's problem to notice; the lab only records
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
            conn.close()

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sni: str | None
    ) -> None:
        async with asyncio.timeout(_IO_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        request = _parse_request(head, sni)
        self.requests.append(request)
        domain = _domain_of(request.host or sni)
        mode = self._modes.get(domain) if domain else None
        if mode == "hang":
            await asyncio.Event().wait()
        if mode == "drip":
            await self._drip(writer, domain or "")
            return
        writer.write(self._response(request, domain, mode))
        await writer.drain()

    def _response(self, request: RequestLog, domain: str | None, mode: str | None) -> bytes:
        if request.method != "GET":
            return _http(405, b"", "text/plain", {})
        site = self._sites.get(domain) if domain else None
        if domain and mode == "redirect":
            if request.path == REDIRECT_PATH:
                return _http(200, enforce_policy(domain).encode(), "text/plain", {})
            if request.path == POLICY_PATH:
                location = f"https://mta-sts.{domain}{REDIRECT_PATH}"
                return _http(301, b"", "text/plain", {"Location": location})
        if domain and mode in ("oversize", "oversize_chunked") and request.path == POLICY_PATH:
            policy = site.body if site else enforce_policy(domain).encode()
            body = _padded(policy)
            return _http(200, body, "text/plain", {}, chunked=mode == "oversize_chunked")
        if site is None or request.path != POLICY_PATH:
            return _http(404, b"not found\n", "text/plain", {})
        return _http(site.status, site.body, site.content_type, site.headers)

    async def _drip(self, writer: asyncio.StreamWriter, domain: str) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000000\r\n\r\n"
        payload = head + enforce_policy(domain).encode()
        index = 0
        while True:
            byte = payload[index : index + 1] if index < len(payload) else b"#"
            index += 1
            writer.write(byte)
            await writer.drain()
            await asyncio.sleep(self.drip_interval)

    def _context(self, sni: str | None) -> ssl.SSLContext:
        host = sni or "policy.test"
        names = self._names.get(host, (host,))
        kind = self._kinds.get(host, "good")
        key = (names, kind)
        if key not in self._contexts:
            self._contexts[key] = self.pki.server_context(names, kind)
        return self._contexts[key]


def _host(name: str) -> str:
    return name.strip().lower().rstrip(".")


def _domain_of(host: str | None) -> str | None:
    if host and host.startswith("mta-sts."):
        return host[len("mta-sts.") :]
    return None


def _parse_request(head: bytes, sni: str | None) -> RequestLog:
    lines = head.decode("latin-1").split("\r\n")
    method, path, _version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    host = headers.get("host")
    if host is not None:
        host = _host(host.rsplit(":", 1)[0] if not host.endswith("]") else host)
    return RequestLog(method, path, host, sni, headers)


def _http(
    status: int,
    body: bytes,
    content_type: str | None,
    extra: dict[str, str],
    *,
    chunked: bool = False,
) -> bytes:
    fields: dict[str, str] = {}
    if content_type is not None:
        fields["Content-Type"] = content_type
    if chunked:
        fields["Transfer-Encoding"] = "chunked"
        step = 8192
        body = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + step]), body[i : i + step])
            for i in range(0, len(body), step)
        )
        body += b"0\r\n\r\n"
    else:
        fields["Content-Length"] = str(len(body))
    fields["Connection"] = "close"
    lowered = {k.lower() for k in extra}
    fields = {k: v for k, v in fields.items() if k.lower() not in lowered} | extra
    head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    return head.encode("latin-1") + body


def _padded(policy: bytes) -> bytes:
    """A valid policy, then an extension line padding the body to OVERSIZE_LENGTH bytes."""
    prefix = policy + b"x-padding: "
    return prefix + b"a" * (OVERSIZE_LENGTH - len(prefix) - 2) + b"\r\n"


async def _accept_tls(
    conn: socket.socket, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.connect_accepted_socket(
        lambda: protocol, conn, ssl=context, ssl_handshake_timeout=_IO_TIMEOUT
    )
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def _peek_client_hello(conn: socket.socket) -> bytes:
    """The first TLS record, read with MSG_PEEK so the handshake still sees it."""
    data = b""
    while True:
        try:
            data = conn.recv(16384 + 5, socket.MSG_PEEK)
        except BlockingIOError:
            data = data or b""
        else:
            if not data:
                raise ConnectionResetError("closed before ClientHello")
        if len(data) >= 5 and len(data) >= 5 + struct.unpack("!H", data[3:5])[0]:
            return data
        await asyncio.sleep(0.005)


def _sni_from_hello(record: bytes) -> str | None:
    """server_name from a ClientHello record (RFC 8446 §4.1.2, RFC 6066 §3), if present."""
    try:
        return _parse_sni(record)
    except (IndexError, struct.error, UnicodeDecodeError):
        return None


def _parse_sni(record: bytes) -> str | None:
    if len(record) < 9 or record[0] != 0x16 or record[5] != 0x01:
        return None
    pos = 9 + 2 + 32  # record + handshake headers, legacy_version, random
    pos += 1 + record[pos]  # session id
    pos += 2 + struct.unpack("!H", record[pos : pos + 2])[0]  # cipher suites
    pos += 1 + record[pos]  # compression methods
    end = pos + 2 + struct.unpack("!H", record[pos : pos + 2])[0]
    pos += 2
    while pos + 4 <= min(end, len(record)):
        ext_type, ext_len = struct.unpack("!HH", record[pos : pos + 4])
        pos += 4
        if ext_type == 0:  # server_name: list length, name type, name length, name
            name_len = struct.unpack("!H", record[pos + 3 : pos + 5])[0]
            return _host(record[pos + 5 : pos + 5 + name_len].decode("ascii"))
        pos += ext_len
    return None
