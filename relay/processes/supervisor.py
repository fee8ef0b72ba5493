"""`serve` with `serve.processes` > 1: the supervisor.

It takes the serve lock, binds the listening sockets and opens the whole relay once (the
store's schema and the leases a dead relay left, the policy cache, the report and posture
tables; a broken setting fails here, before any fork), then forks the processes from an
event loop that runs nothing else yet. While they run it:
- serves `metrics.address`: the processes' figures merged (relay/processes/merge.py) and
  its own, `/readyz` ready when every process is running and says it is ready;
- on a process's death returns that process's leases to the queue at once, logs
  `process_exited` and starts another (after a pause that grows while they keep dying);
- forwards SIGHUP; on SIGTERM/SIGINT tells every process to stop (each drains within
  `delivery.shutdown_grace`), waits for them, logs `stopped` with the deliveries they cut
  off, and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, generate_latest

from mailqueue.sqlite_orphans import release_leases_of
from relay.app import (
    ConfigLoader,
    ProcessRole,
    announce_started,
    database_path,
    lease_owner,
    open_shared_store,
    running,
)
from relay.config import Config, ConfigError
from relay.event_loop import run_loop
from relay.events import EventLog
from relay.inbound.sockets import ListeningSocket, bind_listening
from relay.metrics import MetricsServer
from relay.processes import worker
from relay.processes.channel import METRICS, READYZ, STOP, Channel, ChannelBroken
from relay.processes.merge import merge_expositions
from relay.processes.shares import process_share
from relay.state import ServeLock

# A process that lived this long before dying is replaced at once; one that died sooner
# waits, from the first pause doubling up to the longest (a setting that kills every new
# process must not become a fork loop).
_STEADY_S = 10.0
_FIRST_PAUSE_S = 1.0
_LONGEST_PAUSE_S = 30.0
# Time for a process to answer a scrape or a readiness question.
_ASK_S = 5.0
# After `stop` and the drain: how long the processes get to exit before SIGKILL.
_EXIT_GRACE_S = 15.0


@dataclass
class _Process:
    role: ProcessRole
    pid: int
    owner: str
    channel: Channel
    started: float


def serve_processes(cfg: Config, events: EventLog, load: ConfigLoader, count: int) -> None:
    """`sts-relay serve` as a supervisor of `count` processes, until SIGTERM/SIGINT.

    Raises what a single-process `serve` raises before serving (StateBusy, ConfigError,
    StoreUnavailable, OSError for a port or the state directory)."""
    with ServeLock(cfg.state.path):
        sockets = bind_listening(cfg.listen)
        try:
            # Checks and prepares everything once; no thread or loop survives it.
            run_loop(_prepare(cfg), "asyncio")
            _release_freed_memory()
            supervisor = _Supervisor(cfg, events, load, count, sockets)
            run_loop(supervisor.run(), "asyncio")
        finally:
            for entry in sockets:
                entry.sock.close()


async def _prepare(cfg: Config) -> None:
    # A log of its own (the same stream), so that what the relay subscribes to it (its
    # metrics) goes with it instead of staying in the supervisor.
    events = EventLog(sys.stdout, fmt=cfg.log.format, level=cfg.log.level)
    async with running(cfg, events, sockets=()):
        pass


def _release_freed_memory() -> None:
    """Free what _prepare built (a whole relay: reference cycles, SQLite and OpenSSL
    buffers) and give the freed pages back to the system before the first fork. Kept, they
    would be shared with every process, whose first allocations land there and copy them:
    the same memory then counted once more in each process."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only; elsewhere they stay
        ctypes.CDLL(None).malloc_trim(0)


class _Supervisor:
    def __init__(
        self,
        cfg: Config,
        events: EventLog,
        load: ConfigLoader,
        count: int,
        sockets: Sequence[ListeningSocket],
    ) -> None:
        self._cfg = cfg
        self._share = process_share(cfg, count)
        self._events = events
        self._load = load
        self._count = count
        self._sockets = sockets
        self._by_pid: dict[int, _Process] = {}
        self._pause: dict[int, float] = {}
        self._stopping = False
        self._gone = asyncio.Event()  # set whenever a process was reaped
        self._aftermath: set[asyncio.Task[None]] = set()  # leases of the dead being returned
        # Queue id slots: the processes of this node take consecutive ones from a random
        # base, so that the nodes of a shared store rarely meet (mailqueue/ids.py).
        self._slot_base = secrets.randbelow(256) if cfg.state.url else 0
        self._metrics_server: MetricsServer | None = None
        registry = self._registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        self._running = Gauge(
            "sts_relay_processes", "Processes of the relay serving now.", registry=registry
        )
        self._restarts = Counter(
            "sts_relay_process_restarts",
            "Processes started again after one died.",
            registry=registry,
        )

    # -- the life of the set ---------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop, hangup = asyncio.Event(), asyncio.Event()
        received: list[str] = []

        def on_stop(sig: signal.Signals) -> None:
            received.append(sig.name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, hangup.set)
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        announce_started(self._cfg, self._events, processes=self._count)
        for index in range(self._count):
            self._spawn(index)
        abandoned = 0
        try:
            if self._cfg.metrics.address:
                self._metrics_server = MetricsServer(self._render, self._readiness)
                address = await self._metrics_server.start(self._cfg.metrics.address)
                self._events.metrics_listening(address=address)
            self._events.listening(addresses=[entry.address for entry in self._sockets])
            async with asyncio.TaskGroup() as tasks:
                forwarding = tasks.create_task(self._forward_hangups(hangup))
                await stop.wait()
                forwarding.cancel()
            self._stopping = True
            self._events.stopping(reason=received[0] if received else "signal")
            for entry in self._sockets:  # with the processes' copies, the port closes
                entry.sock.close()
            if self._metrics_server is not None:
                await self._metrics_server.stop()
            abandoned = await self._stop_all()
        finally:
            for process in list(self._by_pid.values()):  # only after an error of our own
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
        self._events.stopped(abandoned=abandoned)

    async def _stop_all(self) -> int:
        """Tell every process to stop; wait for them; the deliveries they cut off."""
        grace = self._cfg.delivery.shutdown_grace + _EXIT_GRACE_S
        answers = await asyncio.gather(
            *(self._stop_one(p, grace) for p in list(self._by_pid.values()))
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _EXIT_GRACE_S
        while self._by_pid and loop.time() < deadline:
            self._gone.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await self._gone.wait()
        for process in list(self._by_pid.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
        while self._by_pid:
            self._gone.clear()
            await self._gone.wait()
        # Each exit's leases released and its `process_exited` logged before `stopped`.
        await asyncio.gather(*self._aftermath, return_exceptions=True)
        return sum(answers)

    async def _stop_one(self, process: _Process, within: float) -> int:
        try:
            answer = await process.channel.ask(STOP, within)
        except ChannelBroken:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            return 0
        return int(answer) if answer.isdigit() else 0

    async def _forward_hangups(self, hangup: asyncio.Event) -> None:
        """SIGHUP: each process reloads (and logs `reloaded` or `reload_failed`); the TLS
        overrides read now are also what a process started later begins with."""
        while True:
            await hangup.wait()
            hangup.clear()
            for process in list(self._by_pid.values()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)
            try:
                fresh = self._load()  # a small file; no thread here (processes are forked)
            except (ConfigError, OSError):
                continue  # the processes log reload_failed
            self._share = replace(
                self._share, tls=replace(self._share.tls, overrides=fresh.tls.overrides)
            )

    # -- processes -----------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        role = ProcessRole(
            index=index,
            count=self._count,
            owner_token=secrets.token_hex(8),
            id_slot=(self._slot_base + index) % 256,
        )
        ours, theirs = socket.socketpair()
        # What the processes inherit untouched stays shared (copy-on-write) instead of
        # being copied by the first collection there.
        gc.freeze()
        pid = os.fork()
        if pid == 0:  # the new process: never returns into this loop
            status = 1
            try:
                ours.close()
                self._forget_in_child()
                status = worker.child_main(self._share, role, self._sockets, theirs, self._load)
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                os._exit(status)
        theirs.close()
        owner = lease_owner(self._cfg.delivery.hostname, pid, role.owner_token)
        process = _Process(role, pid, owner, Channel(ours), time.monotonic())
        self._by_pid[pid] = process
        self._running.set(len(self._by_pid))

    def _forget_in_child(self) -> None:
        """In a new process: close the supervisor's ends of the other processes' channels
        (so each sees end-of-file when the supervisor dies) and its metrics socket. Their
        objects are never used here again, nor finalized: the process leaves by _exit."""
        fds = [p.channel.fileno for p in self._by_pid.values()]
        if self._metrics_server is not None:
            fds += self._metrics_server.filenos()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            process = self._by_pid.pop(pid, None)
            if process is not None:
                self._ended(process, status)
            self._gone.set()

    def _ended(self, process: _Process, status: int) -> None:
        process.channel.close()
        self._running.set(len(self._by_pid))
        task = asyncio.get_running_loop().create_task(self._after_exit(process, status))
        self._aftermath.add(task)
        task.add_done_callback(self._aftermath.discard)

    async def _after_exit(self, process: _Process, status: int) -> None:
        try:
            released = await self._release_leases(process.owner)
        except Exception as exc:  # noqa: BLE001 - they expire at lease_until instead
            self._events.store_error(error=f"leases of process {process.pid}: {exc!r}")
            released = 0
        index = process.role.index
        restart_in: float | None = None
        if not self._stopping:
            lived = time.monotonic() - process.started
            pause = 0.0 if lived >= _STEADY_S else self._pause.get(index, _FIRST_PAUSE_S / 2) * 2
            restart_in = min(pause, _LONGEST_PAUSE_S)
            self._pause[index] = max(restart_in, _FIRST_PAUSE_S / 2)
            asyncio.get_running_loop().call_later(restart_in, self._restart, index)
        self._events.process_exited(
            index=index,
            pid=process.pid,
            status=_describe(status),
            released_leases=released,
            restart_in=restart_in,
        )

    async def _release_leases(self, owner: str) -> int:
        """Return a dead process's leases to the queue (SQLite: a short write here;
        PostgreSQL: through a store of our own, as the other nodes do)."""
        if not self._cfg.state.url:
            return release_leases_of(database_path(self._cfg), owner)
        store = open_shared_store(self._cfg)
        await store.open()
        try:
            return await store.release_owner(owner)
        finally:
            await store.close()

    def _restart(self, index: int) -> None:
        if not self._stopping:
            self._restarts.inc()
            self._spawn(index)

    # -- the one endpoint ------------------------------------------------------------------

    async def _render(self) -> bytes:
        processes = sorted(self._by_pid.values(), key=lambda p: p.role.index)
        answers = await asyncio.gather(
            *(p.channel.ask(METRICS, _ASK_S) for p in processes), return_exceptions=True
        )
        texts = [a.decode() for a in answers if isinstance(a, bytes)]
        texts.append(generate_latest(self._registry).decode())
        return merge_expositions(texts)

    async def _readiness(self) -> str | None:
        if self._stopping:
            return "stopping"
        running = {p.role.index: p for p in self._by_pid.values()}
        missing = [str(i) for i in range(self._count) if i not in running]
        if missing:
            return f"process {', '.join(missing)} not running"
        for index, process in sorted(running.items()):
            try:
                problem = (await process.channel.ask(READYZ, _ASK_S)).decode()
            except ChannelBroken as exc:
                return f"process {index}: no answer ({exc})"
            if problem:
                return f"process {index}: {problem}"
        return None


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return f"exit {os.waitstatus_to_exitcode(status)}"
