"""The 250 provably follows the fsync (issue 11, item 6): the system calls of a serving relay.

Crash tests SIGKILL the relay, which keeps the kernel's page cache: they would still pass
if the store stopped syncing. Here `sts-relay serve` runs under strace, and for every
message it accepted, the first write of store pages carrying its queue id (its commit) must
be followed by an fsync/fdatasync of the store (its database or WAL file), completed before
the `250 ... queued as <id>` reply starts on the client's socket.

strace comes from Debian's package; `.ci/run` installs it and sets CI_REQUIRE_STRACE=1, so
in CI a missing or unusable strace fails this test instead of skipping it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.relay_process import RelayProcess
from tests.support.world import World, to_toml

PARKED = "parked.test"  # MX lookups fail: accepted mail just waits, the trace stays small
SYSCALLS = "fsync,fdatasync,write,pwrite64,pwritev,pwritev2,sendto,sendmsg"
STORE_FILE = re.compile(r"/relay\.sqlite3(-wal)?$")
REPLY = re.compile(r'"250 2\.0\.0 Ok: queued as ([0-9A-Za-z]+)\\r\\n"')

_LINE = re.compile(r"^(\d+) +(\d+\.\d+) (.*)$")
_FULL = re.compile(r"^(\w+)\((.*)\) += (-?\d+)[^<]*<(\d+\.\d+)>$")
_UNFINISHED = re.compile(r"^(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)\) += (-?\d+)[^<]*<(\d+\.\d+)>$")
_FD = re.compile(r"^(\d+)<([^>]*)>")


@dataclass(frozen=True)
class Call:
    name: str
    start: float
    end: float  # start + the time strace measured (-T)
    fd_path: str  # what -yy says the first argument is ("" when it is no descriptor)
    args: str
    result: int


async def strace_problem() -> str | None:
    """None when strace can trace a child here, else why not."""
    strace = shutil.which("strace")
    if strace is None:
        return "strace is not installed (apt-get install -y strace; .ci/run does it)"
    probe = await asyncio.create_subprocess_exec(
        strace,
        "-f",
        "-e",
        "trace=none",
        "-o",
        os.devnull,
        sys.executable,
        "-c",
        "pass",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, err = await probe.communicate()
    if probe.returncode != 0:
        return f"strace cannot trace here: {err.decode(errors='replace').strip()}"
    return None


def parse_trace(text: str) -> list[Call]:
    """strace -f -ttt -T -yy lines as calls, unfinished/resumed halves joined."""
    calls: list[Call] = []
    pending: dict[str, tuple[float, str, str]] = {}
    for line in text.splitlines():
        head = _LINE.match(line)
        if head is None:
            continue
        pid, ts, rest = head.group(1), float(head.group(2)), head.group(3)
        if full := _FULL.match(rest):
            name, args, result, took = full.groups()
            start = ts
        elif unfinished := _UNFINISHED.match(rest):
            pending[pid] = (ts, unfinished.group(1), unfinished.group(2))
            continue
        elif resumed := _RESUMED.match(rest):
            if pid not in pending:
                continue
            start, name, args = pending.pop(pid)
            tail, result, took = resumed.group(2), resumed.group(3), resumed.group(4)
            args += tail
        else:
            continue  # signals, exits
        fd = _FD.match(args)
        path = fd.group(2) if fd else ""
        calls.append(Call(name, start, start + float(took), path, args, int(result)))
    return sorted(calls, key=lambda c: c.start)


def unsynced_replies(calls: list[Call]) -> tuple[dict[str, str], int]:
    """({queue id: what is wrong} for every 250 not preceded by a sync of its own write,
    number of 250 replies seen)."""
    replies = [
        (c, m.group(1))
        for c in calls
        if c.fd_path.startswith("TCP:") and (m := REPLY.search(c.args))
    ]
    store_writes = [
        c for c in calls if c.name.startswith("pwrite") and STORE_FILE.search(c.fd_path)
    ]
    syncs = [
        c
        for c in calls
        if c.name in ("fsync", "fdatasync") and STORE_FILE.search(c.fd_path) and c.result == 0
    ]
    wrong: dict[str, str] = {}
    for reply, queue_id in replies:
        written = [w for w in store_writes if queue_id in w.args and w.start < reply.start]
        if not written:
            wrong[queue_id] = "250 sent, but no write to the store carried its queue id before it"
            continue
        # Its own commit is the first write carrying the id (later commits may write the
        # same page again, with its row still in it): fdatasync covers all writes before it.
        first = min(written, key=lambda w: w.start)
        if not any(s.start >= first.end and s.end <= reply.start for s in syncs):
            wrong[queue_id] = "250 sent before any fsync/fdatasync of the store after its write"
    return wrong, len(replies)


class TracedRelay(RelayProcess):
    """`sts-relay serve` run under strace, writing the trace to `trace_path`."""

    def __init__(self, config_path: Path, listen: str, trace_path: Path) -> None:
        super().__init__(config_path, listen)
        self.trace_path = trace_path

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            "strace",
            "-f",
            "--seccomp-bpf",  # stop only at the traced calls: the relay stays fast enough
            "-ttt",
            "-T",
            "-yy",
            "-s",
            "8192",
            "-e",
            f"trace={SYSCALLS}",
            "-o",
            str(self.trace_path),
            sys.executable,
            "-m",
            "relay",
            "--config",
            str(self.config_path),
            "serve",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if not k.startswith("STS_RELAY_")},
        )
        self._reader = asyncio.create_task(self._read())
        await self.wait_for(lambda e: e["event"] == "listening", within=60)

    def relay_pid(self) -> int:
        """The traced relay (strace's child)."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])


async def test_every_250_follows_an_fsync_of_the_store(world: World, tmp_path: Path) -> None:
    unusable = await strace_problem()
    if unusable is not None:
        if os.environ.get("CI_REQUIRE_STRACE"):
            pytest.fail(f"CI_REQUIRE_STRACE is set and {unusable}")
        pytest.skip(unusable)
    world.dns.fail(PARKED, "MX", "servfail")
    config = world.relay_config(tmp_path / "state", queue={"retry_schedule": [3600]})
    config_path = tmp_path / "relay.toml"
    config_path.write_text(to_toml(config), encoding="utf-8")
    trace = tmp_path / "strace.txt"
    relay = TracedRelay(config_path, config["listen"]["addresses"][0], trace)
    await relay.start()
    try:
        accepted = []
        for n in range(5):  # one client after another: one commit each
            accepted.append(await relay.send([f"s{n}@{PARKED}"]))

        async def client(c: int) -> list[str]:
            return [await relay.send([f"c{c}-{n}@{PARKED}"]) for n in range(3)]

        # Concurrent clients: group commits carry several messages each.
        for replies in await asyncio.gather(*(client(c) for c in range(5))):
            accepted.extend(replies)
    finally:
        if relay._proc is not None and relay._proc.returncode is None:
            os.kill(relay.relay_pid(), signal.SIGTERM)
        assert await relay.stop() == 0
    ids = {reply.rsplit(" ", 1)[1] for reply in accepted}
    assert len(ids) == 20

    calls = parse_trace(trace.read_text(encoding="utf-8", errors="replace"))
    wrong, seen = unsynced_replies(calls)
    assert seen == 20, "the trace must show every 250 reply written on its socket"
    assert wrong == {}
