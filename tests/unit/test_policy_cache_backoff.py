"""The policy cache's shared fetch state (`sts_fetch_backoff`): back-offs and claims per
(domain, TXT id) on a real SQLite file, seen by every cache opened on it (STS-32), and the
upgrade of a file written before the table existed."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from policy.cache import CachedPolicy, FetchBackoff, FetchClaim, PolicyCache
from policy.model import Mode, TlsRptResult
from policy.parse import parse_policy

P1 = "version: STSv1\r\nmode: enforce\r\nmx: mx1.d.test\r\nmax_age: 86400\r\n"
NOW = 1_000_000.0
FAILED = FetchBackoff(NOW + 300, TlsRptResult.STS_WEBPKI_INVALID, "certificate for other.test")

# The `sts_` tables as the cache created them before `sts_fetch_backoff` existed.
BEFORE_FETCH_STATE = (
    "CREATE TABLE sts_policies (domain TEXT PRIMARY KEY, policy_id TEXT NOT NULL,"
    " policy_text TEXT NOT NULL, fetched_at REAL NOT NULL, expires_at REAL NOT NULL,"
    " last_used_at REAL NOT NULL)",
    "CREATE TABLE sts_policy_history (id INTEGER PRIMARY KEY, domain TEXT NOT NULL,"
    " changed_at REAL NOT NULL, old_id TEXT, old_text TEXT, new_id TEXT NOT NULL,"
    " new_text TEXT NOT NULL)",
    "CREATE INDEX sts_policy_history_domain ON sts_policy_history(domain, id)",
)


def entry(domain: str = "d.test", policy_id: str = "1") -> CachedPolicy:
    policy = parse_policy(P1.encode())
    return CachedPolicy(domain, policy_id, policy, NOW, NOW + policy.max_age, NOW)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.sqlite3"


@pytest.fixture
def one(db_path: Path) -> Iterator[PolicyCache]:
    opened = PolicyCache(db_path)
    yield opened
    opened.close()


@pytest.fixture
def two(db_path: Path, one: PolicyCache) -> Iterator[PolicyCache]:
    """A second cache on the same file, as another relay process opens it."""
    opened = PolicyCache(db_path)
    yield opened
    opened.close()


def rows(db_path: Path) -> list[tuple[object, ...]]:
    other = sqlite3.connect(db_path)
    try:
        return other.execute(
            "SELECT domain, policy_id, state FROM sts_fetch_backoff ORDER BY domain, policy_id"
        ).fetchall()
    finally:
        other.close()


def test_a_back_off_is_seen_by_every_process(one: PolicyCache, two: PolicyCache) -> None:
    one.back_off("D.test.", "1", FAILED, NOW)
    assert two.fetch_state("d.test", "1", NOW) == FAILED
    assert two.fetch_state("d.test", "1", FAILED.until - 1) == FAILED
    assert two.fetch_state("d.test", "1", FAILED.until) is None  # ended
    assert two.fetch_state("d.test", "2", NOW) is None  # per TXT id
    assert two.fetch_state("other.test", "1", NOW) is None


def test_one_claim_wins(one: PolicyCache, two: PolicyCache) -> None:
    assert one.claim_fetch("d.test", "1", NOW, NOW + 30) is None  # the claim is one's
    assert two.claim_fetch("d.test", "1", NOW, NOW + 30) == FetchClaim(NOW + 30)
    assert one.claim_fetch("d.test", "1", NOW, NOW + 30) == FetchClaim(NOW + 30)  # not re-entrant
    assert two.claim_fetch("d.test", "2", NOW, NOW + 30) is None  # another id: its own claim
    assert two.fetch_state("d.test", "1", NOW) == FetchClaim(NOW + 30)


def test_a_claim_that_ran_out_can_be_taken(one: PolicyCache, two: PolicyCache) -> None:
    # The claimant died or hung: past its `until` the claim holds nobody back.
    assert one.claim_fetch("d.test", "1", NOW, NOW + 30) is None
    assert two.claim_fetch("d.test", "1", NOW + 30, NOW + 60) is None
    assert one.fetch_state("d.test", "1", NOW + 31) == FetchClaim(NOW + 60)


def test_a_back_off_stands_in_the_way_of_a_claim(one: PolicyCache, two: PolicyCache) -> None:
    assert one.claim_fetch("d.test", "1", NOW, NOW + 30) is None
    one.back_off("d.test", "1", FAILED, NOW + 1)  # the claimant's fetch failed
    assert two.claim_fetch("d.test", "1", NOW + 1, NOW + 31) == FAILED
    assert two.claim_fetch("d.test", "1", FAILED.until, FAILED.until + 30) is None


def test_a_stored_policy_ends_its_ids_state_only(one: PolicyCache, two: PolicyCache) -> None:
    one.back_off("d.test", "1", FAILED, NOW)
    one.back_off("d.test", "", FAILED, NOW)  # a refresh found no record
    one.back_off("d.test", "2", FAILED, NOW)
    one.back_off("other.test", "1", FAILED, NOW)
    two.put(entry("d.test", "1"))
    assert one.fetch_state("d.test", "1", NOW) is None
    assert one.fetch_state("d.test", "", NOW) is None
    assert one.fetch_state("d.test", "2", NOW) == FAILED
    assert one.fetch_state("other.test", "1", NOW) == FAILED


def test_a_stored_policy_ends_a_claim(one: PolicyCache, two: PolicyCache) -> None:
    assert one.claim_fetch("d.test", "1", NOW, NOW + 30) is None
    one.put(entry())
    assert two.fetch_state("d.test", "1", NOW) is None
    assert two.claim_fetch("d.test", "1", NOW, NOW + 30) is None


def test_clear(one: PolicyCache, two: PolicyCache) -> None:
    one.back_off("d.test", "", FAILED, NOW)
    two.clear_fetch_state("D.TEST", "")
    assert one.fetch_state("d.test", "", NOW) is None


def test_writes_delete_expired_rows(db_path: Path, one: PolicyCache) -> None:
    one.back_off("old.test", "1", FetchBackoff(NOW + 10, FAILED.result, "x"), NOW)
    assert one.claim_fetch("stale.test", "1", NOW, NOW + 10) is None
    one.back_off("d.test", "1", FAILED, NOW + 10)
    assert rows(db_path) == [("d.test", "1", "failed")]


@pytest.mark.parametrize(
    "row",
    [
        ("failed", NOW + 300, "no-such-result", "x"),
        ("failed", "later", "sts-policy-fetch-error", "x"),
        ("failed", NOW + 300, "sts-policy-fetch-error", b"\xff"),
        ("paused", NOW + 300, "", ""),
    ],
    ids=["result", "until", "detail", "state"],
)
def test_unreadable_rows_count_as_none(
    db_path: Path, one: PolicyCache, row: tuple[object, ...]
) -> None:
    # A damaged row could only prevent a fetch; skipping it costs at most one request.
    other = sqlite3.connect(db_path)
    try:
        other.execute(
            "INSERT INTO sts_fetch_backoff (domain, policy_id, state, until, result, detail)"
            " VALUES ('d.test', '1', ?, ?, ?, ?)",
            row,
        )
        other.commit()
    finally:
        other.close()
    assert one.fetch_state("d.test", "1", NOW) is None
    assert one.claim_fetch("d.test", "1", NOW, NOW + 30) is None  # and replaced
    assert one.fetch_state("d.test", "1", NOW) == FetchClaim(NOW + 30)


def test_opening_a_file_from_before_the_table_adds_it(db_path: Path) -> None:
    # The upgrade: a state file written by the previous version (policies, history, and the
    # queue's tables), opened by this one, keeps its policies and gains the shared state.
    old = sqlite3.connect(db_path, isolation_level=None)
    try:
        old.execute("PRAGMA journal_mode = WAL")
        for statement in BEFORE_FETCH_STATE:
            old.execute(statement)
        old.execute("CREATE TABLE queue_messages (id INTEGER PRIMARY KEY, body TEXT)")
        old.execute(
            "INSERT INTO sts_policies VALUES ('d.test', '1', ?, ?, ?, ?)",
            (P1, NOW, NOW + 86400, NOW),
        )
    finally:
        old.close()
    first = PolicyCache(db_path)
    second = PolicyCache(db_path)  # another process, opening it at the same time
    try:
        cached = first.get("d.test")
        assert cached is not None
        assert (cached.policy_id, cached.policy.mode) == ("1", Mode.ENFORCE)
        first.back_off("d.test", "2", FAILED, NOW)
        assert second.fetch_state("d.test", "2", NOW) == FAILED
        assert second.claim_fetch("d.test", "3", NOW, NOW + 30) is None
        second.put(entry("d.test", "3"))
        assert first.fetch_state("d.test", "3", NOW) is None
    finally:
        first.close()
        second.close()
    reopened = PolicyCache(db_path)  # opening an upgraded file again changes nothing
    try:
        assert reopened.fetch_state("d.test", "2", NOW) == FAILED
        assert [e.policy_id for e in reopened.all()] == ["3"]
    finally:
        reopened.close()
    assert rows(db_path) == [("d.test", "2", "failed")]


def test_a_claim_gives_up_on_a_busy_write_lock(db_path: Path, one: PolicyCache) -> None:
    # Another connection (the queue, another process) holds the write lock: the claim
    # fails after about a second, not the cache's 10 s, and reads still answer (WAL).
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            one.claim_fetch("d.test", "1", NOW, NOW + 30)
        assert one.fetch_state("d.test", "1", NOW) is None
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    assert one.claim_fetch("d.test", "1", NOW, NOW + 30) is None
