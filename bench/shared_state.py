"""The shared PostgreSQL of the benches' engine dimension (issue 15: `state.url`).

The tests' server (tests/support/postgres.py): Debian's binaries, a cluster in a temporary
directory on this machine, TCP on loopback, every commit waiting for its fsync as in
production (fsync on, synchronous_commit on); as root it runs as the `postgres` user. The
benches count its CPU (the postmaster and every backend and helper it forked, live or
reaped) beside the relay's: with SQLite the store's work is in the relay's process, with
PostgreSQL most of it is in the server's.
"""

from __future__ import annotations

import contextlib
import glob
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.support.postgres import PostgresServer

ENGINES = ("sqlite", "postgres")


def parse_engines(text: str) -> list[str]:
    engines = [e for e in text.split(",") if e]
    if not engines or not set(engines) <= set(ENGINES):
        raise SystemExit(f"--engines: one or more of {', '.join(ENGINES)}")
    return engines


def parse_nodes(text: str) -> list[int]:
    try:
        nodes = [int(n) for n in text.split(",") if n]
    except ValueError:
        nodes = []
    if not nodes or min(nodes) < 1:
        raise SystemExit("--nodes: node counts, e.g. 1,2")
    return nodes


@contextlib.contextmanager
def database_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the run (a fresh cluster, removed at the end)."""
    if not any(Path(d, "pg_ctl").exists() for d in glob.glob("/usr/lib/postgresql/*/bin")):
        raise SystemExit("PostgreSQL binaries not found: apt-get install postgresql")
    from tests.support.postgres import postgres_server

    with postgres_server() as server:
        yield server


def server_pid(server: PostgresServer) -> int:
    """The postmaster's pid (first line of postmaster.pid): the root of the server's tree."""
    return int((server.data / "postmaster.pid").read_text().split()[0])
