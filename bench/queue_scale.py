"""Queue scale: start-up time and memory of `sts-relay serve` with 100,000 queued messages,
and the time of bulk `sts-relay queue` commands on them.

    python -m bench.queue_scale                 # 100,000 messages of 1 KiB
    python -m bench.queue_scale --messages 20000 --quick

Fills a fresh store through the SqliteStore API (concurrent puts, group commit), then
starts the relay as a subprocess on it and prints: time from process start to the
`listening` event, VmRSS/VmHWM right then and after a few seconds of running (the worker
leases due work meanwhile; delivery goes to a DNS server that never answers, so leases
stay in flight and nothing is sent), the same relay's figures with an empty store as the
baseline, and the query plans of the due-work queries (they must use the partial index).
Targets (issue 3): ready in < 3 s, < 150 MB resident.

Then each bulk command (issue 13: list, hold, release, flush, bounce, delete over the whole
queue or a selection, each one transaction) runs as a subprocess on the full store, beside
the same command on the empty store (the command's own start-up cost) as the baseline.
Target: seconds, not minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mailqueue.model import NewMessage
from mailqueue.schedule import DEFAULT_RETRY_SCHEDULE
from mailqueue.sqlite import SqliteStore

DB_NAME = "relay.sqlite3"


async def _fill(db: Path, count: int, size: int) -> float:
    store = SqliteStore(db, schedule=DEFAULT_RETRY_SCHEDULE, lifetime=5 * 86400)
    await store.open()
    body = b"Subject: scale\r\n\r\n" + b"x" * max(0, size - 20) + b"\r\n"
    start = time.perf_counter()
    try:
        for first in range(0, count, 2000):
            batch = range(first, min(count, first + 2000))
            await asyncio.gather(
                *(
                    store.put(
                        NewMessage(
                            "app@src.test",
                            (f"u{i}@d{i % 500}.scale.test", f"v{i}@e{i % 300}.scale.test"),
                            body,
                        )
                    )
                    for i in batch
                )
            )
    finally:
        await store.close()
    return time.perf_counter() - start


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _config(work: Path, dns_port: int) -> Path:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    path = work / "relay.toml"
    path.write_text(
        f'[listen]\naddresses = ["127.0.0.1:{port}"]\n\n'
        f'[state]\npath = "{work}"\n\n'
        '[delivery]\nhostname = "relay.scale.test"\nshutdown_grace = 1\n\n'
        f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\ntimeout = 300\n\n'
        '[metrics]\naddress = ""\n\n[tlsrpt]\nenabled = false\n',
        encoding="utf-8",
    )
    return path


def start_relay(work: Path, settle: float) -> tuple[float, int, int, int, int]:
    """(seconds to `listening`, RSS and HWM at ready, RSS and HWM after `settle` s), KiB."""
    blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blackhole.bind(("127.0.0.1", 0))
    config = _config(work, blackhole.getsockname()[1])
    log = work / "relay.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STS_RELAY_")}
    with log.open("wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(  # noqa: S603 (our own interpreter and arguments)
            [sys.executable, "-m", "relay", "--config", str(config), "serve"],
            stdout=out,
            stderr=out,
            env=env,
        )
    try:
        while b'"listening"' not in log.read_bytes():
            if proc.poll() is not None or time.perf_counter() - start > 60:
                raise RuntimeError(f"relay did not start: {log.read_text()[-2000:]}")
            time.sleep(0.005)
        ready = time.perf_counter() - start
        rss, hwm = _status_kib(proc.pid, "VmRSS"), _status_kib(proc.pid, "VmHWM")
        time.sleep(settle)
        rss2, hwm2 = _status_kib(proc.pid, "VmRSS"), _status_kib(proc.pid, "VmHWM")
    finally:
        proc.kill()
        proc.wait()
        blackhole.close()
    return ready, rss, hwm, rss2, hwm2


_PLANS = {
    "lease (due work)": "SELECT message_id, domain FROM queue_recipients"
    " WHERE state IN ('queued', 'deferred') AND held = 0 AND next_attempt_at <= ?"
    " ORDER BY next_attempt_at",
    "next due": "SELECT MIN(next_attempt_at) FROM queue_recipients"
    " WHERE state IN ('queued', 'deferred') AND held = 0",
    "recover leases": "SELECT id FROM queue_recipients WHERE lease_owner IS NOT NULL",
}


def query_plans(db: Path) -> None:
    conn = sqlite3.connect(db)
    try:
        for name, sql in _PLANS.items():
            args = (time.time(),) if "?" in sql else ()
            plan = " / ".join(
                str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args)
            )
            started = time.perf_counter()
            conn.execute(sql + (" LIMIT 20" if "ORDER" in sql else ""), args).fetchall()
            took = (time.perf_counter() - started) * 1000
            print(f"  {name:<17} {took:7.2f} ms  {plan}")
    finally:
        conn.close()


def _row(label: str, figures: tuple[float, int, int, int, int]) -> None:
    ready, rss, hwm, rss2, hwm2 = figures
    print(
        f"{label:<22} ready {ready:5.2f} s   at ready: RSS {rss / 1024:6.1f} MB"
        f" HWM {hwm / 1024:6.1f} MB   later: RSS {rss2 / 1024:6.1f} MB HWM {hwm2 / 1024:6.1f} MB"
    )


# (label, arguments after `queue`): run in this order; later ones see what earlier ones left.
_ADMIN = (
    ("list (all, text)", ("list",)),
    ("list one domain (JSON)", ("list", "--domain", "d7.scale.test", "--json")),
    ("hold --all", ("hold", "--all", "--json")),
    ("release --state held", ("release", "--state", "held", "--json")),
    ("flush --all (all due)", ("flush", "--all", "--json")),  # scans all, changes none
    ("bounce one domain", ("bounce", "--domain", "d1.scale.test", "--json")),
    ("bounce --all (DSNs)", ("bounce", "--sender", "app@src.test", "--json")),
    ("delete --all", ("delete", "--all", "--json")),
)


def admin_command(work: Path, args: tuple[str, ...]) -> tuple[float, str]:
    """(seconds, what it says it did) of one `sts-relay queue ...` on `work`'s store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STS_RELAY_")}
    config = work / "relay.toml"  # written by start_relay
    start = time.perf_counter()
    done = subprocess.run(  # noqa: S603 (our own interpreter and arguments)
        [sys.executable, "-m", "relay", "--config", str(config), "queue", *args],
        capture_output=True,
        env=env,
        check=False,
    )
    took = time.perf_counter() - start
    said = done.stdout.decode(errors="replace")
    if "--json" in args and said.lstrip().startswith("{"):
        answer = json.loads(said)
        said = f"matched {answer.get('matched')}, changed {answer.get('count')}"
    elif "--json" in args:
        said = f"{len(json.loads(said or '[]'))} listed"
    else:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        said = lines[-1] if lines else ""
    return took, said


def admin_figures(empty: Path, full: Path) -> None:
    print("bulk queue commands (one transaction each; baseline: the same on the empty store):")
    for label, args in _ADMIN:
        base, _ = admin_command(empty, args)
        took, said = admin_command(full, args)
        print(f"  {label:<26} {took:6.2f} s  (empty store {base:4.2f} s)  {said}")
    print(
        "  (a bounce builds its reports before its write transaction: the running relay's"
        " writes wait only for the rest)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=1024, help="bytes per message")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to run after ready")
    parser.add_argument("--quick", action="store_true", help="settle 1 s")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    settle = 1.0 if args.quick else args.settle
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        empty, full = Path(tmp) / "empty", Path(tmp) / "full"
        empty.mkdir()
        full.mkdir()
        _row("empty store", start_relay(empty, settle))
        took = asyncio.run(_fill(full / DB_NAME, args.messages, args.size))
        size_mb = (full / DB_NAME).stat().st_size / 1e6
        print(
            f"filled {args.messages:,} messages (2 recipients each) in {took:.1f} s"
            f" ({args.messages / took:,.0f}/s), database {size_mb:,.0f} MB"
        )
        _row(f"{args.messages:,} queued", start_relay(full, settle))
        print("query plans on the full store (time for the first 20 rows):")
        query_plans(full / DB_NAME)
        admin_figures(empty, full)
        print("targets: ready < 3 s, resident < 150 MB; bulk commands in seconds")


if __name__ == "__main__":
    main()
