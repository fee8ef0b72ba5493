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

History (`sts_policy_history`, `sts-relay policy history`): each stored policy that differs
from the last one known for its domain (the cached row, else the newest history entry) in
id, mode, mx patterns or max_age is recorded in the same transaction as the store, and
reported to `on_change` once committed (the relay logs `policy_changed`). The first policy
seen for a domain is recorded too (without a predecessor, and not reported). Bounded: the
newest HISTORY_PER_DOMAIN entries per domain, none older than HISTORY_DAYS.

Fetch state (`sts_fetch_backoff`), shared by every process on the file: per (domain, TXT
id) either a failed fetch to back off from until a time (STS-32), or a fetch claimed by one
process until a time, so that the others wait for its outcome instead of fetching too. The
rules (who claims, who waits, for how long) are the resolver's (policy/backoff.py); this
module stores them and reads them from SQLite every time (no memory layer). Rows are
short-lived: a stored policy clears its id's row, and any write deletes expired rows.

Schema: every table is created if missing when a cache is opened, which is also the whole
upgrade from an older file (`sts_fetch_backoff` is new; no table has changed columns), so
the `sts_` tables carry no version number.

Shared with the PostgreSQL engine (cache_postgres.py): the PolicyStore protocol and the
in-memory layer (PolicyMemory) here, the values and their rows in cache_rows.py (exported
here too); this module's own part is SQLite's SQL and connection.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from policy.cache_rows import HISTORY_DAYS as HISTORY_DAYS
from policy.cache_rows import HISTORY_PER_DOMAIN as HISTORY_PER_DOMAIN
from policy.cache_rows import CachedPolicy as CachedPolicy
from policy.cache_rows import FetchBackoff as FetchBackoff
from policy.cache_rows import FetchClaim as FetchClaim
from policy.cache_rows import PolicyChange as PolicyChange
from policy.cache_rows import (
    change_to_record,
    domain_key,
    fetch_state_from_row,
    fetch_state_row,
    history_cutoff,
    history_from_rows,
    history_row,
    policy_from_row,
    policy_row,
    stored_entry,
)

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
_HISTORY_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS sts_policy_history ("
    " id INTEGER PRIMARY KEY, domain TEXT NOT NULL, changed_at REAL NOT NULL,"
    " old_id TEXT, old_text TEXT,"  # NULL: the first policy seen for the domain
    " new_id TEXT NOT NULL, new_text TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS sts_policy_history_domain ON sts_policy_history(domain, id)",
)
_FETCH_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS sts_fetch_backoff (
    domain    TEXT NOT NULL,
    policy_id TEXT NOT NULL, -- the TXT record's id; '' after a refresh found no usable record
    state     TEXT NOT NULL, -- 'failed': back off until `until`; 'fetching': claimed until then
    until     REAL NOT NULL, -- wall-clock seconds
    result    TEXT NOT NULL, -- the failure's RFC 8460 result type ('' while fetching)
    detail    TEXT NOT NULL,
    PRIMARY KEY (domain, policy_id)
) WITHOUT ROWID
"""
_BUSY_TIMEOUT_MS = 10_000
# A claim comes before a fetch, on a delivery's path, and only saves a duplicate request:
# when the write lock is that busy, the caller fetches unclaimed instead of waiting.
_CLAIM_BUSY_TIMEOUT_MS = 1_000
REVALIDATE_AFTER_S = 5.0  # how stale a remembered entry may be (another process's change)
_MEMORY_LIMIT = 4096  # remembered domains; past it the stale ones are dropped


@dataclass(frozen=True, slots=True)
class Remembered:
    """What the database held for a domain (`entry`, None: nothing) when this process last
    looked."""

    entry: CachedPolicy | None


class PolicyCacheError(OSError):
    """The PostgreSQL cache (policy/cache_postgres.py) failed, or its database could not be
    reached; one line naming the database, never its password. The next call tries again."""


# What a cache call raises when its storage fails, whichever the engine.
CACHE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, PolicyCacheError)


class PolicyStore(Protocol):
    """A policy cache, whichever the engine: PolicyCache (SQLite, one host) or
    PostgresPolicyCache (policy/cache_postgres.py, shared by several nodes). The semantics
    are PolicyCache's; storage failures raise one of CACHE_ERRORS."""

    on_change: Callable[[PolicyChange], None] | None

    def remembered(self, domain: str) -> Remembered | None: ...

    def get(self, domain: str) -> CachedPolicy | None: ...

    def put(self, entry: CachedPolicy) -> None: ...

    def history(self, domain: str) -> list[PolicyChange]: ...

    def touch(self, domain: str, now: float) -> None: ...

    def forget(self, domain: str) -> bool: ...

    def all(self) -> list[CachedPolicy]: ...

    def fetch_state(
        self, domain: str, policy_id: str, now: float
    ) -> FetchBackoff | FetchClaim | None: ...

    def claim_fetch(
        self, domain: str, policy_id: str, now: float, until: float
    ) -> FetchBackoff | FetchClaim | None: ...

    def back_off(self, domain: str, policy_id: str, backoff: FetchBackoff, now: float) -> None: ...

    def clear_fetch_state(self, domain: str, policy_id: str) -> None: ...

    def close(self) -> None: ...


class PolicyMemory:
    """The in-memory copy in front of a cache's database, whichever the engine: per domain
    key, what the database held (an entry, or None) when this process last read or wrote
    it, trusted for `revalidate_after` seconds. Not locked: its engine changes it under its
    own lock, together with the statement it mirrors, so that its order is the database's."""

    def __init__(self, revalidate_after: float, monotonic: Callable[[], float]) -> None:
        self._revalidate_after = revalidate_after
        self._monotonic = monotonic
        self._seen: dict[str, tuple[CachedPolicy | None, float]] = {}  # key -> (entry, when)

    def recall(self, key: str) -> Remembered | None:
        """What was remembered for `key` less than `revalidate_after` seconds ago, or None."""
        seen = self._seen.get(key)
        if seen is None or self._monotonic() - seen[1] >= self._revalidate_after:
            return None
        return Remembered(seen[0])

    def remember(self, key: str, entry: CachedPolicy | None) -> None:
        """`entry` is what the database holds for `key` now."""
        now = self._monotonic()
        if len(self._seen) >= _MEMORY_LIMIT:
            stale = [
                k for k, (_, seen) in self._seen.items() if now - seen >= self._revalidate_after
            ]
            for k in stale:
                del self._seen[k]
            if len(self._seen) >= _MEMORY_LIMIT:
                self._seen.clear()
        self._seen[key] = (entry, now)

    def drop(self, key: str) -> None:
        """Forget `key` (before a write that may fail: the database is asked next time)."""
        self._seen.pop(key, None)

    def touch(self, key: str, now: float) -> None:
        """The remembered entry of `key`, if any, was used at `now`."""
        seen = self._seen.get(key)
        if seen is not None and seen[0] is not None and seen[0].last_used_at < now:
            self._seen[key] = (replace(seen[0], last_used_at=now), seen[1])

    def clear(self) -> None:
        self._seen.clear()


class PolicyCache:
    """Policies by domain in table `sts_policies`; corrupt rows are skipped, never fatal."""

    def __init__(
        self,
        db_path: str | Path,
        *,
        revalidate_after: float = REVALIDATE_AFTER_S,
        monotonic: Callable[[], float] = time.monotonic,
        on_change: Callable[[PolicyChange], None] | None = None,
    ) -> None:
        # Told of each committed change of a domain's policy (not of a first policy).
        self.on_change = on_change
        self._memory = PolicyMemory(revalidate_after, monotonic)  # changed only under _lock
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
            for statement in (*_HISTORY_SCHEMA, _FETCH_STATE_SCHEMA):
                self._db.execute(statement)
        except sqlite3.Error:
            self._db.close()
            raise

    def remembered(self, domain: str) -> Remembered | None:
        """Without touching SQLite: what get() returned or put() stored for `domain` less
        than `revalidate_after` seconds ago, or None (then call get())."""
        return self._memory.recall(domain_key(domain))

    def get(self, domain: str) -> CachedPolicy | None:
        """The cached entry for `domain`, expired or not; None if absent or corrupt."""
        key = domain_key(domain)
        with self._lock:
            row = self._db.execute(
                "SELECT domain, policy_id, policy_text, fetched_at, expires_at, last_used_at"
                " FROM sts_policies WHERE domain = ?",
                (key,),
            ).fetchone()
            entry = None if row is None else policy_from_row(row)
            self._memory.remember(key, entry)
        return entry

    def put(self, entry: CachedPolicy) -> None:
        """Store `entry`, replacing the domain's previous policy, and record it in the
        history when it differs from the last one known, and end the fetch state of
        its id (one transaction).

        A policy with max_age 0 applies only to the delivery at hand (STS-68): it is not
        stored, and since it supersedes the previous policy, that one is removed.
        """
        key = domain_key(entry.domain)
        with self._lock:
            self._memory.drop(key)  # if the write fails, SQLite is asked next time
            with self._transaction():
                change = self._record_change(key, entry)
                if entry.policy.max_age == 0:
                    self._db.execute("DELETE FROM sts_policies WHERE domain = ?", (key,))
                else:
                    self._db.execute(
                        "INSERT OR REPLACE INTO sts_policies (domain, policy_id, policy_text,"
                        " fetched_at, expires_at, last_used_at) VALUES (?, ?, ?, ?, ?, ?)",
                        policy_row(key, entry),
                    )
                # A fetch that succeeded ends its id's back-off or claim (waiters in other
                # processes then find the policy, committed with it) and a refresh's
                # no-record back-off.
                self._db.execute(
                    "DELETE FROM sts_fetch_backoff WHERE domain = ? AND policy_id IN (?, '')",
                    (key, entry.policy_id),
                )
            self._memory.remember(key, stored_entry(key, entry))
        if change is not None and change.old is not None and self.on_change is not None:
            self.on_change(change)

    def _record_change(self, key: str, entry: CachedPolicy) -> PolicyChange | None:
        """Inside put's transaction: the change `entry` makes, recorded (None: none)."""
        last = (
            self._db.execute(
                "SELECT policy_id, policy_text FROM sts_policies WHERE domain = ?", (key,)
            ).fetchone()
            or self._db.execute(
                "SELECT new_id, new_text FROM sts_policy_history WHERE domain = ?"
                " ORDER BY id DESC LIMIT 1",
                (key,),
            ).fetchone()
        )
        change = change_to_record(key, entry, last)
        if change is None:
            return None
        self._db.execute(
            "INSERT INTO sts_policy_history (domain, changed_at, old_id, old_text, new_id,"
            " new_text) VALUES (?, ?, ?, ?, ?, ?)",
            history_row(change),
        )
        self._db.execute(
            "DELETE FROM sts_policy_history WHERE domain = ? AND id NOT IN (SELECT id FROM"
            " sts_policy_history WHERE domain = ? ORDER BY id DESC LIMIT ?)",
            (key, key, HISTORY_PER_DOMAIN),
        )
        self._db.execute(
            "DELETE FROM sts_policy_history WHERE changed_at < ?",
            (history_cutoff(change.changed_at),),
        )
        return change

    def history(self, domain: str) -> list[PolicyChange]:
        """The recorded policies of `domain`, oldest first (unreadable entries skipped)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT domain, changed_at, old_id, old_text, new_id, new_text"
                " FROM sts_policy_history WHERE domain = ? ORDER BY id",
                (domain_key(domain),),
            ).fetchall()
        return history_from_rows(rows)

    def touch(self, domain: str, now: float) -> None:
        """Record that `domain`'s policy was used at `now` (drives proactive refresh)."""
        key = domain_key(domain)
        with self._lock:
            self._db.execute(
                "UPDATE sts_policies SET last_used_at = ? WHERE domain = ? AND last_used_at < ?",
                (now, key, now),
            )
            self._memory.touch(key, now)

    def forget(self, domain: str) -> bool:
        """Remove `domain`'s cached policy; True if there was one."""
        key = domain_key(domain)
        with self._lock:
            self._memory.drop(key)
            cursor = self._db.execute("DELETE FROM sts_policies WHERE domain = ?", (key,))
            self._memory.remember(key, None)
        return cursor.rowcount > 0

    def all(self) -> list[CachedPolicy]:
        """Every readable entry, by domain."""
        with self._lock:
            rows = self._db.execute(
                "SELECT domain, policy_id, policy_text, fetched_at, expires_at, last_used_at"
                " FROM sts_policies ORDER BY domain"
            ).fetchall()
        return [entry for entry in map(policy_from_row, rows) if entry is not None]

    def fetch_state(
        self, domain: str, policy_id: str, now: float
    ) -> FetchBackoff | FetchClaim | None:
        """The back-off or claim standing at `now` for (domain, policy_id), if any (an
        unreadable row counts as none: the fetch it would prevent is harmless)."""
        with self._lock:
            return self._fetch_state(domain_key(domain), policy_id, now)

    def claim_fetch(
        self, domain: str, policy_id: str, now: float, until: float
    ) -> FetchBackoff | FetchClaim | None:
        """Claim the fetch of (domain, policy_id) until `until`, unless a back-off or
        another claim stands at `now`: that one is returned, and None when the claim is
        the caller's (checked and written in one transaction, so one caller wins).
        Raises sqlite3.Error, after at most about a second when the write lock is held."""
        key = domain_key(domain)
        with self._lock:
            # Most calls find nothing standing; the write lock is taken only then.
            standing = self._fetch_state(key, policy_id, now)
            if standing is not None:
                return standing
            self._db.execute(f"PRAGMA busy_timeout = {_CLAIM_BUSY_TIMEOUT_MS}")
            try:
                with self._transaction():
                    standing = self._fetch_state(key, policy_id, now)
                    if standing is None:
                        self._write_fetch_state(key, policy_id, FetchClaim(until), now)
            finally:
                self._db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        return standing

    def back_off(self, domain: str, policy_id: str, backoff: FetchBackoff, now: float) -> None:
        """Record a failed fetch of (domain, policy_id), replacing its claim if any."""
        with self._lock, self._transaction():
            self._write_fetch_state(domain_key(domain), policy_id, backoff, now)

    def clear_fetch_state(self, domain: str, policy_id: str) -> None:
        """End the back-off or claim of (domain, policy_id), if any."""
        with self._lock:
            self._db.execute(
                "DELETE FROM sts_fetch_backoff WHERE domain = ? AND policy_id = ?",
                (domain_key(domain), policy_id),
            )

    def _fetch_state(
        self, key: str, policy_id: str, now: float
    ) -> FetchBackoff | FetchClaim | None:
        row = self._db.execute(
            "SELECT state, until, result, detail FROM sts_fetch_backoff"
            " WHERE domain = ? AND policy_id = ?",
            (key, policy_id),
        ).fetchone()
        return fetch_state_from_row(row, now)

    def _write_fetch_state(
        self, key: str, policy_id: str, state: FetchBackoff | FetchClaim, now: float
    ) -> None:
        """Inside a transaction: replace the row, and delete every expired one."""
        self._db.execute("DELETE FROM sts_fetch_backoff WHERE until <= ?", (now,))
        self._db.execute(
            "INSERT OR REPLACE INTO sts_fetch_backoff"
            " (domain, policy_id, state, until, result, detail) VALUES (?, ?, ?, ?, ?, ?)",
            fetch_state_row(key, policy_id, state),
        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction (under _lock): committed, or rolled back on any error."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._memory.clear()
            self._db.close()
