"""Session slots and lifetimes of a serving relay (issue 11 item 2), through `sts-relay serve`.

Only 127.0.0.1 is trusted here, so the other loopback addresses (127.0.0.2 and up) play
strangers: their idle flood fills the untrusted share of the slots while the trusted
application still gets its greeting and sends; a stranger that does not authenticate is
closed after `listen.untrusted_session_timeout` whatever it sends, and every session after
`listen.max_session_time`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from relay.users import hash_password, write_users
from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import RelayProcess
from tests.integration.test_listener import Client
from tests.support.world import World

TRUSTED = "127.0.0.1"
STRANGERS = [f"127.0.0.{n}" for n in range(2, 10)]
MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


async def _greeting(c: Client) -> str:
    return (await c.reply())[0]


@asynccontextmanager
async def _connected(relay: RelayProcess, source: str) -> AsyncIterator[Client]:
    async with Client.connect(address=(relay.host, relay.port), source=source) as c:
        yield c


async def test_an_idle_flood_of_strangers_leaves_the_trusted_their_slots(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(
        listen={
            "trusted_networks": [f"{TRUSTED}/32"],
            "max_sessions": 12,
            "reserved_sessions": 4,
            "max_sessions_per_client": 3,
            "untrusted_session_timeout": 120,
        }
    )
    async with AsyncExitStack() as stack:
        greetings = []
        for source in STRANGERS:  # 24 idle connections: 8 get in, 16 are refused
            for _ in range(3):
                c = await stack.enter_async_context(_connected(relay, source))
                greetings.append(await _greeting(c))
        admitted = [g for g in greetings if g.startswith("220 ")]
        refused = [g for g in greetings if g.startswith("421 4.7.0 ")]
        assert (len(admitted), len(refused)) == (8, 16), greetings
        # The flood holds every slot strangers may take; the trusted application still
        # gets its 3 sessions (its own per-address limit) at once, and sends.
        started = time.monotonic()
        trusted = [await stack.enter_async_context(_connected(relay, TRUSTED)) for _ in range(3)]
        for c in trusted:
            await c.hello()
            reply = await c.send("app@src.test", ["u@slots.test"], MESSAGE)
            assert reply.startswith("250 2.0.0 "), reply
        assert time.monotonic() - started < 10  # no waiting for a stranger's timeout
        # A stranger that connects now is still refused.
        async with _connected(relay, STRANGERS[0].replace(".2", ".10")) as late:
            assert (await _greeting(late)).startswith("421 4.7.0 ")
    assert len(relay.find(event="received")) == 3
    connects = [e for e in relay.find(event="rejected") if e["stage"] == "connect"]
    assert {e["client"] for e in connects} <= set(STRANGERS) | {"127.0.0.10"}


def _issue(world: World, tmp: Path) -> tuple[Path, Path]:
    leaf = world.pki.ca.issue_cert("relay.test")
    cert, key = tmp / "relay-cert.pem", tmp / "relay-key.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key


async def _starttls(c: Client, world: World) -> None:
    await c.hello()
    assert (await c.cmd(b"STARTTLS\r\n"))[:3] == "220"
    await c.writer.start_tls(world.pki.client_context(), server_hostname="relay.test")
    c.writer.write(b"EHLO app.example.test\r\n")
    await c.reply()


async def _noop_until_closed(c: Client, every: float) -> tuple[float, str]:
    """Send NOOP every `every` seconds until the relay answers otherwise; (seconds, reply)."""
    started = time.monotonic()
    while True:
        try:
            reply = await c.cmd(b"NOOP\r\n")
        except ConnectionError:  # closed while we slept: its last words are still to read
            reply = (await c.reader.read()).decode().splitlines()[-1]
        if not reply.startswith("250"):
            with contextlib.suppress(ConnectionError):
                await c.closed()
            return time.monotonic() - started, reply
        await asyncio.sleep(every)


async def test_strangers_must_authenticate_soon_and_no_session_lasts_forever(
    world: World, start_relay: StartRelay, tmp_path: Path
) -> None:
    cert, key = _issue(world, tmp_path)
    users = tmp_path / "users"
    write_users(users, {"app1": hash_password("s3cret", log2_n=10)})
    relay = await start_relay(
        listen={
            "trusted_networks": [f"{TRUSTED}/32"],
            "untrusted_session_timeout": 2,
            "max_session_time": 6,
        },
        tls={"cert_file": str(cert), "key_file": str(key)},
        auth={"users_file": str(users)},
    )
    login = base64.b64encode(b"\x00app1\x00s3cret")
    async with (
        _connected(relay, STRANGERS[0]) as idle,
        _connected(relay, STRANGERS[1]) as member,
        _connected(relay, TRUSTED) as app,
    ):
        await idle.hello()
        await _starttls(member, world)
        assert (await member.cmd(b"AUTH PLAIN " + login + b"\r\n"))[:3] == "235"
        await app.hello()
        # All three keep talking; none is silent long enough for the command timeout.
        idle_end, member_end, app_end = await asyncio.gather(
            _noop_until_closed(idle, 0.3),
            _noop_until_closed(member, 0.3),
            _noop_until_closed(app, 0.3),
        )
    assert idle_end[1] == "421 4.7.0 Not authenticated in time, closing connection"
    assert member_end[1] == "421 4.4.2 Session time limit reached, closing connection"
    assert app_end[1] == "421 4.4.2 Session time limit reached, closing connection"
    # The stranger went first; the authenticated one lived on like the trusted one.
    assert idle_end[0] < 5 < member_end[0]
    assert app_end[0] > 5
    reasons = sorted(e["reason"] for e in relay.find(event="rejected", stage="session"))
    assert reasons == ["session time limit", "session time limit", "untrusted session timeout"]
