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

    python -m bench.delivery            # 1000 messages per run, best of 3
    python -m bench.delivery --quick    # 200, one run each
    python -m bench.delivery -n 3000 --concurrency 20

Everything shares this process and its event loop (the sink too), as the ceiling does.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import time
from pathlib import Path

import aiosmtplib

from mailqueue.model import NewMessage
from policy.webpki import client_context
from relay.app import build
from relay.config import Config, load_config
from relay.events import EventLog
from tests.support.world import World, to_toml

DOMAIN = "bench-enforce.test"
MX = f"mx1.{DOMAIN}"


def _message(i: int, size: int = 2048) -> bytes:
    head = (
        f"From: app@src.test\r\nTo: u{i}@{DOMAIN}\r\nSubject: bench {i}\r\n"
        f"Message-ID: <bench-{i}@src.test>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def _config(world: World, state: Path, concurrency: int, per_connection: int) -> Config:
    raw = world.relay_config(
        state,
        delivery={
            "concurrency": concurrency,
            "max_messages_per_connection": per_connection,
            "max_connections_per_host": concurrency,
        },
        metrics={"address": ""},
        queue={"delay_notice_after": 0},
    )
    path = state.parent / f"relay-{per_connection}.toml"
    path.write_text(to_toml(raw), encoding="utf-8")
    return load_config(path, {})


async def _relay_run(
    world: World, tmp: Path, n: int, concurrency: int, per_connection: int, run: int = 0
) -> tuple[float, int]:
    """Seconds to deliver n pre-queued messages; and how many connections the sink saw."""
    sink = world.sink(MX)
    sink.messages.clear()
    sink.sessions.clear()
    state = tmp / f"state-{per_connection}-{run}"
    cfg = _config(world, state, concurrency, per_connection)
    relay = build(cfg, EventLog(io.StringIO(), "json", "warning"))
    await relay.store.open()
    try:
        for i in range(n):
            await relay.store.put(
                NewMessage(sender="app@src.test", recipients=(f"u{i}@{DOMAIN}",), data=_message(i))
            )
        await relay.policies.resolve(DOMAIN)  # fetch the policy outside the timing
        start = time.perf_counter()
        task = asyncio.create_task(relay.worker.run())
        deadline = start + 600
        while len(sink.messages) < n:
            if task.done() or time.perf_counter() > deadline:
                raise RuntimeError(f"worker stopped or stalled at {len(sink.messages)}/{n}")
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - start
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await relay.store.close()
        relay.cache.close()
    return elapsed, sink.connections


async def _ceiling(world: World, n: int) -> float:
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
    start = time.perf_counter()
    await client.connect()
    await client.starttls(server_hostname=MX, tls_context=ctx)
    for i in range(n):
        await client.sendmail("app@src.test", [f"u{i}@{DOMAIN}"], _message(i))
    await client.quit()
    elapsed = time.perf_counter() - start
    assert len(sink.messages) == n
    return elapsed


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
            ceiling = min(ceilings)
            reuse, reuse_conns = min(reuses)
            fresh, fresh_conns = await _relay_run(world, tmp, n, concurrency, 1)
        finally:
            await world.stop()
    rate = {k: n / v for k, v in (("ceiling", ceiling), ("reuse", reuse), ("fresh", fresh))}
    print(
        f"messages: {n} x 2 KiB, enforce domain, verified TLS; concurrency {concurrency};"
        f" best of {repeat} (no reuse: 1 run); DNS TTL 300"
    )
    print(f"ceiling  aiosmtplib loop, one TLS connection: {rate['ceiling']:8.1f} msgs/s")
    print(
        f"relay    with reuse (100 per connection):    {rate['reuse']:8.1f} msgs/s"
        f"  ({reuse_conns} connections)  {rate['reuse'] / rate['ceiling']:.0%} of ceiling"
    )
    print(
        f"relay    without reuse (1 per connection):   {rate['fresh']:8.1f} msgs/s"
        f"  ({fresh_conns} connections)  {rate['fresh'] / rate['ceiling']:.0%} of ceiling"
    )
    gain = rate["reuse"] / rate["fresh"]
    print(f"reuse / no reuse: {gain:.2f}x   (target: reuse >= 50% of ceiling)")


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=1000, help="messages per run")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="runs of ceiling and reuse")
    parser.add_argument("--quick", action="store_true", help="200 messages, 1 run each")
    return parser.parse_args()


if __name__ == "__main__":
    args = _args()
    asyncio.run(
        main(200 if args.quick else args.n, args.concurrency, 1 if args.quick else args.repeat)
    )
