"""Memory of a serving relay under unfinished DATA (issue 11 item 1), through `sts-relay serve`.

Rounds of sessions that send a large DATA without the final dot and then disconnect: the
relay's resident memory must come back near where it started, round after round (the DATA
buffers were kept alive by a reference cycle through the session task's exception until a
full garbage collection). And the bound on DATA held by all sessions together:
`listen.max_data_in_flight`, past which a new DATA gets 451 4.3.1.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import RelayProcess
from tests.integration.test_listener import Client
from tests.support.waiting import eventually

MIB = 1 << 20
_LINE = b"x" * 998 + b"\r\n"
_CHUNK = _LINE * (MIB // len(_LINE))  # about 1 MiB of ordinary lines


def rss(pid: int) -> int:
    """Resident memory of process `pid` in bytes (VmRSS, /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _until(predicate: Callable[[], bool], within: float) -> None:
    """Poll until `predicate()` or `within` seconds pass; the caller asserts on the figures."""
    with contextlib.suppress(AssertionError):
        await eventually(predicate, timeout=within, interval=0.1)


@asynccontextmanager
async def in_data(relay: RelayProcess) -> AsyncIterator[Client]:
    """A session of the trusted client that has just been told 354."""
    async with Client.connect(address=(relay.host, relay.port)) as c:
        await c.hello()
        assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n"))[:3] == "250"
        assert (await c.cmd(b"RCPT TO:<u@memory.test>\r\n"))[:3] == "250"
        assert (await c.cmd(b"DATA\r\n"))[:3] == "354"
        yield c


async def _unfinished(relay: RelayProcess, size_mib: int, sent: asyncio.Event) -> None:
    """Send `size_mib` MiB of DATA, never the final dot; disconnect once `sent` is set."""
    async with in_data(relay) as c:
        c.writer.write(b"Subject: never finished\r\n\r\n")
        for _ in range(size_mib):
            c.writer.write(_CHUNK)
            await c.writer.drain()
        await sent.wait()
        c.writer.transport.abort()  # the client just goes away


async def test_memory_of_unfinished_data_comes_back(start_relay: StartRelay) -> None:
    relay = await start_relay()
    # Warm up the paths a DATA takes, then measure where the relay stands.
    done = asyncio.Event()
    done.set()
    await _unfinished(relay, 1, done)
    await asyncio.sleep(0.5)
    before = rss(relay.pid)
    sessions, size_mib = 8, 20
    held = sessions * size_mib * MIB
    peaks, afters = [], []
    for _ in range(3):
        release = asyncio.Event()
        tasks = [
            asyncio.create_task(_unfinished(relay, size_mib, release)) for _ in range(sessions)
        ]
        # Every transfer is in the relay's memory (most of it; some may sit in sockets).
        await _until(lambda: rss(relay.pid) >= before + held * 3 // 4, within=60)
        peaks.append(rss(relay.pid))
        release.set()
        await asyncio.gather(*tasks)
        await _until(lambda: rss(relay.pid) <= before + 64 * MIB, within=20)
        afters.append(rss(relay.pid))
    report = (
        f"RSS before {before / MIB:.0f} MiB, peaks {[round(p / MIB) for p in peaks]} MiB,"
        f" after each round {[round(a / MIB) for a in afters]} MiB"
    )
    print(report)  # the measured figures, for the record (pytest -s shows them)
    assert all(p >= before + held // 2 for p in peaks), report  # the DATA was really held
    assert all(a <= before + 64 * MIB for a in afters), report
    assert relay.find(event="received") == []
    assert relay.find(event="session_error") == []


async def _data_reply(relay: RelayProcess) -> str:
    """MAIL, RCPT, DATA in a new session: the reply to DATA (an empty message if 354)."""
    async with Client.connect(address=(relay.host, relay.port)) as c:
        await c.hello()
        assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n"))[:3] == "250"
        assert (await c.cmd(b"RCPT TO:<u@memory.test>\r\n"))[:3] == "250"
        reply = await c.cmd(b"DATA\r\n")
        if reply.startswith("354"):
            assert (await c.cmd(b".\r\n"))[:3] == "250"
        return reply


async def _until_reply(code: str, attempt: Callable[[], Awaitable[str]]) -> str:
    """Repeat `attempt` (for up to 30 s) until its reply starts with `code`; that reply."""
    reply = ""
    for _ in range(300):
        reply = await attempt()
        if reply.startswith(code):
            return reply
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {code} reply within 30 s (last: {reply!r})")


async def test_data_held_by_all_sessions_is_bounded(start_relay: StartRelay) -> None:
    # Two unfinished transfers of 3 chunks each fill the budget to the byte.
    held_each = len(b"Subject: never finished\r\n\r\n") + 3 * len(_CHUNK)
    relay = await start_relay(
        listen={"max_message_size": 4 * MIB, "max_data_in_flight": 2 * held_each}
    )
    full = "451 4.3.1 Insufficient system storage, try again later"
    first, second = asyncio.Event(), asyncio.Event()
    tasks = [
        asyncio.create_task(_unfinished(relay, 3, first)),
        asyncio.create_task(_unfinished(relay, 3, second)),
    ]
    try:
        # Once both are held, a new DATA is refused before any of it is sent.
        assert await _until_reply("451", lambda: _data_reply(relay)) == full
        first.set()
        await tasks[0]
        await _until_reply("354", lambda: _data_reply(relay))
        # Room for 3 chunks again: a DATA of 4 does not fit. It is told so after its end
        # (it kept nothing meanwhile), and the session goes on.
        big = b"Subject: big\r\n\r\n" + _CHUNK * 4
        async with Client.connect(address=(relay.host, relay.port)) as c:
            await c.hello()
            assert await c.send("app@src.test", ["u@memory.test"], big) == full
            assert (await c.cmd(b"NOOP\r\n"))[:3] == "250"
            second.set()
            await tasks[1]
            await _until_reply("354", lambda: _data_reply(relay))
            reply = await c.send("app@src.test", ["u@memory.test"], big)
            assert reply.startswith("250 2.0.0 "), reply
    finally:
        first.set()
        second.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    rejected = [(e["stage"], e["code"], e["reason"]) for e in relay.find(event="rejected")]
    assert set(rejected) == {("data", "451 4.3.1", "too much data in flight")}
