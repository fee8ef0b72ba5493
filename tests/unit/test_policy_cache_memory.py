"""The policy cache's in-memory layer: write-through, dropped on forget, and another
process's change (the `policy forget` command) seen within `revalidate_after` seconds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from policy.cache import CachedPolicy, PolicyCache, Remembered
from policy.parse import parse_policy

P1 = b"version: STSv1\r\nmode: enforce\r\nmx: mx1.d.test\r\nmax_age: 86400\r\n"
P2 = b"version: STSv1\r\nmode: testing\r\nmx: mx2.d.test\r\nmax_age: 86400\r\n"
P_ZERO = b"version: STSv1\nmode: enforce\nmx: mx1.d.test\nmax_age: 0\n"


def entry(body: bytes = P1, policy_id: str = "1") -> CachedPolicy:
    policy = parse_policy(body)
    return CachedPolicy("d.test", policy_id, policy, 1000.0, 1000.0 + policy.max_age, 1000.0)


class Monotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Monotonic:
    return Monotonic()


@pytest.fixture
def relay_cache(tmp_path: Path, clock: Monotonic) -> Iterator[PolicyCache]:
    opened = PolicyCache(tmp_path / "state.sqlite3", revalidate_after=5.0, monotonic=clock)
    yield opened
    opened.close()


@pytest.fixture
def other_process(tmp_path: Path) -> Iterator[PolicyCache]:
    opened = PolicyCache(tmp_path / "state.sqlite3")
    yield opened
    opened.close()


def test_nothing_remembered_before_the_first_read(relay_cache: PolicyCache) -> None:
    assert relay_cache.remembered("d.test") is None
    assert relay_cache.get("d.test") is None
    assert relay_cache.remembered("d.test") == Remembered(None)


def test_put_is_remembered_as_sqlite_returns_it(relay_cache: PolicyCache) -> None:
    relay_cache.put(entry())
    assert relay_cache.remembered("D.Test.") == Remembered(relay_cache.get("d.test"))
    assert relay_cache.remembered("d.test") == Remembered(entry())


def test_forget_in_this_process_is_seen_at_once(relay_cache: PolicyCache) -> None:
    relay_cache.put(entry())
    assert relay_cache.forget("d.test")
    assert relay_cache.remembered("d.test") == Remembered(None)


def test_max_age_zero_replaces_the_remembered_policy(relay_cache: PolicyCache) -> None:
    relay_cache.put(entry())
    relay_cache.put(entry(P_ZERO, "2"))
    assert relay_cache.remembered("d.test") == Remembered(None)


def test_touch_updates_the_remembered_entry(relay_cache: PolicyCache) -> None:
    relay_cache.put(entry())
    relay_cache.touch("d.test", 5000.0)
    seen = relay_cache.remembered("d.test")
    assert seen is not None
    assert seen.entry is not None
    assert seen.entry.last_used_at == 5000.0
    assert seen.entry == relay_cache.get("d.test")


def test_another_process_forget_is_seen_within_revalidate_after(
    relay_cache: PolicyCache, other_process: PolicyCache, clock: Monotonic
) -> None:
    relay_cache.put(entry())
    assert other_process.forget("d.test")
    clock.now += 4.9
    assert relay_cache.remembered("d.test") == Remembered(entry())  # still trusted
    clock.now += 0.1
    assert relay_cache.remembered("d.test") is None  # stale: the caller reads SQLite
    assert relay_cache.get("d.test") is None
    assert relay_cache.remembered("d.test") == Remembered(None)


def test_another_process_put_is_seen_within_revalidate_after(
    relay_cache: PolicyCache, other_process: PolicyCache, clock: Monotonic
) -> None:
    assert relay_cache.get("d.test") is None
    other_process.put(entry(P2, "2"))
    clock.now += 5.0
    assert relay_cache.remembered("d.test") is None
    assert relay_cache.get("d.test") == entry(P2, "2")
