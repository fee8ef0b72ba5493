"""`sts-relay health`: is the relay that this configuration describes taking mail? For the
Docker image's HEALTHCHECK, and for any supervisor.

Reads the effective configuration exactly as `serve` does (defaults file, TOML file,
environment), so it asks wherever the metrics address is set. With `metrics.address` set it
asks `/readyz` there (200: the listener accepts and the store is writable; a 503 carries
the reason); with metrics off it checks that the first SMTP listen address greets with 220
(then says QUIT). A wildcard host (0.0.0.0, ::) is asked on loopback. One line of output;
exit 0 healthy, 1 not.
"""

from __future__ import annotations

import asyncio
import sys

from relay.cli.output import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from relay.config import Config, format_hostport, parse_hostport

TIMEOUT_S = 4.0  # inside the image's HEALTHCHECK --timeout=5s
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 (matched, not bound)


def _target(address: str) -> tuple[str, int]:
    host, port = parse_hostport(address)
    return _WILDCARDS.get(host, host), port


async def _readyz(host: str, port: int) -> tuple[bool, str]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: sts-relay\r\nConnection: close\r\n\r\n")
        await writer.drain()
        raw = await reader.read(4096)
    finally:
        writer.close()
    head, _, body = raw.decode("latin-1").partition("\r\n\r\n")
    status = head.split(" ", 2)[1] if head.startswith("HTTP/") and " " in head else "?"
    return status == "200", f"/readyz {status} {' '.join(body.split())[:200]}".rstrip()


async def _greeting(host: str, port: int) -> tuple[bool, str]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        line = (await reader.readline()).decode("latin-1").strip()
        if line.startswith("220"):
            writer.write(b"QUIT\r\n")
            await writer.drain()
    finally:
        writer.close()
    return line.startswith("220"), f"SMTP greeting {line[:200]!r}"


async def check_health(cfg: Config, within: float = TIMEOUT_S) -> tuple[int, str]:
    """(exit status, one line saying why)."""
    address = cfg.metrics.address or cfg.listen.addresses[0]
    what = "metrics.address" if cfg.metrics.address else "listen.addresses"
    host, port = _target(address)
    if port == 0:
        return EXIT_USAGE, f"{what} {address} has port 0 (chosen at start): give it a fixed port"
    where = format_hostport(host, port)
    try:
        async with asyncio.timeout(within):
            if cfg.metrics.address:
                ok, detail = await _readyz(host, port)
            else:
                ok, detail = await _greeting(host, port)
    except TimeoutError:
        return EXIT_FAILURE, f"unhealthy: {where} did not answer within {within:g} s"
    except OSError as exc:
        return EXIT_FAILURE, f"unhealthy: {where}: {exc.strerror or exc}"
    return (
        EXIT_OK if ok else EXIT_FAILURE
    ), f"{'healthy' if ok else 'unhealthy'}: {where} {detail}"


def run_health(cfg: Config) -> int:
    status, line = asyncio.run(check_health(cfg))
    if status == EXIT_OK:
        print(line)
    else:
        print(f"sts-relay: {line}", file=sys.stderr)
    return status
