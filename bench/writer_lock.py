"""Two processes writing one queue database: group commit with and without the write lock.

    python -m bench.writer_lock            # 2 processes x 20 writers, 4 s per figure; ~30 s
    python -m bench.writer_lock --quick    # 1.5 s per figure

Each process (a subprocess of this one) opens its own SqliteStore on the SAME database file
(as `serve` with serve.processes = 2 does) and runs `--writers` coroutines, each putting
2 KiB messages back to back for the same few seconds. Figures per mode: puts/s of both
processes together, commits/s (each commit is one fsync'd group), and the latency of a
put (p50, p99, max). Modes:
- one process alone (the same total number of writers): the ceiling;
- two processes, writer lock (mailqueue/writer.py: an flock beside the database, held per
  transaction: a waiting writer wakes the moment the other one commits);
- two processes, SQLite's busy handler alone (it sleeps 1, 2, 5, 10, ... 100 ms between
  tries while the other process holds the write lock).
Printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mailqueue.model import NewMessage
from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite import SqliteStore
from mailqueue.writer import GroupCommitWriter


class _NoLockWriter(GroupCommitWriter):
    def _lock(self) -> int | None:
        return None  # busy_timeout alone orders the processes


class _NoLockStore(SqliteStore):
    writer_class = _NoLockWriter


def _message(size: int) -> bytes:
    head = b"From: app@src.test\r\nTo: u@nowhere.test\r\nSubject: bench\r\n\r\n"
    return head + b"x" * max(0, size - len(head) - 2) + b"\r\n"


async def _child(
    db: Path, lock: bool, writers: int, start_at: float, seconds: float
) -> dict[str, object]:
    store_class = SqliteStore if lock else _NoLockStore
    store = store_class(db, schedule=RetrySchedule((300.0,)), lifetime=86400.0)
    await store.open()
    data = _message(2048)
    latencies: list[float] = []
    commits_before = store.commits
    await asyncio.sleep(max(0.0, start_at - time.time()))
    stop = time.monotonic() + seconds

    async def writer() -> None:
        while time.monotonic() < stop:
            began = time.perf_counter()
            await store.put(NewMessage("app@src.test", ("u@nowhere.test",), data, "127.0.0.1"))
            latencies.append(time.perf_counter() - began)

    await asyncio.gather(*(writer() for _ in range(writers)))
    commits = store.commits - commits_before
    await store.close()
    return {"puts": len(latencies), "commits": commits, "latencies": latencies}


def _run_child(args: argparse.Namespace) -> None:
    result = asyncio.run(
        _child(Path(args.db), args.lock == "on", args.writers, args.start_at, args.seconds)
    )
    print(json.dumps(result))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def measure(work: Path, processes: int, writers: int, lock: bool, seconds: float) -> str:
    db = work / f"queue-{processes}-{int(lock)}.sqlite3"
    start_at = time.time() + 1.5  # every process open and waiting
    argv = [sys.executable, "-m", "bench.writer_lock", "--child", "--db", str(db)]
    argv += ["--lock", "on" if lock else "off", "--writers", str(writers)]
    argv += ["--start-at", str(start_at), "--seconds", str(seconds)]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)  # noqa: S603 (our own)
        for _ in range(processes)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"child failed: {proc.returncode}")
        results.append(json.loads(out))
    puts = sum(int(r["puts"]) for r in results)
    commits = sum(int(r["commits"]) for r in results)
    latencies = [float(x) for r in results for x in r["latencies"]]
    share = "/".join(str(r["puts"]) for r in results)
    return (
        f"{puts / seconds:>8,.0f} {commits / seconds:>10,.0f} {puts / max(1, commits):>8.1f}"
        f" {1000 * _percentile(latencies, 0.5):>8.1f} {1000 * _percentile(latencies, 0.99):>8.1f}"
        f" {1000 * max(latencies, default=float('nan')):>8.1f}   {share}"
    )


def run(args: argparse.Namespace) -> None:
    seconds = 1.5 if args.quick else args.seconds
    print(
        f"writer lock bench: {args.processes} processes x {args.writers} writers, 2 KiB puts,"
        f" {seconds:.1f} s per figure, cpus={os.cpu_count()}"
    )
    print(
        f"{'mode':<34} {'puts/s':>8} {'commits/s':>10} {'puts/cmt':>8}"
        f" {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}   puts per process"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        for _ in range(args.rounds):
            alone = measure(work, 1, args.writers * args.processes, True, seconds)
            print(f"{'1 process (same writers in total)':<34} {alone}", flush=True)
            locked = measure(work, args.processes, args.writers, True, seconds)
            print(f"{f'{args.processes} processes, writer lock':<34} {locked}", flush=True)
            busy = measure(work, args.processes, args.writers, False, seconds)
            print(f"{f'{args.processes} processes, busy_timeout alone':<34} {busy}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1.5 s per figure")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--writers", type=int, default=20, help="put() callers per process")
    parser.add_argument("--dir", default=None, help="where the database goes ($TMPDIR)")
    child = parser.add_argument_group("internal: one writing process")
    child.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    child.add_argument("--db", help=argparse.SUPPRESS)
    child.add_argument("--lock", choices=("on", "off"), help=argparse.SUPPRESS)
    child.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _run_child(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
