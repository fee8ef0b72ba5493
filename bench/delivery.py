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

Everything shares this process and its event loop (the sink too), as the ceiling does.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
from prometheus_client import CollectorRegistry

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
    world: World, state: Path, concurrency: int, per_connection: int, dnssec: str = "auto"
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
    )
    path = state.parent / f"relay-{per_connection}.toml"
    path.write_text(to_toml(raw), encoding="utf-8")
    return load_config(path, {})


@dataclass(frozen=True, order=True)
class RunFigures:
    """One timed run: wall seconds, process CPU seconds, connections the sink saw, and TLS
    handshakes of the relay (full, resumed)."""

    seconds: float
    cpu: float
    connections: int = 1
    handshakes: tuple[float, float] = (0.0, 0.0)

    def cpu_us(self, n: int) -> float:
        return self.cpu / n * 1e6


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
) -> RunFigures:
    """Seconds and process CPU to deliver n pre-queued messages; connections the sink saw."""
    sink = world.sink(f"mx1.{domain}")
    sink.messages.clear()
    sink.sessions.clear()
    state = tmp / f"state-{per_connection}-{run}-{dnssec}"
    cfg = _config(world, state, concurrency, per_connection, dnssec)
    relay = build(cfg, EventLog(io.StringIO(), "json", "warning"))
    await relay.store.open()
    try:
        for i in range(n):
            await relay.store.put(
                NewMessage(sender="app@src.test", recipients=(f"u{i}@{domain}",), data=_message(i))
            )
        await relay.policies.resolve(domain)  # fetch the policy outside the timing
        start, cpu_start = time.perf_counter(), time.process_time()
        task = asyncio.create_task(relay.worker.run())
        deadline = start + 600
        while len(sink.messages) < n:
            if task.done() or time.perf_counter() > deadline:
                raise RuntimeError(f"worker stopped or stalled at {len(sink.messages)}/{n}")
            await asyncio.sleep(0.01)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if dnssec != "off" and domain == DANE_DOMAIN:
            await _all_dane_verified(relay.metrics.registry, n)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        handshakes = tuple(
            relay.metrics.registry.get_sample_value(
                "sts_relay_delivery_tls_sessions_total", {"handshake": kind}
            )
            or 0.0
            for kind in ("full", "resumed")
        )
    finally:
        await relay.store.close()
        relay.cache.close()
    return RunFigures(elapsed, cpu, sink.connections, (handshakes[0], handshakes[1]))


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
    return parser.parse_args()


if __name__ == "__main__":
    args = _args()
    count, runs = (200, 1) if args.quick else (args.n, args.repeat)
    factory = asyncio.new_event_loop
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    print(f"event loop: {args.loop}")
    with asyncio.Runner(loop_factory=factory) as runner:
        if not args.dane_only:
            runner.run(main(count, args.concurrency, runs))
        if not args.no_dane:
            runner.run(dane_cost(count, args.concurrency, runs))
