"""The persistent MTA-STS policy cache (RFC 8461 §3.3, §10.2) in SQLite.

Owns the `sts_` tables of the shared state database and nothing else in it (the mail
queue keeps its own tables in the same file). A persistent cache matters: an in-memory one
would let an attacker who blocks DNS or HTTPS after a restart downgrade delivery. Methods
are synchronous; async callers run them with asyncio.to_thread. Knows nothing about DNS,
HTTP or the §5.1 control flow (see resolver.py).

In front of SQLite sits a small in-memory copy of what this process last read or wrote per
domain, so that a delivery need not hop to a thread for every lookup (`remembered`, safe
on the event loop). Writes go through to SQLite first; a remembered entry is trusted for
`revalidate_after` seconds, then read again, so a change made by another process (the
`sts-relay policy forget` command) is seen within that time. SQLite stays the truth: a
restart starts with an empty memory and reads the persisted policies.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from policy.model import Policy
from policy.parse import InvalidPolicy, parse_policy

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sts_policies (
    domain       TEXT PRIMARY KEY,
    policy_id    TEXT NOT NULL,
    policy_text  TEXT NOT NULL,
    fetched_at   REAL NOT NULL,
    expires_at   REAL NOT NULL,
    last_used_at REAL NOT NULL
)
"""
_BUSY_TIMEOUT_MS = 10_000
REVALIDATE_AFTER_S = 5.0  # how stale a remembered entry may be (another process's change)
_MEMORY_LIMIT = 4096  # remembered domains; past it the stale ones are dropped


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    """A policy as cached for `domain`: fetched under TXT id `policy_id` at `fetched_at`."""

    domain: str
    policy_id: str
    policy: Policy
    fetched_at: float
    expires_at: float
    last_used_at: float


@dataclass(frozen=True, slots=True)
class Remembered:
    """What SQLite held for a domain (`entry`, None: nothing) when this process last looked."""

    entry: CachedPolicy | None


class PolicyCache:
    """Policies by domain in table `sts_policies`; corrupt rows are skipped, never fatal."""

    def __init__(
        self,
        db_path: str | Path,
        *,
        revalidate_after: float = REVALIDATE_AFTER_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._revalidate_after = revalidate_after
        self._monotonic = monotonic
        # domain -> (what SQLite held, when we saw it); changed only under _lock, together
        # with the SQLite statement it mirrors, so its order is SQLite's order.
        self._memory: dict[str, tuple[CachedPolicy | None, float]] = {}
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            str(db_path),
            timeout=_BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,  # autocommit: each statement is its own transaction
            check_same_thread=False,  # used from asyncio.to_thread workers, under _lock
        )
        try:
            self._db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA journal_mode = WAL")
            # A cached policy must survive a power loss as well as a restart (§10.2).
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute(_SCHEMA)
        except sqlite3.Error:
            self._db.close()
            raise

    def remembered(self, domain: str) -> Remembered | None:
        """Without touching SQLite: what get() returned or put() stored for `domain` less
        than `revalidate_after` seconds ago, or None (then call get())."""
        seen = self._memory.get(_key(domain))
        if seen is None or self._monotonic() - seen[1] >= self._revalidate_after:
            return None
        return Remembered(seen[0])

    def get(self, domain: str) -> CachedPolicy | None:
        """The cached entry for `domain`, expired or not; None if absent or corrupt."""
        key = _key(domain)
        with self._lock:
            row = self._db.execute(
                "SELECT domain, policy_id, policy_text, fetched_at, expires_at, last_used_at"
                " FROM sts_policies WHERE domain = ?",
                (key,),
            ).fetchone()
            entry = None if row is None else _from_row(row)
            self._remember(key, entry)
        return entry

    def put(self, entry: CachedPolicy) -> None:
        """Store `entry`, replacing the domain's previous policy.

        A policy with max_age 0 applies only to the delivery at hand (STS-68): it is not
        stored, and since it supersedes the previous policy, that one is removed.
        """
        if entry.policy.max_age == 0:
            self.forget(entry.domain)
            return
        key = _key(entry.domain)
        with self._lock:
            self._memory.pop(key, None)  # if the write fails, SQLite is asked next time
            self._db.execute(
                "INSERT OR REPLACE INTO sts_policies (domain, policy_id, policy_text, fetched_at,"
                " expires_at, last_used_at) VALUES (?, ?, ?, ?, ?, ?)",
                _row_of(key, entry),
            )
            self._remember(key, _from_row(_row_of(key, entry)))

    def touch(self, domain: str, now: float) -> None:
        """Record that `domain`'s policy was used at `now` (drives proactive refresh)."""
        key = _key(domain)
        with self._lock:
            self._db.execute(
                "UPDATE sts_policies SET last_used_at = ? WHERE domain = ? AND last_used_at < ?",
                (now, key, now),
            )
            seen = self._memory.get(key)
            if seen is not None and seen[0] is not None and seen[0].last_used_at < now:
                self._memory[key] = (replace(seen[0], last_used_at=now), seen[1])

    def forget(self, domain: str) -> bool:
        """Remove `domain`'s cached policy; True if there was one."""
        key = _key(domain)
        with self._lock:
            self._memory.pop(key, None)
            cursor = self._db.execute("DELETE FROM sts_policies WHERE domain = ?", (key,))
            self._remember(key, None)
        return cursor.rowcount > 0

    def all(self) -> list[CachedPolicy]:
        """Every readable entry, by domain."""
        with self._lock:
            rows = self._db.execute(
                "SELECT domain, policy_id, policy_text, fetched_at, expires_at, last_used_at"
                " FROM sts_policies ORDER BY domain"
            ).fetchall()
        return [entry for entry in map(_from_row, rows) if entry is not None]

    def close(self) -> None:
        with self._lock:
            self._memory.clear()
            self._db.close()

    def _remember(self, key: str, entry: CachedPolicy | None) -> None:
        now = self._monotonic()
        if len(self._memory) >= _MEMORY_LIMIT:
            stale = [
                k for k, (_, seen) in self._memory.items() if now - seen >= self._revalidate_after
            ]
            for k in stale:
                del self._memory[k]
            if len(self._memory) >= _MEMORY_LIMIT:
                self._memory.clear()
        self._memory[key] = (entry, now)


def _key(domain: str) -> str:
    return domain.lower().removesuffix(".")


def _row_of(key: str, entry: CachedPolicy) -> tuple[object, ...]:
    return (
        key,
        entry.policy_id,
        entry.policy.text,
        entry.fetched_at,
        entry.expires_at,
        entry.last_used_at,
    )


def _from_row(row: tuple[object, ...]) -> CachedPolicy | None:
    domain, policy_id, text, *times = row
    if not (isinstance(domain, str) and isinstance(policy_id, str) and isinstance(text, str)):
        return None
    numbers = [float(value) for value in times if isinstance(value, int | float)]
    if len(numbers) != 3:
        return None
    policy = _parse_stored(text)
    if policy is None:
        return None
    fetched_at, expires_at, last_used_at = numbers
    return CachedPolicy(domain, policy_id, policy, fetched_at, expires_at, last_used_at)


@functools.lru_cache(maxsize=1024)
def _parse_stored(text: str) -> Policy | None:
    # The stored body is the source of truth; re-parsing it rejects a damaged row.
    try:
        return parse_policy(text.encode("utf-8"))
    except (InvalidPolicy, UnicodeEncodeError):
        return None
