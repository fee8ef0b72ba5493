"""Queue scale: start-up time and memory of `sts-relay serve` with 1,000,000 queued
recipients, the query plans of what it runs per lease poll, per record and per metrics
scrape, and the time of bulk `sts-relay queue` commands on that queue.

    python -m bench.queue_scale                        # 1,000,000 recipients (250,000 messages)
    python -m bench.queue_scale --recipients 100000 --quick --no-admin

The queue's shape: messages of 1 KiB (`--size`), 4 recipients each (`--per-message`) at 3
domains (2 + 1 + 1, out of 2,000 domains): 750,000 (message, domain) lease groups. Of the
recipients, 10 % are queued and due now, 89 % deferred (1 to 6 attempts, due over the next
4 hours, a greylisting error), and those of 1 % of the messages still leased by a process
that died (a crash restart: `open()` recovers them); 5 % of the messages are held. The
store is filled directly through the store's own insert (sqlite_ops.insert_message, in
transactions of 5,000 messages, synchronous=OFF: filling is not what is measured), then
shaped with a few set-based UPDATEs.

Then the relay starts as a subprocess on it (`--processes` sets serve.processes; by default
the relay's own default, one process per CPU under a supervisor) and this prints: time
from process start to the `listening` event and to the first 200 from /readyz, the median
time of a /metrics scrape and a /readyz probe, and the memory of all its processes once
/readyz says ready and after a few seconds of running (the workers lease due work
meanwhile; delivery goes to a DNS server that never answers, so leases stay in flight and
nothing is sent), and the same relay's figures with an empty store as the baseline.

Then a SqliteStore opens the full store (the relay was killed: it recovers the relay's
leases) and runs what the relay runs: a put, a lease poll, an idle poll, record (a message
finished, a bounce with its DSN, a deferral), renew, release, the counts of a /metrics
scrape or readiness probe, the admin journal poll. Every SQL statement they execute is
traced and shown with its EXPLAIN QUERY PLAN; a plan that scans a queue table is flagged
(only the tiny queue_meta and queue_counts tables may be scanned). Then the counters are
checked against a full count of the rows, and the store is turned back into a schema 5
one (no counters) to time the migration a first start after upgrading runs.

Targets (issue 14, item 5): ready (listening and /readyz) in < 5 s; due work, records
and counts found without scanning the queue; memory < 200 MB, taken as the peak resident
memory (VmHWM) of every process of the relay summed (shared pages count once per process
there, so this overstates; PSS, which shares them out, is printed beside). Bulk commands
(issue 13): seconds, not minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import http.client
import json
import os
import random
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from mailqueue import sqlite_ops
from mailqueue.ids import QueueIds
from mailqueue.model import NewMessage, RcptState, RecipientResult
from mailqueue.schedule import DEFAULT_RETRY_SCHEDULE
from mailqueue.sqlite import SqliteStore

DB_NAME = "relay.sqlite3"
DOMAINS = 2000
LIFETIME = 5 * 86400.0
# Tables whose rows are bounded by the schema, not by the queue: a scan of them is cheap.
SMALL_TABLES = frozenset({"queue_meta", "queue_counts"})


def _recipients(i: int, per_message: int) -> tuple[str, ...]:
    """Recipient k of message i: the first two share a domain, each other one has its own."""
    out = []
    for k in range(per_message):
        dom = 0 if k < 2 else k - 1
        out.append(f"u{i}.{k}@d{(i + dom * 611) % DOMAINS}.scale.test")
    return tuple(out)


# Run in one transaction after the fill; `:now` is the fill's time.
_SHAPE = (
    "UPDATE queue_messages SET held = 1 WHERE id % 20 = 0",
    "UPDATE queue_recipients SET held = 1 WHERE message_id % 20 = 0",
    "UPDATE queue_recipients SET lease_owner = 'dead-node', lease_until = :now + 900,"
    " next_attempt_at = :now + 900 WHERE message_id % 100 = 1",
    "UPDATE queue_recipients SET state = 'deferred', attempts = 1 + id % 6,"
    " next_attempt_at = :now + 60 + (id * 7919) % 14400,"
    " last_error = '451 4.7.1 greylisted, try again later'"
    " WHERE id % 10 <> 0 AND message_id % 100 <> 1",
)


def fill(db: Path, recipients: int, per_message: int, size: int) -> tuple[int, float]:
    """(messages, seconds): the store filled and shaped as the module docstring says."""
    store = SqliteStore(db, schedule=DEFAULT_RETRY_SCHEDULE, lifetime=LIFETIME)
    asyncio.run(store.open())  # creates the schema
    asyncio.run(store.close())
    body = b"Subject: scale\r\n\r\n" + b"x" * max(0, size - 20) + b"\r\n"
    messages = -(-recipients // per_message)
    ids = QueueIds(random.Random(14))
    start = time.perf_counter()
    now = time.time()
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        for first in range(0, messages, 5000):
            conn.execute("BEGIN")
            for i in range(first, min(messages, first + 5000)):
                rcpts = _recipients(i, min(per_message, recipients - i * per_message))
                sqlite_ops.insert_message(conn, ids, NewMessage("app@src.test", rcpts, body), now)
            conn.execute("COMMIT")
        conn.execute("BEGIN")
        for statement in _SHAPE:
            conn.execute(statement, {"now": now})
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return messages, time.perf_counter() - start


def _status_kib(pid: int, key: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0  # gone meanwhile
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _pss_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (`serve` forks its processes: serve.processes)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


@dataclass(frozen=True, slots=True)
class Memory:
    """Over the relay's processes, KiB: VmRSS summed, VmHWM (peak RSS) summed and its
    largest, Pss summed (shared pages split between the processes that share them)."""

    processes: int
    rss: int
    hwm: int
    hwm_max: int
    pss: int

    @classmethod
    def of(cls, pid: int) -> Memory:
        pids = _tree(pid)
        hwms = [_status_kib(p, "VmHWM") for p in pids]
        return cls(
            len(pids),
            sum(_status_kib(p, "VmRSS") for p in pids),
            sum(hwms),
            max(hwms),
            sum(_pss_kib(p) for p in pids),
        )

    def __str__(self) -> str:
        return (
            f"{self.processes} processes: RSS {self.rss / 1024:5.1f} MB,"
            f" HWM {self.hwm / 1024:5.1f} MB (largest {self.hwm_max / 1024:4.1f}),"
            f" PSS {self.pss / 1024:5.1f} MB"
        )


def _free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


def _config(work: Path, dns_port: int, metrics_port: int, processes: int | None) -> Path:
    path = work / "relay.toml"
    serve = "" if processes is None else f"[serve]\nprocesses = {processes}\n\n"
    path.write_text(
        serve + f'[listen]\naddresses = ["127.0.0.1:{_free_port()}"]\n\n'
        f'[state]\npath = "{work}"\n\n'
        '[delivery]\nhostname = "relay.scale.test"\nshutdown_grace = 1\n\n'
        f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\ntimeout = 300\n\n'
        f'[metrics]\naddress = "127.0.0.1:{metrics_port}"\n\n[tlsrpt]\nenabled = false\n',
        encoding="utf-8",
    )
    return path


def _get(port: int, path: str) -> tuple[int, float]:
    """(HTTP status, milliseconds) of one GET on the relay's metrics address."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        status = response.status
    finally:
        conn.close()
    return status, (time.perf_counter() - start) * 1000


@dataclass(frozen=True, slots=True)
class Figures:
    ready: float  # seconds from process start to the `listening` event
    readyz: float  # ... to the first 200 from /readyz
    at_ready: Memory  # at the first 200 from /readyz
    later: Memory  # after `settle` seconds of running
    scrape_ms: float  # median of /metrics scrapes while running
    readyz_ms: float  # median of /readyz probes while running


def start_relay(work: Path, settle: float, processes: int | None) -> Figures:
    """Start `sts-relay serve` on `work`'s store, measure, kill it and its processes
    (their leases stay behind, as after a crash)."""
    blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blackhole.bind(("127.0.0.1", 0))
    metrics_port = _free_port()
    config = _config(work, blackhole.getsockname()[1], metrics_port, processes)
    log = work / "relay.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STS_RELAY_")}
    with log.open("wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(  # noqa: S603 (our own interpreter and arguments)
            [sys.executable, "-m", "relay", "--config", str(config), "serve"],
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,  # its own process group: its forks are killed with it
        )
    try:
        while b'"listening"' not in log.read_bytes():
            if proc.poll() is not None or time.perf_counter() - start > 120:
                raise RuntimeError(f"relay did not start: {log.read_text()[-2000:]}")
            time.sleep(0.005)
        ready = time.perf_counter() - start
        while _get(metrics_port, "/readyz")[0] != 200:
            if time.perf_counter() - start > 120:
                raise RuntimeError("relay never ready")
            time.sleep(0.005)
        readyz = time.perf_counter() - start
        at_ready = Memory.of(proc.pid)  # every process forked and ready by now
        scrapes = [_get(metrics_port, "/metrics")[1] for _ in range(5)]
        probes = [_get(metrics_port, "/readyz")[1] for _ in range(5)]
        time.sleep(max(0.0, settle - (time.perf_counter() - start - ready)))
        later = Memory.of(proc.pid)
    finally:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group of the relay started above
        proc.wait()
        _wait_unlocked(work / DB_NAME)
        blackhole.close()
    scrape, probe = statistics.median(scrapes), statistics.median(probes)
    return Figures(ready, readyz, at_ready, later, scrape, probe)


def _wait_unlocked(db: Path) -> None:
    """Until no process holds the store open (its lock file), at most 10 s: the next
    opener must be alone, as after a crash, to recover the leases."""
    fd = os.open(f"{db}.queue-lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the killed relay still holds the store") from None
                time.sleep(0.01)
                continue
            return
    finally:
        os.close(fd)


def _row(label: str, f: Figures) -> None:
    print(
        f"{label}: `listening` at {f.ready:.2f} s, /readyz 200 at {f.readyz:.2f} s;"
        f" /metrics scrape {f.scrape_ms:.1f} ms, /readyz {f.readyz_ms:.1f} ms (medians of 5)"
    )
    print(f"    at ready: {f.at_ready}")
    print(f"    later:    {f.later}")


# -- what the relay runs, traced ---------------------------------------------------------


class _TracedStore(SqliteStore):
    """A SqliteStore that notes every SQL statement its connections run, per phase, and
    whose clock can be moved back (`behind` seconds)."""

    phase = "open"
    behind = 0.0

    def __init__(self, db: Path) -> None:
        super().__init__(
            db,
            schedule=DEFAULT_RETRY_SCHEDULE,
            lifetime=LIFETIME,
            clock=lambda: time.time() - self.behind,
        )
        self.seen: list[tuple[str, str]] = []

    def _connect(self, *, readonly: bool) -> sqlite3.Connection:
        conn = super()._connect(readonly=readonly)
        conn.set_trace_callback(lambda sql: self.seen.append((self.phase, sql)))
        return conn


_LITERAL = re.compile(r"x'[0-9a-fA-F]*'|'(?:[^']|'')*'|\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b")
_DATA = ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "REPLACE")


def _plan(conn: sqlite3.Connection, sql: str) -> tuple[str, bool]:
    """(the plan on one line, whether it scans a queue table that grows with the queue)."""
    rows = conn.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
    details = [str(row[-1]) for row in rows]
    scans = [
        d
        for d in details
        if d.startswith("SCAN ") and d.split()[1] not in SMALL_TABLES and "json_each" not in d
    ]
    return " / ".join(details) or "(no table read: a plain insert)", bool(scans)


async def _timed(label: str, store: _TracedStore, call: Callable[[], Awaitable[object]]) -> object:
    store.phase = label
    start = time.perf_counter()
    result = await call()
    took = (time.perf_counter() - start) * 1000
    print(f"  {label:<44} {took:8.1f} ms")
    return result


async def _relay_calls(db: Path) -> tuple[_TracedStore, float]:
    """Run on the full store what the relay runs; returns the store (closed) and the
    median time of counts() (the /metrics scrape and the readiness probe), in ms."""
    store = _TracedStore(db)
    print("what the relay runs, on the full store (one call each):")
    await _timed("open (schema check, lease recovery)", store, store.open)
    print(f"    (recovered {store.recovered_leases:,} leases)")
    try:
        body = b"Subject: new\r\n\r\n" + b"x" * 1000 + b"\r\n"
        store.behind = 86400.0  # older than the rest: the next lease poll takes them first
        done, dsn = (
            NewMessage("app@src.test", (f"{name}@d{n}.scale.test",), body)
            for n, name in enumerate(("done", "bounced"))
        )
        first = await _timed("put (a new message)", store, lambda: store.put(done))
        second = await store.put(dsn)
        store.behind = 0.0
        leases = await _timed(
            "lease poll: lease_due(20)", store, lambda: store.lease_due("bench", 20, 600)
        )
        assert isinstance(leases, list)
        if len(leases) < 4 or [leases[0].queue_id, leases[1].queue_id] != [first, second]:
            raise RuntimeError(f"unexpected leases: {leases[:4]}")
        await _timed("idle poll: next_due_at", store, store.next_due_at)
        results = [
            [RecipientResult(r.address, state, "5.1.1 / 451") for r in lease.recipients]
            for lease, state in zip(
                leases, (RcptState.SENT, RcptState.BOUNCED, RcptState.DEFERRED), strict=False
            )
        ]
        report = NewMessage("", ("app@src.test",), b"Subject: failure\r\n\r\nbounced\r\n")
        await _timed(
            "record (sent: message done, deleted)",
            store,
            lambda: store.record(leases[0], results[0]),
        )
        await _timed(
            "record (bounced, with its DSN)",
            store,
            lambda: store.record(leases[1], results[1], report),
        )
        await _timed("record (deferred)", store, lambda: store.record(leases[2], results[2]))
        renewed = await _timed("renew", store, lambda: store.renew(leases[3], leases[3].until + 60))
        assert renewed is not None
        await _timed("release", store, lambda: store.release(renewed))  # type: ignore[arg-type]
        await _timed("counts (/metrics scrape, readiness)", store, store.counts)
        await _timed("journal poll", store, lambda: _journal_poll(store))
        store.phase = "timing"
        times = []
        for _ in range(5):
            start = time.perf_counter()
            await store.counts()
            times.append((time.perf_counter() - start) * 1000)
    finally:
        await store.close()
    return store, statistics.median(times)


async def _journal_poll(store: SqliteStore) -> None:
    await store.journal(await store.journal_logged())


def query_plans(db: Path) -> bool:
    """Print the plan of every statement the relay's calls ran; True when none scans."""
    store, counts_ms = asyncio.run(_relay_calls(db))
    print(f"  counts(), median of 5: {counts_ms:.2f} ms")
    print("query plans of every statement they ran (literals shown as ?):")
    conn = sqlite3.connect(db)
    clean = True
    shown: set[str] = set()
    try:
        for phase, sql in store.seen:
            if phase == "timing" or not sql.lstrip().upper().startswith(_DATA):
                continue
            shape = _LITERAL.sub("?", sql)
            if shape in shown:
                continue
            shown.add(shape)
            plan, scans = _plan(conn, sql)
            clean = clean and not scans
            print(f"  [{phase}] {shape}")
            print(f"      {'FULL SCAN: ' if scans else ''}{plan}")
    finally:
        conn.close()
    print(
        "  (and the triggers: each insert or delete of a row, and each change of a recipient's"
        " state or held flag, adds to one queue_counts row, found by its primary key)"
    )
    return clean


# -- the counters -------------------------------------------------------------------------

# What counts() computed by scanning before schema 6: the reference for the counters.
_SCANNED = (
    "SELECT COALESCE(SUM(held <> 2 AND state = 'queued'), 0),"
    " COALESCE(SUM(held <> 2 AND state = 'deferred'), 0),"
    " COALESCE(SUM(held <> 2 AND state = 'sent'), 0),"
    " COALESCE(SUM(held <> 2 AND state = 'bounced'), 0),"
    " COALESCE(SUM(held = 1), 0), COUNT(*),"
    " (SELECT COUNT(*) FROM queue_messages) FROM queue_recipients"
)


def _scanned(db: Path) -> tuple[dict[str, int], float]:
    """The counts by a full scan of the queue, and its time in ms."""
    conn = sqlite3.connect(db)
    try:
        start = time.perf_counter()
        q, d, s, b, held, total, messages = conn.execute(_SCANNED).fetchone()
        took = (time.perf_counter() - start) * 1000
    finally:
        conn.close()
    out = {"queued": q, "deferred": d, "sent": s, "bounced": b, "held": held}
    return out | {"set_aside": total - q - d - s - b, "messages": messages}, took


async def _open_counts(db: Path) -> tuple[float, int | None, dict[str, int]]:
    store = SqliteStore(db, schedule=DEFAULT_RETRY_SCHEDULE, lifetime=LIFETIME)
    start = time.perf_counter()
    await store.open()
    took = time.perf_counter() - start
    try:
        return took, store.migrated_from, await store.counts()
    finally:
        await store.close()


def counters(db: Path) -> bool:
    """Print how the counters compare with a full count, before and after migrating a
    store of schema 5 (no counters) to 6; True when they agree."""
    scanned, scan_ms = _scanned(db)
    _, _, counted = asyncio.run(_open_counts(db))
    print(f"counts: {counted}")
    print(f"  the same by a full count of the rows (what a scrape cost before): {scan_ms:.0f} ms")
    agree = counted == scanned
    print(f"  counters agree with the full count: {'yes' if agree else f'NO: {scanned}'}")
    conn = sqlite3.connect(db, isolation_level=None)
    try:  # back to what schema 5 was: no counters, no triggers
        conn.execute("BEGIN IMMEDIATE")
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'queue_%count%'"
        ).fetchall():
            conn.execute(f'DROP TRIGGER "{name}"')
        conn.execute("DROP TABLE queue_counts")
        conn.execute("UPDATE queue_meta SET value = '5' WHERE key = 'schema_version'")
        conn.execute("COMMIT")
    finally:
        conn.close()
    took, found, migrated = asyncio.run(_open_counts(db))
    print(
        f"  opening it as a schema {found} store (migration to 6 counts the rows once):"
        f" {took:.2f} s; counters then agree: {'yes' if migrated == scanned else 'NO'}"
    )
    return agree and migrated == scanned


# -- bulk administration -------------------------------------------------------------------

# (label, arguments after `queue`): run in this order; later ones see what earlier ones left.
_ADMIN = (
    ("list (all, text)", ("list",)),
    ("list one domain (JSON)", ("list", "--domain", "d7.scale.test", "--json")),
    ("hold --all", ("hold", "--all", "--json")),
    ("release --state held", ("release", "--state", "held", "--json")),
    ("flush --all (all due)", ("flush", "--all", "--json")),
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


def _verdict(name: str, holds: bool, figure: str) -> None:
    print(f"  {name:<52} {figure:<22} {'holds' if holds else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--recipients", type=int, default=1_000_000)
    parser.add_argument("--per-message", type=int, default=4, help="recipients per message")
    parser.add_argument("--size", type=int, default=1024, help="bytes per message")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to run after ready")
    parser.add_argument("--quick", action="store_true", help="settle 1 s")
    parser.add_argument("--no-admin", action="store_true", help="skip the bulk commands")
    parser.add_argument(
        "--processes", type=int, default=None, help="serve.processes (default: the relay's)"
    )
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    settle = 1.0 if args.quick else args.settle
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        empty, full = Path(tmp) / "empty", Path(tmp) / "full"
        empty.mkdir()
        full.mkdir()
        _row("empty store", start_relay(empty, settle, args.processes))
        messages, took = fill(full / DB_NAME, args.recipients, args.per_message, args.size)
        size_mb = (full / DB_NAME).stat().st_size / 1e6
        print(
            f"filled {args.recipients:,} recipients in {messages:,} messages"
            f" ({args.per_message} each) in {took:.1f} s, database {size_mb:,.0f} MB"
        )
        figures = start_relay(full, settle, args.processes)
        _row(f"{args.recipients:,} queued", figures)
        clean = query_plans(full / DB_NAME)
        agree = counters(full / DB_NAME)
        if not args.no_admin:
            admin_figures(empty, full)
        ready = max(figures.ready, figures.readyz)
        peak = max(figures.at_ready.hwm, figures.later.hwm) / 1024
        print(f"targets with {args.recipients:,} queued recipients:")
        _verdict("ready to accept (listening, /readyz 200) < 5 s", ready < 5, f"{ready:.2f} s")
        _verdict("due work, records, counts: no scan of the queue", clean, "see the plans")
        _verdict("counters agree with a full count", agree, "")
        _verdict("memory < 200 MB (VmHWM summed over processes)", peak < 200, f"{peak:.1f} MB")


if __name__ == "__main__":
    main()
