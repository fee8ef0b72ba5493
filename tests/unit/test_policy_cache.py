"""The persistent policy cache on a real SQLite file (STS-60, STS-68, STS-69)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from policy.cache import CachedPolicy, PolicyCache
from policy.model import Mode
from policy.parse import parse_policy

P1 = b"version: STSv1\r\nmode: enforce\r\nmx: mx1.d.test\r\nmax_age: 86400\r\n"
P_NONE = b"version: STSv1\nmode: none\nmax_age: 600\n"
P_ZERO = b"version: STSv1\nmode: enforce\nmx: mx1.d.test\nmax_age: 0\n"


def entry(domain: str = "d.test", body: bytes = P1, policy_id: str = "1") -> CachedPolicy:
    policy = parse_policy(body)
    return CachedPolicy(domain, policy_id, policy, 1000.0, 1000.0 + policy.max_age, 1000.0)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.sqlite3"


@pytest.fixture
def cache(db_path: Path) -> Iterator[PolicyCache]:
    opened = PolicyCache(db_path)
    yield opened
    opened.close()


def test_put_get_round_trip(cache: PolicyCache) -> None:
    stored = entry()
    cache.put(stored)
    assert cache.get("d.test") == stored
    assert cache.get("D.TEST.") == stored
    assert cache.get("other.test") is None


def test_survives_reopen(db_path: Path) -> None:
    # STS-69: the cache outlives the process.
    first = PolicyCache(db_path)
    first.put(entry())
    first.close()
    second = PolicyCache(db_path)
    try:
        got = second.get("d.test")
        assert got is not None
        assert got.policy.mode is Mode.ENFORCE
        assert got.policy.mx == ("mx1.d.test",)
        assert got.policy.text == P1.decode()
    finally:
        second.close()


def test_put_replaces(cache: PolicyCache) -> None:
    cache.put(entry())
    cache.put(entry(body=P_NONE, policy_id="2"))
    got = cache.get("d.test")
    assert got is not None
    assert got.policy_id == "2"
    assert got.policy.mode is Mode.NONE


def test_max_age_zero_is_not_stored_and_supersedes(cache: PolicyCache) -> None:
    cache.put(entry())
    cache.put(entry(body=P_ZERO, policy_id="2"))
    assert cache.get("d.test") is None
    cache.put(entry(domain="z.test", body=P_ZERO))
    assert cache.get("z.test") is None


def test_touch_only_moves_forward(cache: PolicyCache) -> None:
    cache.put(entry())
    cache.touch("d.test", 5000.0)
    got = cache.get("d.test")
    assert got is not None
    assert got.last_used_at == 5000.0
    cache.touch("d.test", 4000.0)
    again = cache.get("d.test")
    assert again is not None
    assert again.last_used_at == 5000.0
    cache.touch("absent.test", 1.0)  # no error


def test_forget_and_all(cache: PolicyCache) -> None:
    cache.put(entry("b.test"))
    cache.put(entry("a.test"))
    assert [e.domain for e in cache.all()] == ["a.test", "b.test"]
    assert cache.forget("a.test") is True
    assert cache.forget("a.test") is False
    assert [e.domain for e in cache.all()] == ["b.test"]


def test_wal_and_own_tables_only(db_path: Path, cache: PolicyCache) -> None:
    # The file is shared with the mail queue: leave its tables alone.
    other = sqlite3.connect(db_path)
    try:
        other.execute("CREATE TABLE queue_messages (id INTEGER PRIMARY KEY, body TEXT)")
        other.execute("INSERT INTO queue_messages (body) VALUES ('x')")
        other.commit()
        cache.put(entry())
        assert cache.forget("d.test")
        tables = {row[0] for row in other.execute("SELECT name FROM sqlite_master")}
        assert tables == {
            "queue_messages",
            "sts_policies",
            "sqlite_autoindex_sts_policies_1",
            "sts_policy_history",
            "sts_policy_history_domain",
            "sts_fetch_backoff",  # WITHOUT ROWID: its primary key is the table
        }
        assert other.execute("SELECT count(*) FROM queue_messages").fetchone() == (1,)
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        other.close()


@pytest.mark.parametrize(
    "row",
    [
        ("bad.test", "1", "garbage", 1.0, 2.0, 1.0),
        ("bad.test", "1", P1.decode(), "yesterday", 2.0, 1.0),
        ("bad.test", b"\x00", P1.decode(), 1.0, 2.0, 1.0),
        ("bad.test", "1", P1.decode(), 1.0, "x", 1.0),
        ("bad.test", "1", b"\xff\xfe", 1.0, 2.0, 1.0),
    ],
)
def test_corrupt_rows_are_skipped(
    db_path: Path, cache: PolicyCache, row: tuple[object, ...]
) -> None:
    cache.put(entry("good.test"))
    other = sqlite3.connect(db_path)
    try:
        # SQLite's type affinity lets a damaged or hand-edited file hold anything.
        other.execute(
            "INSERT INTO sts_policies (domain, policy_id, policy_text, fetched_at, expires_at,"
            " last_used_at) VALUES (?, ?, ?, ?, ?, ?)",
            row,
        )
        other.commit()
    finally:
        other.close()
    assert cache.get("bad.test") is None
    assert [e.domain for e in cache.all()] == ["good.test"]


def test_usable_from_threads(cache: PolicyCache) -> None:
    import threading

    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                cache.put(entry(f"t{n}-{i}.test"))
                assert cache.get(f"t{n}-{i}.test") is not None
        except (sqlite3.Error, AssertionError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(cache.all()) == 80
