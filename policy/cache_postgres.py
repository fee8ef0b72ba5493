"""The MTA-STS policy cache in PostgreSQL, shared by every relay node on one database
(`state.url = postgresql://...`, issue 15): the PostgreSQL engine of policy/cache.py.

Same tables, methods and semantics as PolicyCache (SQLite), so the resolver and the
commands take either (the PolicyStore protocol): the in-memory layer in front of the
database (`remembered`, trusted for `revalidate_after` seconds, so another node's `policy
forget` or newer policy is seen within that time), the change history recorded in the
store's transaction, and the fetch state (back-offs and claims per (domain, TXT id)) read
from the database every time. Through the database the claim holds across nodes: one
node fetches a domain's policy, the others wait for its outcome or honour its back-off.

Owns the `sts_` tables of the shared database and its row `policy-cache` in the schema
versions table (`sts_relay_schema`), nothing else. The schema is created or upgraded when a
cache is opened, under a transaction-scoped advisory lock that the TLS report and
posture stores take too, so nodes starting at once on an empty database do not race.
Methods are synchronous and thread-safe (one connection, under a lock); async callers run
them with asyncio.to_thread. A failure of the database or of the connection
raises PolicyCacheError (an OSError); the next call connects again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

from pgstate.connection import Connection, Database
from policy.cache import REVALIDATE_AFTER_S, PolicyCacheError, PolicyMemory, Remembered
from policy.cache_rows import (
    FETCHING,
    HISTORY_PER_DOMAIN,
    CachedPolicy,
    FetchBackoff,
    FetchClaim,
    PolicyChange,
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

COMPONENT: Final = "policy-cache"
# Each entry upgrades the schema by one version; the version is the number applied.
MIGRATIONS: Final[Sequence[Sequence[str]]] = (
    (
        """CREATE TABLE sts_policies (
            domain       TEXT PRIMARY KEY,
            policy_id    TEXT NOT NULL,
            policy_text  TEXT NOT NULL,
            fetched_at   DOUBLE PRECISION NOT NULL,
            expires_at   DOUBLE PRECISION NOT NULL,
            last_used_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE sts_policy_history (
            id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            domain     TEXT NOT NULL,
            changed_at DOUBLE PRECISION NOT NULL,
            old_id     TEXT, -- NULL: the first policy seen for the domain
            old_text   TEXT,
            new_id     TEXT NOT NULL,
            new_text   TEXT NOT NULL
        )""",
        "CREATE INDEX sts_policy_history_domain ON sts_policy_history (domain, id)",
        "CREATE INDEX sts_policy_history_changed ON sts_policy_history (changed_at)",
        """CREATE TABLE sts_fetch_backoff (
            domain    TEXT NOT NULL,
            policy_id TEXT NOT NULL, -- '' after a refresh found no usable record
            state     TEXT NOT NULL, -- 'failed': back off until `until`; 'fetching': claimed
            until     DOUBLE PRECISION NOT NULL, -- wall-clock seconds
            result    TEXT NOT NULL, -- the failure's RFC 8460 result type ('' while fetching)
            detail    TEXT NOT NULL,
            PRIMARY KEY (domain, policy_id)
        )""",
    ),
)
_PUT_LOCK: Final = 0x5354_5301  # with hashtext(domain): one store of a domain at a time
_SESSION: Final = {
    "statement_timeout": "10s",  # SQLite's busy timeout
    # A cached policy must survive the server's crash as well as the relay's (§10.2).
    "synchronous_commit": "on",
}
# A claim comes before a fetch, on a delivery's path, and only saves a duplicate request:
# when its row is locked that long, the caller fetches unclaimed instead of waiting.
_CLAIM_LOCK_TIMEOUT: Final = "1s"
RECONNECT_PAUSE_S: Final = 1.0  # after a failed connection, calls fail at once this long


class PostgresPolicyCache:
    """Policies by domain in table `sts_policies` of a PostgreSQL database; corrupt rows are
    skipped, never fatal. Raises PolicyCacheError when the database cannot be used (at
    construction too: an unreachable database at start is an error)."""

    def __init__(
        self,
        url: str,
        *,
        revalidate_after: float = REVALIDATE_AFTER_S,
        monotonic: Callable[[], float] = time.monotonic,
        on_change: Callable[[PolicyChange], None] | None = None,
        reconnect_pause: float = RECONNECT_PAUSE_S,
    ) -> None:
        self.on_change = on_change  # told of each committed change (not of a first policy)
        self._memory = PolicyMemory(revalidate_after, monotonic)  # changed only under _lock
        self._lock = threading.Lock()
        self._db = Database(
            url,
            PolicyCacheError,
            component=COMPONENT,
            migrations=MIGRATIONS,
            session=_SESSION,
            reconnect_pause=reconnect_pause,
            monotonic=monotonic,
        )

    def remembered(self, domain: str) -> Remembered | None:
        """Without touching the database: what get() returned or put() stored for `domain`
        less than `revalidate_after` seconds ago, or None (then call get())."""
        return self._memory.recall(domain_key(domain))

    def get(self, domain: str) -> CachedPolicy | None:
        """The cached entry for `domain`, expired or not; None if absent or corrupt."""
        key = domain_key(domain)
        with self._lock:
            row = self._db.read(
                lambda db: db.execute(
                    "SELECT domain, policy_id, policy_text, fetched_at, expires_at,"
                    " last_used_at FROM sts_policies WHERE domain = %s",
                    (key,),
                ).fetchone()
            )
            entry = None if row is None else policy_from_row(row)
            self._memory.remember(key, entry)
        return entry

    def put(self, entry: CachedPolicy) -> None:
        """Store `entry` (max_age 0: remove the domain's policy, STS-68), record it in the
        history when it differs from the last one known, and end the fetch state of its
        id, in one transaction; then tell on_change of a change."""
        key = domain_key(entry.domain)
        with self._lock:
            self._memory.drop(key)  # if the write fails, the database is asked next time
            change = self._db.write(lambda db: _put(db, key, entry))
            self._memory.remember(key, stored_entry(key, entry))
        if change is not None and change.old is not None and self.on_change is not None:
            self.on_change(change)

    def history(self, domain: str) -> list[PolicyChange]:
        """The recorded policies of `domain`, oldest first (unreadable entries skipped)."""
        with self._lock:
            rows = self._db.read(
                lambda db: db.execute(
                    "SELECT domain, changed_at, old_id, old_text, new_id, new_text"
                    " FROM sts_policy_history WHERE domain = %s ORDER BY id",
                    (domain_key(domain),),
                ).fetchall()
            )
        return history_from_rows(rows)

    def touch(self, domain: str, now: float) -> None:
        """Record that `domain`'s policy was used at `now` (drives proactive refresh)."""
        key = domain_key(domain)
        with self._lock:
            self._db.write(
                lambda db: db.execute(
                    "UPDATE sts_policies SET last_used_at = %s"
                    " WHERE domain = %s AND last_used_at < %s",
                    (now, key, now),
                )
            )
            self._memory.touch(key, now)

    def forget(self, domain: str) -> bool:
        """Remove `domain`'s cached policy; True if there was one."""
        key = domain_key(domain)
        with self._lock:
            self._memory.drop(key)
            removed = self._db.write(
                lambda db: db.execute("DELETE FROM sts_policies WHERE domain = %s", (key,))
            ).rowcount
            self._memory.remember(key, None)
        return removed > 0

    def all(self) -> list[CachedPolicy]:
        """Every readable entry, by domain."""
        with self._lock:
            rows = self._db.read(
                lambda db: db.execute(
                    "SELECT domain, policy_id, policy_text, fetched_at, expires_at,"
                    " last_used_at FROM sts_policies ORDER BY domain"
                ).fetchall()
            )
        return [entry for entry in map(policy_from_row, rows) if entry is not None]

    def fetch_state(
        self, domain: str, policy_id: str, now: float
    ) -> FetchBackoff | FetchClaim | None:
        """The back-off or claim standing at `now` for (domain, policy_id), whichever node
        wrote it (an unreadable row counts as none)."""
        key = domain_key(domain)
        with self._lock:
            return self._db.read(lambda db: _standing(db, key, policy_id, now))

    def claim_fetch(
        self, domain: str, policy_id: str, now: float, until: float
    ) -> FetchBackoff | FetchClaim | None:
        """Claim the fetch of (domain, policy_id) until `until`, unless a back-off or
        another claim stands at `now`: that one is returned, and None when the claim is
        the caller's (checked and written in one transaction, so one node wins). Raises
        PolicyCacheError, after about a second when another transaction holds the row."""
        key = domain_key(domain)
        with self._lock:
            # Most calls find nothing standing; the row is locked only then.
            standing = self._db.read(lambda db: _standing(db, key, policy_id, now))
            if standing is not None:
                return standing
            return self._db.write(lambda db: _claim(db, key, policy_id, now, until))

    def back_off(self, domain: str, policy_id: str, backoff: FetchBackoff, now: float) -> None:
        """Record a failed fetch of (domain, policy_id), replacing its claim if any."""
        key = domain_key(domain)
        with self._lock:
            self._db.write(lambda db: _write_state(db, key, policy_id, backoff, now))

    def clear_fetch_state(self, domain: str, policy_id: str) -> None:
        """End the back-off or claim of (domain, policy_id), if any."""
        key = domain_key(domain)
        with self._lock:
            self._db.write(
                lambda db: db.execute(
                    "DELETE FROM sts_fetch_backoff WHERE domain = %s AND policy_id = %s",
                    (key, policy_id),
                )
            )

    def close(self) -> None:
        with self._lock:
            self._memory.clear()
            self._db.close()


# --- statements, inside the transaction the caller opened ----------------------------------


def _put(db: Connection, key: str, entry: CachedPolicy) -> PolicyChange | None:
    # Two nodes storing one domain's policy at once must not both record the same change.
    db.execute("SELECT pg_advisory_xact_lock(%s::integer, hashtext(%s))", (_PUT_LOCK, key))
    change = _record_change(db, key, entry)
    if entry.policy.max_age == 0:
        db.execute("DELETE FROM sts_policies WHERE domain = %s", (key,))
    else:
        db.execute(
            "INSERT INTO sts_policies (domain, policy_id, policy_text, fetched_at, expires_at,"
            " last_used_at) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (domain) DO UPDATE"
            " SET policy_id = excluded.policy_id, policy_text = excluded.policy_text,"
            " fetched_at = excluded.fetched_at, expires_at = excluded.expires_at,"
            " last_used_at = excluded.last_used_at",
            policy_row(key, entry),
        )
    # A fetch that succeeded ends its id's back-off or claim (waiters on other nodes then
    # find the policy, committed with it) and a refresh's no-record back-off.
    db.execute(
        "DELETE FROM sts_fetch_backoff WHERE domain = %s AND policy_id IN (%s, '')",
        (key, entry.policy_id),
    )
    return change


def _record_change(db: Connection, key: str, entry: CachedPolicy) -> PolicyChange | None:
    """The change `entry` makes, recorded (None: none); as PolicyCache._record_change."""
    last = (
        db.execute(
            "SELECT policy_id, policy_text FROM sts_policies WHERE domain = %s", (key,)
        ).fetchone()
        or db.execute(
            "SELECT new_id, new_text FROM sts_policy_history WHERE domain = %s"
            " ORDER BY id DESC LIMIT 1",
            (key,),
        ).fetchone()
    )
    change = change_to_record(key, entry, last)
    if change is None:
        return None
    db.execute(
        "INSERT INTO sts_policy_history (domain, changed_at, old_id, old_text, new_id,"
        " new_text) VALUES (%s, %s, %s, %s, %s, %s)",
        history_row(change),
    )
    db.execute(
        "DELETE FROM sts_policy_history WHERE domain = %s AND id NOT IN (SELECT id FROM"
        " sts_policy_history WHERE domain = %s ORDER BY id DESC LIMIT %s)",
        (key, key, HISTORY_PER_DOMAIN),
    )
    db.execute(
        "DELETE FROM sts_policy_history WHERE changed_at < %s",
        (history_cutoff(change.changed_at),),
    )
    return change


def _standing(
    db: Connection, key: str, policy_id: str, now: float, *, lock: bool = False
) -> FetchBackoff | FetchClaim | None:
    """The back-off or claim of (key, policy_id) standing at `now` (lock: its row locked)."""
    query = (
        "SELECT state, until, result, detail FROM sts_fetch_backoff"
        " WHERE domain = %s AND policy_id = %s"
    )
    row = db.execute(query + (" FOR UPDATE" if lock else ""), (key, policy_id)).fetchone()
    return fetch_state_from_row(row, now)


def _claim(
    db: Connection, key: str, policy_id: str, now: float, until: float
) -> FetchBackoff | FetchClaim | None:
    db.execute("SELECT set_config('lock_timeout', %s, true)", (_CLAIM_LOCK_TIMEOUT,))
    _purge_expired(db, now)
    # No row: ours. A row (committed, or another node's insert, which this one waits for):
    # locked and read, then replaced only if nothing stands.
    inserted = db.execute(
        "INSERT INTO sts_fetch_backoff (domain, policy_id, state, until, result, detail)"
        " VALUES (%s, %s, %s, %s, '', '') ON CONFLICT DO NOTHING RETURNING 1",
        (key, policy_id, FETCHING, until),
    ).fetchone()
    if inserted is not None:
        return None
    standing = _standing(db, key, policy_id, now, lock=True)
    if standing is None:
        _write_state(db, key, policy_id, FetchClaim(until), now)
    return standing


def _write_state(
    db: Connection, key: str, policy_id: str, state: FetchBackoff | FetchClaim, now: float
) -> None:
    """Replace the row of (key, policy_id), and delete the expired ones."""
    _purge_expired(db, now)
    db.execute(
        "INSERT INTO sts_fetch_backoff (domain, policy_id, state, until, result, detail)"
        " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (domain, policy_id) DO UPDATE"
        " SET state = excluded.state, until = excluded.until, result = excluded.result,"
        " detail = excluded.detail",
        fetch_state_row(key, policy_id, state),
    )


def _purge_expired(db: Connection, now: float) -> None:
    # Rows another transaction holds are left for a later write: never wait for them.
    db.execute(
        "DELETE FROM sts_fetch_backoff WHERE (domain, policy_id) IN (SELECT domain, policy_id"
        " FROM sts_fetch_backoff WHERE until <= %s FOR UPDATE SKIP LOCKED)",
        (now,),
    )
