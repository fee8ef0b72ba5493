"""SMTP AUTH under load on a serving relay (issue 11 items 4 and 12), through `sts-relay serve`.

Parallel password guesses: an attempt counts from the moment its check starts, so however
many arrive at once, at most `auth.max_failures` passwords are checked per client address
and `auth.max_failures_per_user` per user name (each check is an `auth_failed` "bad
credentials" event). And a flood of AUTH attempts, each an expensive scrypt check, must
not delay the store or the policy cache (asyncio's default thread pool): the hashing runs
on threads of its own, with a bound, while a trusted application keeps submitting mail that
is accepted, delivered and reported ready promptly.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from relay.users import hash_password, write_users
from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import RelayProcess
from tests.integration.test_listener import Client
from tests.support.world import World

TRUSTED = "127.0.0.1"


def _tls_settings(world: World, tmp: Path, users: dict[str, str]) -> dict[str, dict[str, Any]]:
    leaf = world.pki.ca.issue_cert("relay.test")
    cert, key = tmp / "relay-cert.pem", tmp / "relay-key.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    write_users(tmp / "users", users)
    return {
        "tls": {"cert_file": str(cert), "key_file": str(key)},
        "auth": {"users_file": str(tmp / "users")},
    }


@asynccontextmanager
async def _tls_session(relay: RelayProcess, world: World, source: str) -> AsyncIterator[Client]:
    """A session from `source` after STARTTLS and a second EHLO."""
    async with Client.connect(address=(relay.host, relay.port), source=source) as c:
        await c.hello()
        assert (await c.cmd(b"STARTTLS\r\n"))[:3] == "220"
        await c.writer.start_tls(world.pki.client_context(), server_hostname="relay.test")
        c.writer.write(b"EHLO app.example.test\r\n")
        await c.reply()
        yield c


def _plain(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\x00{user}\x00{password}".encode()) + b"\r\n"


async def _guess_all_at_once(clients: list[Client], user: str) -> list[str]:
    """Every client sends a wrong password for `user` at the same moment; their replies."""
    for c in clients:
        c.writer.write(_plain(user, "guess-" + secrets.token_hex(4)))
    await asyncio.gather(*(c.writer.drain() for c in clients))
    return [(await c.reply())[-1] for c in clients]


def _checked(relay: RelayProcess) -> int:
    """Passwords the relay checked: each wrong one is a "bad credentials" event."""
    return len(relay.find(event="auth_failed", reason="bad credentials"))


async def test_parallel_guesses_from_one_address_check_at_most_the_limit(
    world: World, start_relay: StartRelay, tmp_path: Path
) -> None:
    # The real cost (scrypt n=2^15): every check takes long enough for all to overlap.
    settings = _tls_settings(world, tmp_path, {"alice": hash_password("right")})
    settings["auth"].update(max_failures=5, max_failures_per_user=1000)
    relay = await start_relay(listen={"max_errors": 100}, **settings)
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(_tls_session(relay, world, TRUSTED)) for _ in range(20)
        ]
        replies = await _guess_all_at_once(clients, "alice")
    assert _checked(relay) <= 5, replies
    assert (
        sum(r.startswith("535 5.7.8 ") for r in replies)
        + sum(
            r == "454 4.7.0 Too many failed authentication attempts, try again later"
            for r in replies
        )
        == 20
    ), replies
    assert sum(r.startswith("454 ") for r in replies) >= 15, replies


async def test_parallel_guesses_at_one_user_from_many_addresses_check_at_most_the_limit(
    world: World, start_relay: StartRelay, tmp_path: Path
) -> None:
    settings = _tls_settings(world, tmp_path, {"alice": hash_password("right")})
    settings["auth"].update(max_failures=5, max_failures_per_user=5)
    relay = await start_relay(**settings)
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(_tls_session(relay, world, f"127.0.0.{n}"))
            for n in range(2, 22)
        ]
        replies = await _guess_all_at_once(clients, "alice")
        assert _checked(relay) <= 5, replies
        # The name is locked for now, even with its right password; another name is not.
        assert (await clients[0].cmd(_plain("alice", "right")))[:3] == "454"
        assert (await clients[1].cmd(_plain("bob", "x")))[:3] == "535"
    locked = relay.find(event="auth_failed", reason="rate limited")
    assert locked
    assert {e["user"] for e in locked} == {"alice"}


def _expensive_hash(password: str) -> str:
    """A users-file entry of the default n and r but p=4: each check costs four times the
    usual scrypt (still 32 MiB), so a handful of guesses keeps a thread pool busy."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=1 << 15, r=8, p=4, maxmem=1 << 28, dklen=32
    )
    b64 = base64.b64encode
    return f"scrypt$15$8$4${b64(salt).decode()}${b64(digest).decode()}"


async def _flood(relay: RelayProcess, world: World, source: str, stop: asyncio.Event) -> int:
    """Guess alice's password until `stop`; after a 454, pause briefly. Attempts made."""
    attempts = 0
    async with _tls_session(relay, world, source) as c:
        while not stop.is_set():
            c.writer.write(_plain("alice", "guess-" + secrets.token_hex(4)))
            async with asyncio.timeout(300):  # however slow the relay gets, keep at it
                reply = await c.reader.readline()
            attempts += 1
            if reply.startswith(b"454"):
                await asyncio.sleep(0.2)
    return attempts


async def _readyz(relay: RelayProcess) -> int:
    listening = await relay.wait_for(lambda e: e["event"] == "metrics_listening")
    host, _, port = listening["address"].rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: relay\r\n\r\n")
        raw = await reader.read()
    finally:
        writer.close()
    return int(raw.split()[1]) if raw else 0  # 0: closed without an answer


async def test_an_auth_flood_does_not_delay_mail_or_readiness(
    world: World, start_relay: StartRelay, tmp_path: Path
) -> None:
    await world.sts_domain("prompt.test")  # delivery reads and writes the policy cache
    settings = _tls_settings(world, tmp_path, {"alice": _expensive_hash("right")})
    settings["auth"].update(max_failures=1_000_000, max_failures_per_user=1_000_000)
    relay = await start_relay(
        listen={
            "trusted_networks": [f"{TRUSTED}/32"],
            "max_errors": 1_000_000,
            "untrusted_session_timeout": 600,
        },
        **settings,
    )
    stop = asyncio.Event()
    flooders = [
        asyncio.create_task(_flood(relay, world, f"127.0.0.{2 + n // 20}", stop)) for n in range(60)
    ]
    submit_s: list[float] = []
    deliver_s: list[float] = []
    ready_s: list[float] = []
    try:
        await asyncio.sleep(2)  # the flood is on
        for n in range(8):
            started = time.monotonic()
            async with asyncio.timeout(30):
                await relay.send([f"u{n}@prompt.test"])
            submit_s.append(time.monotonic() - started)
            await relay.delivery(f"u{n}@prompt.test", "sent", within=60)
            deliver_s.append(time.monotonic() - started)
            started = time.monotonic()
            async with asyncio.timeout(60):
                assert await _readyz(relay) == 200
            ready_s.append(time.monotonic() - started)
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        attempts = await asyncio.gather(*flooders, return_exceptions=True)
    report = (
        f"submitted in {[round(s, 2) for s in submit_s]} s, delivered after"
        f" {[round(s, 2) for s in deliver_s]} s, /readyz in {[round(s, 2) for s in ready_s]} s;"
        f" {sum(a for a in attempts if isinstance(a, int))} AUTH attempts,"
        f" {_checked(relay)} passwords checked"
    )
    print(report)  # the measured figures, for the record (pytest -s shows them)
    assert max(submit_s) < 5, report
    assert max(deliver_s) < 10, report
    assert max(ready_s) < 5, report
    assert _checked(relay) > 0  # the flood really made the relay hash
    assert all(isinstance(a, int) for a in attempts), attempts  # and got its answers
