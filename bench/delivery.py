"""Delivery throughput over verified TLS: the relay's worker against a plain aiosmtplib loop.

Builds the test lab on loopback (a DNS server, an HTTPS policy host serving an `enforce`
policy, a STARTTLS MX sink with a trustme certificate), pre-fills the relay's queue with
N 2 KiB messages for the enforce domain, starts the delivery worker and times until the
sink has them all; once with connection reuse (`delivery.max_messages_per_connection`
100) and once without (1: a new connection and TLS handshake per message). The ceiling,
in the same run: one aiosmtplib client sending the same messages one after another over
one reused, verified TLS connection to the same sink. The ceiling and the reuse run are
repeated, interleaved, and the best of each is kept (the machine's other load varies).
DNS records carry a 300 s TTL, as real ones do (the relay caches answers for their TTL).

CPU per delivered message: the process's CPU time (time.process_time: every thread, user
and system) over the timed part of a run, divided by the messages; the ceiling's figure is
taken the same way. The sink, the DNS server and the relay's SQLite writer share this
process, so both figures include the sink's share; the difference is the relay's overhead
over a bare client. Rates vary with the machine's other load, CPU time much less: compare
CPU figures between versions, interleaved. Without reuse every connection after the first
resumes the TLS session of an earlier one (the counts are printed).

DANE (RFC 7672), when unbound is installed: the same enforce domain, signed (under the DANE
lab's `dane.test`), with a DANE-EE record for its MX, behind a real validating unbound; the
relay with reuse once with `dns.dnssec = "off"` (MTA-STS only) and once with "auto" (DANE
decides: MX/address AD bits, the TLSA lookup, the chain check), resolver caches warm. The
difference per message is the cost of DANE per delivery; the cost of one warm `gather`
(MX, A, AAAA, TLSA answers from the relay's cache) is timed on its own.

    python -m bench.delivery            # 1000 messages per run, best of 3
    python -m bench.delivery --quick    # 200, one run each
    python -m bench.delivery -n 3000 --concurrency 20
    python -m bench.delivery --no-dane  # only the MTA-STS figures
    python -m bench.delivery --loop uvloop  # everything on uvloop (relay, sink, ceiling)
    python -m bench.delivery --engines sqlite,postgres --nodes 1,2 --quick --no-dane

By engine (issue 15, `--engines` and `--nodes`, in place of the figures above): the relay
with reuse once per queue engine and node count, interleaved with the ceiling, best of
`--repeat`. A node is a relay built from a config of its own (relay.app.build: its own
state directory, resolver, policy resolver, connection pool, delivery.concurrency); with
`postgres` every node of a run shares one fresh database (state.url) of a PostgreSQL server
started for the bench (bench/shared_state.py: Debian's binaries, durable commits) and the N
messages are put there once, with `sqlite` each node gets its own store and N/nodes of the
messages. The nodes run on this one process's event loop, so two nodes do not use a second
core: their figure is the cost of sharing the queue (leases taken with SKIP LOCKED by two
schedulers, twice the concurrency against one sink), not scale-out; `python -m bench.ingest
--engines ... --nodes ...` runs separate processes. CPU is given twice: this process's (as
above) and the database server's (postmaster, backends and helpers, from /proc).

Everything shares this process and its event loop (the sink too), as the ceiling does.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiosmtplib
from prometheus_client import CollectorRegistry

from bench.ingest import cpu_seconds
from bench.shared_state import database_server, parse_engines, parse_nodes, server_pid
from mailqueue.model import NewMessage
from policy.webpki import client_context
from relay.app import build, make_resolver
from relay.config import Config, load_config
from relay.delivery.dane import dane_lookup
from relay.delivery.dnssec import dnssec_in_force
from relay.delivery.mx import MxList, resolve_mx
from relay.events import EventLog
from tests.support.dane_lab import DaneWorld, ca_issued, tlsa
from tests.support.world import World, to_toml

if TYPE_CHECKING:
    from tests.support.postgres import PostgresServer

DOMAIN = "bench-enforce.test"
MX = f"mx1.{DOMAIN}"
DANE_DOMAIN = "bench.dane.test"  # signed in the DANE lab


def _message(i: int, size: int = 2048) -> bytes:
    head = (
        f"From: app@src.test\r\nTo: u{i}@{DOMAIN}\r\nSubject: bench {i}\r\n"
        f"Message-ID: <bench-{i}@src.test>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def _config(
    world: World,
    state: Path,
    concurrency: int,
    per_connection: int,
    dnssec: str = "auto",
    state_url: str = "",
) -> Config:
    raw = world.relay_config(
        state,
        delivery={
            "concurrency": concurrency,
            "max_messages_per_connection": per_connection,
            "max_connections_per_host": concurrency,
        },
        metrics={"address": ""},
        queue={"delay_notice_after": 0},
        dns={"dnssec": dnssec},
        state={"path": str(state), "url": state_url},
    )
    path = state.parent / f"{state.name}.toml"
    path.write_text(to_toml(raw), encoding="utf-8")
    return load_config(path, {})


@dataclass(frozen=True)
class Engine:
    """The run's shared PostgreSQL server, and the root of its process tree (for its CPU)."""

    server: PostgresServer
    pid: int

    def cpu(self) -> float:
        return cpu_seconds(self.pid)


@dataclass(frozen=True, order=True)
class RunFigures:
    """One timed run: wall seconds, process CPU seconds, connections the sink saw, TLS
    handshakes of the relay (full, resumed), and the database server's CPU seconds."""

    seconds: float
    cpu: float
    connections: int = 1
    handshakes: tuple[float, float] = (0.0, 0.0)
    db_cpu: float = 0.0

    def cpu_us(self, n: int) -> float:
        return self.cpu / n * 1e6

    def db_us(self, n: int) -> float:
        return self.db_cpu / n * 1e6


async def _relay_run(
    world: World,
    tmp: Path,
    n: int,
    concurrency: int,
    per_connection: int,
    run: int = 0,
    *,
    domain: str = DOMAIN,
    dnssec: str = "auto",
    engine: Engine | None = None,
    nodes: int = 1,
) -> RunFigures:
    """Seconds and process CPU to deliver n pre-queued messages; connections the sink saw.
    `engine`: the queue in a fresh database of that PostgreSQL server (None: SQLite);
    `nodes`: relays built from configs of their own (see the module doc)."""
    sink = world.sink(f"mx1.{domain}")
    sink.messages.clear()
    sink.sessions.clear()
    url = engine.server.new_database() if engine is not None else ""
    relays = []
    for node in range(nodes):
        state = (
            tmp / f"state-{per_connection}-{run}-{dnssec}-{'pg' if url else 'sqlite'}{nodes}-{node}"
        )
        cfg = _config(world, state, concurrency, per_connection, dnssec, url)
        relays.append(build(cfg, EventLog(io.StringIO(), "json", "warning")))
    for relay in relays:
        await relay.store.open()
    tasks: list[asyncio.Task[None]] = []
    try:
        # Shared: all into the one queue. Own stores: each node its share. Puts in groups
        # (group commit) to fill faster; not timed.
        stores = [relays[0].store] if url else [r.store for r in relays]
        for first in range(0, n, 50):
            await asyncio.gather(
                *(
                    stores[i % len(stores)].put(
                        NewMessage(
                            sender="app@src.test", recipients=(f"u{i}@{domain}",), data=_message(i)
                        )
                    )
                    for i in range(first, min(n, first + 50))
                )
            )
        for relay in relays:
            await relay.policies.resolve(domain)  # fetch the policy outside the timing
        db_start = engine.cpu() if engine is not None else 0.0
        start, cpu_start = time.perf_counter(), time.process_time()
        tasks = [asyncio.create_task(relay.worker.run()) for relay in relays]
        deadline = start + 600
        while len(sink.messages) < n:
            if any(t.done() for t in tasks) or time.perf_counter() > deadline:
                raise RuntimeError(f"worker stopped or stalled at {len(sink.messages)}/{n}")
            await asyncio.sleep(0.01)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        db_cpu = engine.cpu() - db_start if engine is not None else 0.0
        if dnssec != "off" and domain == DANE_DOMAIN:
            await _all_dane_verified(relays[0].metrics.registry, n)
        handshakes = tuple(
            sum(
                relay.metrics.registry.get_sample_value(
                    "sts_relay_delivery_tls_sessions_total", {"handshake": kind}
                )
                or 0.0
                for relay in relays
            )
            for kind in ("full", "resumed")
        )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for relay in relays:
            await relay.store.close()
            relay.cache.close()
    return RunFigures(elapsed, cpu, sink.connections, (handshakes[0], handshakes[1]), db_cpu)


async def _all_dane_verified(registry: CollectorRegistry, n: int) -> None:
    """The DANE run really was DANE: n `delivery` events with a matched TLSA record (they
    are logged once recorded, a moment after the sink has the message)."""
    for _ in range(500):
        done = registry.get_sample_value("sts_relay_dane_sessions_total", {"outcome": "verified"})
        if (done or 0) >= n:
            return
        await asyncio.sleep(0.01)
    raise RuntimeError(f"only {done} of {n} deliveries were DANE-verified")


async def _ceiling(world: World, n: int) -> RunFigures:
    """One client, one verified TLS connection, n messages back to back."""
    sink = world.sink(MX)
    sink.messages.clear()
    ctx = client_context(str(world.pki.ca_file))
    client = aiosmtplib.SMTP(
        hostname=sink.ip,
        port=world.delivery_port,
        start_tls=False,
        timeout=30,
        local_hostname="bench.test",
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    await client.connect()
    await client.starttls(server_hostname=MX, tls_context=ctx)
    for i in range(n):
        await client.sendmail("app@src.test", [f"u{i}@{DOMAIN}"], _message(i))
    await client.quit()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert len(sink.messages) == n
    return RunFigures(elapsed, cpu)


async def main(n: int, concurrency: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp_name:
        tmp = Path(tmp_name)
        world = World(tmp / "lab")
        world.dns.default_ttl = 300  # realistic TTLs: the relay's DNS cache may reuse answers
        await world.start()
        try:
            await world.sts_domain(DOMAIN, mode="enforce")
            await world.add_bounce_sink()
            # Interleaved and best of `repeat`: other load on the machine hits both alike.
            ceilings, reuses = [], []
            for run in range(repeat):
                ceilings.append(await _ceiling(world, n))
                reuses.append(await _relay_run(world, tmp, n, concurrency, 100, run))
            fresh = await _relay_run(world, tmp, n, concurrency, 1)
        finally:
            await world.stop()
    # Best of each: the shortest time, and (separately) the least CPU.
    ceiling, reuse = min(ceilings), min(reuses)
    cpu = {
        "ceiling": min(r.cpu_us(n) for r in ceilings),
        "reuse": min(r.cpu_us(n) for r in reuses),
        "fresh": fresh.cpu_us(n),
    }
    rate = {k: n / r.seconds for k, r in (("ceiling", ceiling), ("reuse", reuse), ("fresh", fresh))}
    print(
        f"messages: {n} x 2 KiB, enforce domain, verified TLS; concurrency {concurrency};"
        f" best of {repeat} (no reuse: 1 run); DNS TTL 300"
    )
    print("                                              rate           process CPU per message")
    print(
        f"ceiling  aiosmtplib loop, one TLS connection: {rate['ceiling']:8.1f} msgs/s"
        f"  {cpu['ceiling']:6.0f} us"
    )
    print(
        f"relay    with reuse (100 per connection):    {rate['reuse']:8.1f} msgs/s"
        f"  {cpu['reuse']:6.0f} us ({cpu['reuse'] / cpu['ceiling']:.2f}x ceiling)"
        f"  {reuse.connections} connections, {rate['reuse'] / rate['ceiling']:.0%} of ceiling"
    )
    full, resumed = fresh.handshakes
    print(
        f"relay    without reuse (1 per connection):   {rate['fresh']:8.1f} msgs/s"
        f"  {cpu['fresh']:6.0f} us ({cpu['fresh'] / cpu['ceiling']:.2f}x ceiling)"
        f"  {fresh.connections} connections ({resumed:.0f} TLS sessions resumed, {full:.0f} full),"
        f" {rate['fresh'] / rate['ceiling']:.0%} of ceiling"
    )
    gain = rate["reuse"] / rate["fresh"]
    print(f"reuse / no reuse: {gain:.2f}x   (target: reuse >= 50% of ceiling)")


async def _warm_gather_cost(world: DaneWorld, rounds: int = 2000) -> float:
    """Microseconds for one DANE `gather` of the domain with the relay's DNS cache warm."""
    resolver = make_resolver((world.validator.nameserver,), 5.0)
    lookup = dane_lookup(
        dnssec_in_force("auto", (world.validator.nameserver,)), resolver, timeout=5.0
    )
    assert lookup is not None
    mx = await resolve_mx(DANE_DOMAIN, resolver, timeout=5.0, rng=random.Random(1))
    assert isinstance(mx, MxList)
    await lookup.gather(DANE_DOMAIN, mx)  # warm
    start = time.perf_counter()
    for _ in range(rounds):
        await lookup.gather(DANE_DOMAIN, mx)
    return (time.perf_counter() - start) / rounds * 1e6


async def engines_cost(
    n: int, concurrency: int, repeat: int, engines: list[str], node_counts: list[int]
) -> None:
    """The relay with reuse per queue engine and node count, beside the ceiling (module doc)."""
    cases = [(engine, nodes) for engine in engines for nodes in node_counts]
    runs: dict[tuple[str, int], list[RunFigures]] = {case: [] for case in cases}
    ceilings: list[RunFigures] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-engines-")))
        database = None
        if "postgres" in engines:
            server = stack.enter_context(database_server())
            database = Engine(server, server_pid(server))
        world = World(tmp / "lab")
        world.dns.default_ttl = 300
        await world.start()
        try:
            await world.sts_domain(DOMAIN, mode="enforce")
            await world.add_bounce_sink()
            for run in range(repeat):  # interleaved: other load hits every case alike
                ceilings.append(await _ceiling(world, n))
                for engine, nodes in cases:
                    shared = database if engine == "postgres" else None
                    figures = await _relay_run(
                        world, tmp, n, concurrency, 100, run, engine=shared, nodes=nodes
                    )
                    runs[(engine, nodes)].append(figures)
        finally:
            await world.stop()
    print(
        f"by engine: {n} x 2 KiB, enforce domain, verified TLS, reuse (100 per connection);"
        f" concurrency {concurrency} per node; nodes share this process; best of {repeat}"
    )
    print(
        f"{'':<44} {'msgs/s':>7}  {'CPU us/msg: process':>20} {'db':>6} {'total':>7}"
        f"  {'x sqlite: rate':>15} {'cpu':>5}  {'connections':>11}"
    )
    ceiling = min(ceilings)
    ceiling_cpu = min(r.cpu_us(n) for r in ceilings)
    label = "ceiling  aiosmtplib loop, one TLS connection:"
    print(f"{label:<44} {n / ceiling.seconds:>7.1f}  {ceiling_cpu:>20.0f}")

    def total_us(r: RunFigures) -> float:
        return r.cpu_us(n) + r.db_us(n)

    for engine, nodes in cases:
        fastest = min(runs[(engine, nodes)])  # the shortest time; the least CPU apart
        cheapest = min(runs[(engine, nodes)], key=total_us)
        ratios = ""
        if ("sqlite", nodes) in runs:
            base = runs[("sqlite", nodes)]
            rate_ratio = min(base).seconds / fastest.seconds
            cpu_ratio = total_us(cheapest) / total_us(min(base, key=total_us))
            ratios = f"  {rate_ratio:>15.2f} {cpu_ratio:>5.2f}"
        else:
            ratios = f"  {'':>15} {'':>5}"
        label = f"relay    {engine}, {nodes} node{'s' if nodes > 1 else ''}:"
        print(
            f"{label:<44} {n / fastest.seconds:>7.1f}  {cheapest.cpu_us(n):>20.0f}"
            f" {cheapest.db_us(n):>6.0f} {total_us(cheapest):>7.0f}{ratios}"
            f"  {cheapest.connections:>11}",
            flush=True,
        )


def _have_unbound() -> bool:
    return shutil.which("unbound") is not None or Path("/usr/sbin/unbound").exists()


async def dane_cost(n: int, concurrency: int, repeat: int) -> None:
    """The cost of DANE per delivery, beside the MTA-STS-only figure (see the module doc)."""
    if not _have_unbound():
        print("DANE: skipped (unbound is not installed: apt-get install unbound)")
        return
    with tempfile.TemporaryDirectory(prefix="bench-dane-") as tmp_name:
        tmp = Path(tmp_name)
        world = DaneWorld(tmp / "lab")
        world.dns.default_ttl = 300
        world.validator.max_negative_ttl = 300  # as a production resolver caches NODATA
        await world.start()
        try:
            host = f"mx1.{DANE_DOMAIN}"
            cert = ca_issued(world.pki.ca, [host], world.certs_dir())  # passes MTA-STS too
            await world.dane_mx(DANE_DOMAIN, cert, [tlsa(cert.leaf)])
            world.publish_policy(DANE_DOMAIN, mx=[host])
            await world.add_bounce_sink()
            sts: list[RunFigures] = []
            dane: list[RunFigures] = []
            for run in range(repeat):
                for dnssec, runs in (("off", sts), ("auto", dane)):
                    runs.append(
                        await _relay_run(
                            world, tmp, n, concurrency, 100, run, domain=DANE_DOMAIN, dnssec=dnssec
                        )
                    )
            gather_us = await _warm_gather_cost(world)
        finally:
            await world.stop()
    sts_s, dane_s = min(sts).seconds, min(dane).seconds
    per_msg_ms = (dane_s - sts_s) / n * 1000
    print(
        f"DANE: {n} x 2 KiB to an enforce domain whose MX has a DANE-EE record, through unbound"
        f" (DNS TTL 300, caches warm); best of {repeat}"
    )
    print(f"relay    MTA-STS only (dns.dnssec off):      {n / sts_s:8.1f} msgs/s")
    print(
        f"relay    DANE decides (dns.dnssec auto):     {n / dane_s:8.1f} msgs/s"
        f"  cost of DANE: {per_msg_ms:+.3f} ms per delivery"
    )
    print(f"one warm DANE lookup (MX, A, AAAA, TLSA from the cache): {gather_us:.0f} us")


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=1000, help="messages per run")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="runs of ceiling and reuse")
    parser.add_argument("--quick", action="store_true", help="200 messages, 1 run each")
    parser.add_argument("--dane-only", action="store_true", help="only the DANE figures")
    parser.add_argument("--no-dane", action="store_true", help="no DANE figures")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument(
        "--engines", default=None, help="by queue engine, e.g. sqlite,postgres (issue 15)"
    )
    parser.add_argument("--nodes", default=None, help="with --engines: node counts (1,2)")
    return parser.parse_args()


if __name__ == "__main__":
    args = _args()
    count, runs = (200, 1) if args.quick else (args.n, args.repeat)
    factory = asyncio.new_event_loop
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    print(f"event loop: {args.loop}")
    by_engine = args.engines is not None or args.nodes is not None
    with asyncio.Runner(loop_factory=factory) as runner:
        if by_engine and not args.dane_only:
            engines = parse_engines(args.engines or "sqlite,postgres")
            node_counts = parse_nodes(args.nodes or "1,2")
            runner.run(engines_cost(count, args.concurrency, runs, engines, node_counts))
        elif not args.dane_only:
            runner.run(main(count, args.concurrency, runs))
        if not args.no_dane:
            runner.run(dane_cost(count, args.concurrency, runs))
