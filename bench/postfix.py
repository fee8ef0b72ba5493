"""Durable ingest: `sts-relay serve` beside Postfix's smtpd, measured in the same run.

    python -m bench.postfix            # 20 sessions x 2 KiB, both clients; ~60 s
    python -m bench.postfix --quick    # fewer messages, one round

Needs Debian's postfix package (for /usr/sbin/postfix and smtp-source) and root (Postfix's
master starts as root); it is never installed from here. Without them the bench says how to
get them and exits 0:

    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postfix
    postfix stop   # the package may start the system instance on port 25; this bench
                   # uses a private instance and does not need it

Both servers get the same load from the same client, all on loopback:
- `smtp-source -s 20 -m N -l 2048` (Postfix's own load generator: one connection per
  message, HELO, 2 KiB body), timed from start to exit;
- the asyncio client of bench/ingest.py (20 sessions, messages back to back per session).
Postfix runs as a private instance (`postfix -c <tmp>/etc`): its own main.cf/master.cf, queue
directory under the temp directory, no chroot, smtpd on a free 127.0.0.1 port. Mail stays
queued: by default an access rule puts every message on hold (cleanup writes and fsyncs the
queue file, qmgr never touches it); `--postfix-queue defer` instead lets qmgr take each
message and defer it (defer_transports = smtp), which costs Postfix qmgr and bounce work.
The relay's delivery side is kept idle as in bench/ingest.py (a DNS server that never answers).
Both servers run side by side and the rounds alternate between them (best of 3 each), so
load from elsewhere on a shared machine hits both alike.
CPU is summed over each server's process tree (Postfix: master and all its children,
including ones that exited; the load generator is not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.ingest import Figure, Server, free_port, measure_sessions, relay_server

POSTFIX = "/usr/sbin/postfix"
INSTALL_HINT = (
    "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postfix\n"
    "    (then `postfix stop` if the package started the system instance on port 25)"
)
SENDER = "app@src.test"
RECIPIENT = "u@nowhere.test"

_MASTER_CF = """\
{port} inet n - n - - smtpd
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
smtp unix - - n - - smtp
relay unix - - n - - smtp
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


def postfix_missing() -> str | None:
    """Why the Postfix side cannot run here, or None when it can."""
    if not Path(POSTFIX).exists():
        return f"{POSTFIX} not found"
    if shutil.which("smtp-source") is None:
        return "smtp-source not found"
    if os.geteuid() != 0:
        return "Postfix's master must be started as root"
    return None


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its reaped children and its live descendants (Linux /proc).

    Postfix's smtpd and cleanup processes exit after max_use clients; once the master reaps
    them their time moves to its cutime/cstime, so the sum stays consistent across samples.
    """
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # exited while we looked
            continue
        child = int(entry.name)
        children.setdefault(int(fields[1]), []).append(child)
        times[child] = sum(int(f) for f in fields[11:13])
        if child == pid:
            times[child] += sum(int(f) for f in fields[13:15])
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += times.get(current, 0.0)
        todo.extend(children.get(current, []))
    return total / os.sysconf("SC_CLK_TCK")


def postfix_config(work: Path, port: int, queue: str) -> Path:
    etc = work / "etc"
    etc.mkdir()
    (work / "queue").mkdir()  # postfix-script creates its subdirectories
    (work / "data").mkdir()
    shutil.chown(work / "data", user="postfix")  # master.lock is created as mail_owner
    dead = free_port()  # nothing listens there: should anything try to deliver, it fails
    if queue == "hold":
        keep = "smtpd_end_of_data_restrictions = check_client_access static:HOLD\n"
    else:
        keep = "defer_transports = smtp\n"
    (etc / "main.cf").write_text(
        f"""\
compatibility_level = 3.6
queue_directory = {work / "queue"}
data_directory = {work / "data"}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {work / "maillog"}
maillog_file_prefixes = {work}
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
relayhost = [127.0.0.1]:{dead}
message_size_limit = 52428800
biff = no
{keep}""",
        encoding="utf-8",
    )
    (etc / "master.cf").write_text(_MASTER_CF.format(port=port), encoding="utf-8")
    return etc


def _postfix(etc: Path, *command: str) -> None:
    done = subprocess.run(  # noqa: S603 (fixed binary, our own arguments)
        [POSTFIX, "-c", str(etc), *command], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        # Without a tty or syslog Postfix says why only in maillog_file (next to etc/).
        maillog = etc.parent / "maillog"
        log = maillog.read_text(errors="replace")[-1500:] if maillog.exists() else ""
        raise RuntimeError(f"postfix {' '.join(command)} failed: {done.stderr.strip()}\n{log}")


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _wait_listening(port: int, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"postfix not listening on 127.0.0.1:{port} within {within} s")


def queued(work: Path) -> int:
    """Messages Postfix holds on disk (incoming, active, deferred, hold)."""
    root = work / "queue"
    return sum(
        sum(1 for f in (root / name).rglob("*") if f.is_file())
        for name in ("incoming", "active", "deferred", "hold")
        if (root / name).exists()
    )


@contextlib.contextmanager
def postfix_server(work: Path, queue: str) -> Iterator[Server]:
    """A private Postfix instance on a free loopback port; stopped on exit."""
    port = free_port()
    etc = postfix_config(work, port, queue)
    _postfix(etc, "start")
    master = 0
    try:
        pid_file = work / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 20
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        master = int(pid_file.read_text().split()[0])
        _wait_listening(port)
        yield Server(port, master)
    finally:
        with contextlib.suppress(RuntimeError):
            _postfix(etc, "stop")
        deadline = time.monotonic() + 20
        while master and _alive(master) and time.monotonic() < deadline:
            time.sleep(0.05)
        if master and _alive(master):
            with contextlib.suppress(RuntimeError):
                _postfix(etc, "abort")


def smtp_source(server: Server, sessions: int, size: int, count: int) -> Figure:
    """Time `smtp-source` sending `count` messages; server CPU over the same interval."""
    argv = ["smtp-source", "-s", str(sessions), "-m", str(count), "-l", str(size)]
    argv += ["-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{server.port}"]
    cpu_start = tree_cpu(server.pid)
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603
    elapsed = time.perf_counter() - start
    cpu = tree_cpu(server.pid) - cpu_start
    if done.returncode != 0 or "fatal" in done.stderr:
        raise RuntimeError(f"smtp-source failed: {done.stderr.strip()[-500:]}")
    return Figure(count / elapsed, 1000 * cpu / count)


def asyncio_client(server: Server, sessions: int, size: int, seconds: float) -> Figure:
    return asyncio.run(measure_sessions(server, sessions, size, seconds, cpu=tree_cpu))


def measure(servers: tuple[Server, Server], args: argparse.Namespace, client: str) -> list[Figure]:
    """Best of `rounds` for each server, rounds interleaved so load from others hits both."""
    runs: list[list[Figure]] = [[] for _ in servers]
    if client == "smtp-source":
        for server in servers:
            smtp_source(server, args.sessions, args.size, min(200, args.messages))  # warm-up
    for _ in range(args.rounds):
        for server, figures in zip(servers, runs, strict=True):
            if client == "smtp-source":
                figures.append(smtp_source(server, args.sessions, args.size, args.messages))
            else:
                figures.append(asyncio_client(server, args.sessions, args.size, args.seconds))
    return [max(figures, key=lambda f: f.rate) for figures in runs]


def run(args: argparse.Namespace) -> None:
    if args.quick:
        args.messages, args.seconds, args.rounds = 1000, 1.5, 1
    version = subprocess.run(
        ["/usr/sbin/postconf", "-d", "-h", "mail_version"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    print(
        f"ingest vs Postfix {version}: {args.sessions} sessions x {args.size} B,"
        f" postfix queue mode={args.postfix_queue}, best of {args.rounds}, cpus={os.cpu_count()}"
    )
    print(
        f"{'client':<26} {'postfix/s':>9} {'relay/s':>8} {'ratio':>6}   cpu ms/msg: postfix relay"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # Postfix's daemons run as mail_owner and must reach the queue
        for client in ("smtp-source", "asyncio (bench.ingest)"):
            case = work / client.split()[0]
            (case / "postfix").mkdir(parents=True)
            (case / "relay").mkdir()
            with (
                postfix_server(case / "postfix", args.postfix_queue) as postfix_at,
                relay_server(case / "relay") as relay_at,
            ):
                postfix, relay = measure((postfix_at, relay_at), args, client)
                on_disk = queued(case / "postfix")
            ratio = relay.rate / postfix.rate if postfix.rate else 0.0
            print(
                f"{client:<26} {postfix.rate:>9,.0f} {relay.rate:>8,.0f} {ratio:>6.2f}"
                f"               {postfix.cpu_ms:>7.2f} {relay.cpu_ms:>5.2f}"
                f"   (postfix queue files on disk: {on_disk:,})",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1000 messages, one round")
    parser.add_argument("--sessions", type=int, default=20, help="concurrent SMTP sessions")
    parser.add_argument("--size", type=int, default=2048, help="message body bytes")
    parser.add_argument("--messages", type=int, default=2000, help="smtp-source -m per round")
    parser.add_argument("--seconds", type=float, default=3.0, help="asyncio client time")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs")
    parser.add_argument("--postfix-queue", choices=("hold", "defer"), default="hold")
    parser.add_argument("--dir", default=None, help="where the state goes (default: $TMPDIR)")
    args = parser.parse_args()
    missing = postfix_missing()
    if missing is not None:
        hint = "" if "root" in missing else f" To install Postfix (root):\n    {INSTALL_HINT}"
        print(f"bench.postfix skipped: {missing}.{hint}")
        return
    run(args)


if __name__ == "__main__":
    main()
