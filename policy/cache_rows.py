"""The policy cache's values and their rows, whatever the engine: a cached policy, a change
of policy and a fetch's back-off or claim, how each is read from and written to the `sts_`
tables, and which stored policy is a change to record.

Pure: no I/O, no SQL. Shared by the SQLite cache (cache.py, which exports these values)
and the PostgreSQL cache (cache_postgres.py), so that both store, decode and record a
policy the same way; a row neither can read decodes to None here. Knows nothing of DNS,
HTTP or the §5.1 control flow.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from policy.model import Policy, TlsRptResult
from policy.parse import InvalidPolicy, parse_policy

# `sts_fetch_backoff.state`: back off until `until`, or a fetch claimed until then.
FAILED: Final = "failed"
FETCHING: Final = "fetching"
# `sts_policy_history` keeps the newest HISTORY_PER_DOMAIN entries per domain, none older
# than HISTORY_DAYS.
HISTORY_PER_DOMAIN = 50
HISTORY_DAYS = 400


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
class PolicyChange:
    """A policy of `domain` that differs from the one known before (`old`, None when it is
    the first seen), as stored at `changed_at` (the new policy's fetch time)."""

    domain: str
    changed_at: float
    old_id: str | None
    old: Policy | None
    new_id: str
    new: Policy

    @property
    def changed(self) -> tuple[str, ...]:
        """Which of policy_id, mode, mx and max_age differ (none for a first policy)."""
        if self.old is None:
            return ()
        pairs = (
            ("policy_id", self.old_id, self.new_id),
            ("mode", self.old.mode, self.new.mode),
            ("mx", self.old.mx, self.new.mx),
            ("max_age", self.old.max_age, self.new.max_age),
        )
        return tuple(name for name, old, new in pairs if old != new)


@dataclass(frozen=True, slots=True)
class FetchBackoff:
    """A fetch that failed with `result`: no new attempt at the same id before `until`."""

    until: float
    result: TlsRptResult
    detail: str


@dataclass(frozen=True, slots=True)
class FetchClaim:
    """A fetch under way in some process, which gives it up at `until` at the latest."""

    until: float


def domain_key(domain: str) -> str:
    """The cache's key for `domain`: lower case, without a trailing dot."""
    return domain.lower().removesuffix(".")


# --- sts_policies ---------------------------------------------------------------------------


def policy_row(key: str, entry: CachedPolicy) -> tuple[str, str, str, float, float, float]:
    """`entry`'s row: domain, policy_id, policy_text, fetched_at, expires_at, last_used_at."""
    return (
        key,
        entry.policy_id,
        entry.policy.text,
        entry.fetched_at,
        entry.expires_at,
        entry.last_used_at,
    )


def policy_from_row(row: tuple[object, ...]) -> CachedPolicy | None:
    """The entry of a row in policy_row's column order; None when the row is corrupt."""
    domain, policy_id, text, *times = row
    if not (isinstance(domain, str) and isinstance(policy_id, str) and isinstance(text, str)):
        return None
    numbers = [float(value) for value in times if isinstance(value, int | float)]
    if len(numbers) != 3:
        return None
    policy = parse_stored(text)
    if policy is None:
        return None
    fetched_at, expires_at, last_used_at = numbers
    return CachedPolicy(domain, policy_id, policy, fetched_at, expires_at, last_used_at)


def stored_entry(key: str, entry: CachedPolicy) -> CachedPolicy | None:
    """What a read of `key` returns once `entry` is stored: None when its max_age is 0
    (STS-68: such a policy is not stored, and removes the previous one)."""
    return None if entry.policy.max_age == 0 else policy_from_row(policy_row(key, entry))


@functools.lru_cache(maxsize=1024)
def parse_stored(text: str) -> Policy | None:
    """A stored policy body parsed again; None when it no longer parses."""
    # The stored body is the source of truth; re-parsing it rejects a damaged row.
    try:
        return parse_policy(text.encode("utf-8"))
    except (InvalidPolicy, UnicodeEncodeError):
        return None


# --- sts_policy_history ---------------------------------------------------------------------


def change_to_record(
    key: str, entry: CachedPolicy, last: tuple[object, ...] | None
) -> PolicyChange | None:
    """The change storing `entry` makes, given `last`, the (id, text) of the last policy
    known for `key` (the cached row, else the newest history entry; None: neither). None
    when there is nothing to record: the same policy in id, mode, mx and max_age. A last
    policy whose text no longer parses counts as none (the change is a first policy)."""
    old_id = last[0] if last is not None and isinstance(last[0], str) else None
    old = parse_stored(last[1]) if last is not None and isinstance(last[1], str) else None
    change = PolicyChange(key, entry.fetched_at, old_id, old, entry.policy_id, entry.policy)
    if old is not None and not change.changed:
        return None
    return change


def history_row(change: PolicyChange) -> tuple[str, float, str | None, str | None, str, str]:
    """`change`'s row: domain, changed_at, old_id, old_text, new_id, new_text."""
    old_text = change.old.text if change.old is not None else None
    return (
        change.domain,
        change.changed_at,
        change.old_id,
        old_text,
        change.new_id,
        change.new.text,
    )


def history_cutoff(changed_at: float) -> float:
    """Recording a change at `changed_at` deletes the entries changed before this time."""
    return changed_at - HISTORY_DAYS * 86400.0


def history_from_rows(rows: Iterable[tuple[Any, ...]]) -> list[PolicyChange]:
    """The changes of rows in history_row's column order, unreadable ones skipped.

    The ids go through unchecked, as the database driver gives them (hence Any)."""
    changes = []
    for domain, changed_at, old_id, old_text, new_id, new_text in rows:
        new = parse_stored(new_text) if isinstance(new_text, str) else None
        old = parse_stored(old_text) if isinstance(old_text, str) else None
        if new is None or not isinstance(changed_at, int | float):
            continue
        changes.append(PolicyChange(domain, float(changed_at), old_id, old, new_id, new))
    return changes


# --- sts_fetch_backoff ----------------------------------------------------------------------


def fetch_state_row(
    key: str, policy_id: str, state: FetchBackoff | FetchClaim
) -> tuple[str, str, str, float, str, str]:
    """`state`'s row: domain, policy_id, state, until, result, detail."""
    if isinstance(state, FetchClaim):
        return (key, policy_id, FETCHING, state.until, "", "")
    return (key, policy_id, FAILED, state.until, state.result.value, state.detail)


def fetch_state_from_row(
    row: tuple[object, ...] | None, now: float
) -> FetchBackoff | FetchClaim | None:
    """The back-off or claim of a (state, until, result, detail) row that still stands at
    `now`; None for no row, an ended one, or an unreadable one (the fetch it would
    prevent is harmless)."""
    if row is None:
        return None
    state, until, result, detail = row
    if not isinstance(until, int | float) or until <= now:
        return None
    if state == FETCHING:
        return FetchClaim(float(until))
    if state != FAILED or not isinstance(result, str) or not isinstance(detail, str):
        return None
    try:
        return FetchBackoff(float(until), TlsRptResult(result), detail)
    except ValueError:
        return None
