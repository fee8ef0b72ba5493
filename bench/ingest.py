"""Durable ingest: accepted messages/s of `sts-relay serve`, beside baselines of the same run.

    python -m bench.ingest            # 1, 10, 50 clients x 2 KiB, 100 KiB; ~70 s
    python -m bench.ingest --quick    # shorter runs
    python -m bench.ingest --profile  # also write a cProfile of the relay (50 x 2 KiB)
    python -m bench.ingest --lab      # the lab's load: CPU per accepted message; ~4 min
    python -m bench.ingest --lab --processes 1 --delivery idle --compare /tmp/before
    python -m bench.ingest --engines sqlite,postgres --nodes 1,2 --quick   # ~30 s

Figures, all on loopback, same load generator (asyncio clients in this process, one SMTP
session each, messages back to back in the session):
- the disk's raw fsync rate (write 2 KiB + fsync, in the state directory);
- an aiosmtpd server that stores nothing (a subprocess, 250 at once after DATA);
- the relay (a subprocess: real listener, SqliteStore with synchronous=FULL, JSON logs to
  a file). Its delivery side is kept idle so it does not compete: recipients are in a
  domain whose DNS server never answers (a UDP socket of this process that reads nothing),
  and delivery.concurrency is 1.
Target (issue 3): 50 clients, 2 KiB: relay >= 60% of the store-nothing rate.

`--lab` measures what the lab measures (issue 14; the lab's `bench.py --only ingest`):
`smtp-source -s 20 -m 5000 -l 2048`, i.e. 20 concurrent clients, ONE NEW CONNECTION PER
MESSAGE (connect, banner, HELO, MAIL, RCPT, DATA with 2 KiB, QUIT), and prints the server's
CPU (user + system of all its threads and processes, from /proc) in microseconds per
accepted message, beside the store-nothing aiosmtpd server of the same run:
- `relay idle`: delivery kept idle as above: the cost of accepting alone;
- `relay deferred`: as in the lab, every message is attempted at once and deferred (its
  domain's MX, on a loopback address, refuses the connection; no MTA-STS record; DNS
  answers with TTL 0 as the lab's dnsmasq does, from a thread of this process), default
  delivery settings: what the lab's "ingest, destination deferred" figure counts;
- each under every event loop of `--loops` (the relay's serve.event_loop);
- `--compare DIR`: also the relay run from DIR, a copy of the packages (`cp -r relay
  mailqueue policy tlsrpt posture DIR/` before a change), as `base ...` lines.
Rounds are interleaved so load from elsewhere hits every server alike; each figure is the
round with the least CPU per message. The client is smtp-source when installed (Postfix's
own, in C), else, or with `--client asyncio`, the asyncio client of this file doing the same
per connection (with EHLO). Ratios are printed, never asserted. Target (issue 14): <= 1000
us per accepted message.

`--engines sqlite,postgres --nodes 1,2` (either implies `--lab`; issue 15) runs the lab's
load against each engine of the queue, each with 1 and 2 nodes: a node is one
`sts-relay serve` (with its `serve.processes`) with a state directory and port of its own;
with `postgres` all nodes of a case share one fresh database (`state.url`) on a PostgreSQL
server started for the run (bench/shared_state.py: Debian's binaries, durable commits), with
`sqlite` each node keeps its own queue (today's way of running two relays). The clients are
split evenly between the nodes (two smtp-source processes, half the sessions and messages
each). Printed per case: msgs/s, the CPU of the relays' process trees and of the database
server's (postmaster and backends) per accepted message, their total, and the ratios of rate
and total CPU against SQLite with the same node count, delivery and loop, from the same run.
There `--loops` defaults to uvloop alone, the relay's default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

_NOTHING_SERVER = """
import asyncio, sys
from aiosmtpd.smtp import SMTP
if sys.argv[2:] == ["uvloop"]:
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

class Handler:
    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 Ok: stored nothing"

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Handler(), decode_data=False, hostname="nothing.test",
                     data_size_limit=52428800, enable_SMTPUTF8=True, loop=loop),
        "127.0.0.1", int(sys.argv[1]))
    print("listening", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def message(size: int) -> bytes:
    head = b"From: app@src.test\r\nTo: u@nowhere.test\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def fsync_rate(directory: Path, seconds: float) -> float:
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    block = b"f" * 2048
    count = 0
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < seconds:
            os.write(fd, block)
            os.fsync(fd)
            count += 1
    finally:
        os.close(fd)
        path.unlink()
    return count / (time.perf_counter() - start)


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed by server")
        if line[3:4] != b"-":
            return line


async def _session(port: int, data: bytes, stop: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _reply(reader)
        writer.write(b"EHLO bench.test\r\n")
        await _reply(reader)
        payload = data + b".\r\n"
        loop = asyncio.get_running_loop()
        while loop.time() < stop:
            for line, code in (
                (b"MAIL FROM:<app@src.test>\r\n", b"250"),
                (b"RCPT TO:<u@nowhere.test>\r\n", b"250"),
                (b"DATA\r\n", b"354"),
            ):
                writer.write(line)
                if not (await _reply(reader)).startswith(code):
                    raise RuntimeError(f"{line!r} refused")
            writer.write(payload)
            reply = await _reply(reader)
            if not reply.startswith(b"250"):
                raise RuntimeError(f"DATA refused: {reply!r}")
            counts[0] += 1
        writer.write(b"QUIT\r\n")
        await _reply(reader)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@dataclass(frozen=True)
class Figure:
    rate: float  # accepted messages per second
    cpu_ms: float  # server CPU (ms) per accepted message
    db_ms: float = 0.0  # the shared database server's CPU (ms) per accepted message

    @property
    def total_ms(self) -> float:
        return self.cpu_ms + self.db_ms


@dataclass(frozen=True)
class Server:
    port: int
    pid: int


@dataclass(frozen=True)
class Target:
    """What a lab round loads: one server, or several relay nodes that share the load
    evenly; `database`: the root process of the database server they share (its CPU is
    counted apart)."""

    servers: tuple[Server, ...]
    database: int | None = None

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the servers' process trees, and of the database's."""
        database = cpu_seconds(self.database) if self.database is not None else 0.0
        return sum(cpu_seconds(s.pid) for s in self.servers), database

    def figure(self, count: int, elapsed: float, start: tuple[float, float]) -> Figure:
        (servers, database), count_ms = self.cpu(), count / 1000
        return Figure(
            count / elapsed, (servers - start[0]) / count_ms, (database - start[1]) / count_ms
        )


def shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal whole parts."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process, all its threads and its descendants
    (live ones, and those it reaped: a relay with serve.processes > 1 forks). Linux /proc."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # exited while we looked
            continue
        child = int(entry.name)
        children.setdefault(int(fields[1]), []).append(child)
        ticks[child] = int(fields[11]) + int(fields[12])
        if child == pid:
            ticks[child] += int(fields[13]) + int(fields[14])  # reaped children
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += ticks.get(current, 0)
        todo.extend(children.get(current, []))
    return total / os.sysconf("SC_CLK_TCK")


async def measure_sessions(
    server: Server,
    clients: int,
    size: int,
    seconds: float,
    cpu: Callable[[int], float] = cpu_seconds,
) -> Figure:
    """`clients` SMTP sessions sending `size`-byte messages back to back for `seconds`
    (after a short warm-up); msgs/s and the server's CPU ms per message (`cpu(pid)`)."""
    data = message(size)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.3  # warm-up, not counted
    stop = start + seconds
    counts = [0]
    sessions = [
        asyncio.create_task(_session(server.port, data, stop, counts)) for _ in range(clients)
    ]
    await asyncio.sleep(max(0.0, start - loop.time()))
    cpu_start, accepted_start = cpu(server.pid), counts[0]
    await asyncio.sleep(max(0.0, stop - loop.time()))
    used = cpu(server.pid) - cpu_start
    accepted = counts[0] - accepted_start
    await asyncio.gather(*sessions)
    return Figure(accepted / seconds, 1000 * used / accepted if accepted else float("nan"))


async def _one_connection(port: int, payload: bytes) -> None:
    """One message on a connection of its own, as smtp-source sends it (EHLO here)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if not (await _reply(reader)).startswith(b"220"):
            raise RuntimeError("no banner")
        for line, code in (
            (b"EHLO bench.test\r\n", b"250"),
            (b"MAIL FROM:<app@src.test>\r\n", b"250"),
            (b"RCPT TO:<u@nowhere.test>\r\n", b"250"),
            (b"DATA\r\n", b"354"),
            (payload, b"250"),
            (b"QUIT\r\n", b"221"),
        ):
            writer.write(line)
            reply = await _reply(reader)
            if not reply.startswith(code):
                raise RuntimeError(f"{line[:30]!r} refused: {reply!r}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def measure_connections(target: Target, clients: int, size: int, count: int) -> Figure:
    """`count` messages from `clients` concurrent clients (client k sends to server k mod
    the number of servers), each message on a new connection; msgs/s and the servers' CPU
    ms per message over the whole run."""
    payload = message(size) + b".\r\n"
    left = [count]

    async def client(port: int) -> None:
        while left[0] > 0:
            left[0] -= 1
            await _one_connection(port, payload)

    ports = [server.port for server in target.servers]
    cpu_start, start = target.cpu(), time.perf_counter()
    await asyncio.gather(*(client(ports[k % len(ports)]) for k in range(clients)))
    return target.figure(count, time.perf_counter() - start, cpu_start)


def smtp_source(target: Target, clients: int, size: int, count: int) -> Figure:
    """`smtp-source -s clients -m count -l size` (one connection per message), timed; with
    several servers one smtp-source per server at once, clients and messages split evenly."""
    parts = len(target.servers)
    cpu_start, start = target.cpu(), time.perf_counter()
    running = []
    for server, sessions, messages in zip(
        target.servers, shares(clients, parts), shares(count, parts), strict=True
    ):
        argv = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size)]
        argv += ["-f", "app@src.test", "-t", "u@nowhere.test", f"127.0.0.1:{server.port}"]
        running.append(
            subprocess.Popen(  # noqa: S603 (Postfix's client, our arguments)
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    errors = [proc.communicate()[1] for proc in running]
    figure = target.figure(count, time.perf_counter() - start, cpu_start)
    for proc, stderr in zip(running, errors, strict=True):
        if proc.returncode != 0 or "fatal" in stderr or "warning" in stderr:
            raise RuntimeError(f"smtp-source failed: {stderr.strip()[-500:]}")
    return figure


def lab_round(target: Target, args: argparse.Namespace, count: int) -> Figure:
    if args.client == "smtp-source":
        return smtp_source(target, args.sessions, args.size, count)
    return asyncio.run(measure_connections(target, args.sessions, args.size, count))


@dataclass(frozen=True)
class Case:
    """One relay setup of a lab run: code tree, delivery, event loop, queue engine, nodes."""

    label: str  # "relay", or "base" for the --compare tree
    tree: Path | None
    delivery: str
    loop: str
    engine: str = "sqlite"
    nodes: int = 1

    def name(self, engines: bool) -> str:
        setup = f" {self.engine} x{self.nodes}" if engines else ""
        return f"{self.label}{setup} {self.delivery}, {self.loop}"


def run_lab(args: argparse.Namespace) -> None:
    """The lab's load against each server; best (least CPU per message) of the rounds."""
    from bench.shared_state import database_server, parse_engines, parse_nodes, server_pid

    if args.client is None:
        args.client = "smtp-source" if shutil.which("smtp-source") else "asyncio"
    count = 1000 if args.quick else args.messages
    rounds = 1 if args.quick else args.rounds
    by_engine = args.engines is not None or args.nodes is not None
    loops = [loop for loop in (args.loops or _default_loops(by_engine)).split(",") if loop]
    if not set(loops) <= set(LOOPS):
        raise SystemExit(f"--loops: each of {', '.join(LOOPS)}")
    engines = parse_engines(args.engines or "sqlite,postgres") if by_engine else ["sqlite"]
    node_counts = parse_nodes(args.nodes or "1,2") if by_engine else [1]
    print(
        f"lab ingest: {args.sessions} clients, one connection per message, {args.size} B,"
        f" {count} messages per round, best of {rounds}, client={args.client},"
        f" cpus={os.cpu_count()}"
    )
    if by_engine:
        processes = args.processes or "the relay's default (one per CPU)"
        print(
            f"engines: {', '.join(engines)}; nodes: {', '.join(map(str, node_counts))}"
            f" (clients split evenly); serve.processes per node: {processes}"
        )
    deliveries = [d for d in args.delivery.split(",") if d]
    if not set(deliveries) <= {"idle", "deferred"}:
        raise SystemExit("--delivery: idle, deferred or both")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        nameserver = stack.enter_context(DeferringDns()) if "deferred" in deliveries else None
        database = stack.enter_context(database_server()) if "postgres" in engines else None
        targets: dict[str, Target] = {}
        for loop in loops:
            targets[f"nothing, {loop}"] = Target((stack.enter_context(nothing_server(work, loop)),))
        trees: list[tuple[str, Path | None]] = [("relay", None)]
        if args.compare is not None:
            trees.insert(0, ("base", Path(args.compare).resolve()))
        cases: dict[str, Case] = {}
        for delivery in deliveries:
            for loop in loops:
                for label, tree in trees:
                    for engine in engines:
                        for nodes in node_counts:
                            case = Case(label, tree, delivery, loop, engine, nodes)
                            cases[case.name(by_engine)] = case
        for name, case in cases.items():
            directory = work / name.replace(" ", "-").replace(",", "")
            url = database.new_database() if database and case.engine == "postgres" else None
            servers = []
            for node in range(case.nodes):
                profile = None
                if args.profile and case.tree is None and node == 0:
                    setup = f"-{case.engine}-x{case.nodes}" if by_engine else ""
                    profile = work.parent / f"ingest-lab-{case.delivery}-{case.loop}{setup}.prof"
                (directory / f"node{node}").mkdir(parents=True)
                server = relay_server(
                    directory / f"node{node}",
                    profile,
                    case.loop,
                    nameserver if case.delivery == "deferred" else None,
                    args.processes,
                    case.tree,
                    state_url=url,
                )
                servers.append(stack.enter_context(server))
            pid = server_pid(database) if database and url else None
            targets[name] = Target(tuple(servers), pid)
        for target in targets.values():
            lab_round(target, args, min(200, count))  # warm-up: imports, caches, pages
        runs: dict[str, list[Figure]] = {name: [] for name in targets}
        for _ in range(rounds):
            for name, target in targets.items():
                runs[name].append(lab_round(target, args, count))
        best = {name: min(figures, key=lambda f: f.total_ms) for name, figures in runs.items()}
        if by_engine:
            _print_by_engine(best, cases, f"nothing, {loops[0]}")
        else:
            base = best[f"nothing, {loops[0]}"].cpu_ms
            print(f"{'server':<26} {'msgs/s':>8} {'cpu us/msg':>11} {'x nothing':>10}")
            for name, figure in best.items():
                print(
                    f"{name:<26} {figure.rate:>8,.0f} {1000 * figure.cpu_ms:>11,.0f}"
                    f" {figure.cpu_ms / base if base else 0.0:>10.2f}",
                    flush=True,
                )
        if args.profile:
            print(f"cProfile of each relay: {work.parent}/ingest-lab-<delivery>-<loop>*.prof")


def _default_loops(by_engine: bool) -> str:
    return "uvloop" if by_engine else "asyncio,uvloop"


def _print_by_engine(best: dict[str, Figure], cases: dict[str, Case], nothing: str) -> None:
    """The figures per case, with the ratios against SQLite (same nodes, delivery, loop)."""
    base = best[nothing].cpu_ms
    print(
        f"{'server':<35} {'msgs/s':>7} {'us/msg: relay':>14} {'db':>5} {'total':>6}"
        f" {'x nothing':>9}   x sqlite: {'rate':>5} {'cpu':>5}"
    )
    for name, figure in best.items():
        case = cases.get(name)
        ratios = ""
        if case is not None:
            sqlite = best.get(dataclasses.replace(case, engine="sqlite").name(True))
            if sqlite is not None:
                ratios = (
                    f"           {figure.rate / sqlite.rate:>5.2f}"
                    f" {figure.total_ms / sqlite.total_ms:>5.2f}"
                )
        print(
            f"{name:<35} {figure.rate:>7,.0f} {1000 * figure.cpu_ms:>14,.0f}"
            f" {1000 * figure.db_ms:>5,.0f} {1000 * figure.total_ms:>6,.0f}"
            f" {figure.total_ms / base if base else 0.0:>9.2f}{ratios}",
            flush=True,
        )


def load(server: Server, clients: int, size: int, seconds: float, rounds: int) -> Figure:
    """Best of `rounds` runs: other work on a shared machine only ever makes us slower."""
    runs = [asyncio.run(measure_sessions(server, clients, size, seconds)) for _ in range(rounds)]
    return max(runs, key=lambda f: f.rate)


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"process exited {proc.returncode}: {path.read_text()[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"not ready within {within} s")


@contextlib.contextmanager
def nothing_server(work: Path, loop: str = "asyncio") -> Iterator[Server]:
    port = free_port()
    out = work / f"nothing-{loop}.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(  # noqa: S603 (our own interpreter and arguments)
            [sys.executable, "-c", _NOTHING_SERVER, str(port), loop], stdout=sink, stderr=sink
        )
    try:
        _wait_for(out, "listening", proc)
        yield Server(port, proc.pid)
    finally:
        proc.terminate()
        proc.wait()


# `sts-relay serve` on the event loop named by its first argument: the relay's own setting
# (serve.event_loop) decides where it has one; for an older relay this installs the policy.
_RELAY_ON_LOOP = """
import asyncio, sys
if sys.argv[1] == "uvloop":
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
from relay.cli.main import main
sys.exit(main(sys.argv[2:]))
"""
LOOPS = ("asyncio", "uvloop")


def relay_config(
    work: Path,
    port: int,
    nameserver: str,
    *,
    deferring: int | None = None,
    processes: int | None = None,
    loop: str | None = None,
    state_url: str | None = None,
) -> Path:
    """The bench's relay. Delivery idle (`deferring` None: `nameserver` never answers, one
    delivery slot), or as in the lab's ingest run (`deferring`: the MX port, where nothing
    listens; every message is attempted at once with the default concurrency, refused,
    deferred). `state_url`: the queue in that PostgreSQL database (state.url), shared."""
    if deferring is None:
        delivery = "concurrency = 1\n"
        dns_timeout = 300
    else:
        delivery = f"allow_loopback_mx = true\nport = {deferring}\n"
        dns_timeout = 5
    known = _serve_settings()
    serve = "[serve]\n" if known else ""
    if processes is not None and "processes" in known:
        serve += f"processes = {processes}\n"
    if loop is not None and "event_loop" in known:
        serve += f'event_loop = "{loop}"\n'
    url = f'url = "{state_url}"\n' if state_url else ""
    config = work / "relay.toml"
    config.write_text(
        f"""{serve}
[listen]
addresses = ["127.0.0.1:{port}"]
hostname = "relay.bench.test"
max_sessions = 500
max_sessions_per_client = 500

[state]
path = "{work / "state"}"
{url}
[delivery]
hostname = "relay.bench.test"
shutdown_grace = 1
{delivery}
[dns]
nameservers = ["{nameserver}"]
timeout = {dns_timeout}

[metrics]
address = ""

[tlsrpt]
enabled = false
""",
        encoding="utf-8",
    )
    return config


class DeferringDns:
    """DNS for the lab's "destination deferred" (z-defer.test there): nowhere.test has an
    MX on a loopback address where nothing listens (connection refused), no MTA-STS
    record; TTL 0 as dnsmasq's default local-ttl, so every attempt asks again. Served
    from a thread of this process (its CPU is not the relay's)."""

    MX_ADDRESS = "127.0.1.99"

    def __init__(self) -> None:
        from tests.support.dns import DnsServer

        self.server = DnsServer(default_ttl=0)
        self.server.add("nowhere.test", "MX", "10 mx.nowhere.test.")
        self.server.add("mx.nowhere.test", "A", self.MX_ADDRESS)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)
        return self.server.nameserver

    def __exit__(self, *_exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def _serve_settings() -> frozenset[str]:
    """The keys of the relay's [serve] section (none before it had one)."""
    import dataclasses

    from relay import config

    serve = getattr(config, "ServeConfig", None)
    return frozenset(f.name for f in dataclasses.fields(serve)) if serve else frozenset()


@contextlib.contextmanager
def relay_server(
    work: Path,
    profile: Path | None = None,
    loop: str | None = None,
    nameserver: str | None = None,
    processes: int | None = None,
    tree: Path | None = None,
    *,
    state_url: str | None = None,
) -> Iterator[Server]:
    """`sts-relay serve` on a fresh state directory and the event loop `loop` (None: the
    relay's default); yields its port. Delivery is idle, or with `nameserver` (a
    DeferringDns) attempts and defers every message as in the lab. `tree`: run the relay's
    code from that copy of the packages instead (a baseline to compare with, in the same
    run). `state_url`: the queue in that shared PostgreSQL database (state.url)."""
    port = free_port()
    blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # DNS that never answers
    blackhole.bind(("127.0.0.1", 0))
    if nameserver is None:
        nameserver, deferring = f"127.0.0.1:{blackhole.getsockname()[1]}", None
    else:
        deferring = free_port()
    config = relay_config(
        work,
        port,
        nameserver,
        deferring=deferring,
        processes=processes,
        loop=loop,
        state_url=state_url,
    )
    log = work / "relay.log"
    prefix = [sys.executable]
    if profile is not None:
        prefix += ["-m", "cProfile", "-o", str(profile)]
    wrapper = work / "relay_on_loop.py"  # a script file, which cProfile can run as well
    wrapper.write_text(_RELAY_ON_LOOP, encoding="utf-8")
    prefix += [str(wrapper), loop or "default"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STS_RELAY_")}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    with log.open("wb") as sink:
        proc = subprocess.Popen(  # noqa: S603 (our own interpreter and arguments)
            [*prefix, "--config", str(config), "serve"],
            stdout=sink,
            stderr=sink,
            env=env,
        )
    try:
        _wait_for(log, '"listening"', proc)
        yield Server(port, proc.pid)
    finally:
        # SIGTERM would wait delivery.shutdown_grace for the stuck delivery; the state
        # directory is thrown away anyway.
        proc.terminate() if profile is not None else proc.kill()
        proc.wait()
        blackhole.close()


def run(args: argparse.Namespace) -> None:
    seconds = 1.0 if args.quick else args.seconds
    rounds = 1 if args.quick else args.rounds
    clients_list = [int(c) for c in args.clients.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"ingest bench: {seconds:.1f} s per figure, cpus={os.cpu_count()}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        print(f"raw fsync (2 KiB write + fsync) in {work}: {fsync_rate(work, seconds):,.0f}/s")
        print(
            f"{'clients':>7} {'size':>7} {'nothing/s':>10} {'relay/s':>9} {'ratio':>6}"
            f"   cpu ms/msg: {'nothing':>7} {'relay':>6}"
        )
        for size in sizes:
            for clients in clients_list:
                with nothing_server(work) as server:
                    nothing = load(server, clients, size, seconds, rounds)
                case = work / f"relay-{clients}-{size}"
                case.mkdir()
                profile = None
                if args.profile and clients == max(clients_list) and size == min(sizes):
                    profile = work.parent / "ingest-relay.prof"
                with relay_server(case, profile) as server:
                    relay = load(server, clients, size, seconds, rounds)
                ratio = relay.rate / nothing.rate if nothing.rate else 0.0
                mark = "  <- target >= 0.60" if (clients, size) == (50, 2048) else ""
                print(
                    f"{clients:>7} {size // 1024:>5}Ki {nothing.rate:>10,.0f}"
                    f" {relay.rate:>9,.0f} {ratio:>6.2f}"
                    f"               {nothing.cpu_ms:>7.2f} {relay.cpu_ms:>6.2f}{mark}",
                    flush=True,
                )
                if profile is not None:
                    print(f"        cProfile of the relay written to {profile}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 s per figure")
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per figure")
    parser.add_argument(
        "--rounds", type=int, default=None, help="best of this many runs (2; 3 with --lab)"
    )
    parser.add_argument("--clients", default="1,10,50")
    parser.add_argument("--sizes", default="2048,102400")
    parser.add_argument("--dir", default=None, help="where the state goes (default: $TMPDIR)")
    parser.add_argument("--profile", action="store_true", help="cProfile the relay at 50x2K")
    lab = parser.add_argument_group("--lab: the lab's load, CPU per accepted message")
    lab.add_argument("--lab", action="store_true", help="one connection per message")
    lab.add_argument("--sessions", type=int, default=20, help="concurrent clients")
    lab.add_argument("--size", type=int, default=2048, help="message bytes")
    lab.add_argument("--messages", type=int, default=5000, help="messages per round")
    lab.add_argument(
        "--loops",
        default=None,
        help="event loops for the servers (asyncio,uvloop; by engine: uvloop)",
    )
    lab.add_argument("--client", choices=("smtp-source", "asyncio"), default=None)
    lab.add_argument(
        "--compare",
        metavar="DIR",
        help="also run the relay from DIR, a copy of the packages (e.g. before a change)",
    )
    lab.add_argument(
        "--processes", type=int, default=None, help="serve.processes (default: the relay's)"
    )
    lab.add_argument(
        "--delivery",
        default="idle,deferred",
        help="relay delivery: idle (ingest alone) and/or deferred (the lab: MX refuses)",
    )
    shared = parser.add_argument_group("by engine (issue 15), the --lab load: state.url")
    shared.add_argument(
        "--engines", default=None, help="queue engines, e.g. sqlite,postgres (implies --lab)"
    )
    shared.add_argument(
        "--nodes", default=None, help="relay nodes per engine, e.g. 1,2 (implies --lab)"
    )
    args = parser.parse_args()
    if args.lab or args.engines is not None or args.nodes is not None:
        args.rounds = args.rounds or 3
        run_lab(args)
    else:
        args.rounds = args.rounds or 2
        run(args)


if __name__ == "__main__":
    main()
