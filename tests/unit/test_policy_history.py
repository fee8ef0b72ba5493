"""The policy cache's history: what counts as a change, who is told, and its bounds."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from policy.cache import HISTORY_DAYS, HISTORY_PER_DOMAIN, CachedPolicy, PolicyCache, PolicyChange
from policy.parse import parse_policy


def body(mode: str = "enforce", mx: str = "mx1.d.test", max_age: int = 86400) -> bytes:
    return f"version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: {max_age}\r\n".encode()


def entry(policy_id: str = "1", at: float = 1000.0, **fields: object) -> CachedPolicy:
    policy = parse_policy(body(**fields))  # type: ignore[arg-type]
    return CachedPolicy("d.test", policy_id, policy, at, at + policy.max_age, at)


@pytest.fixture
def told() -> list[PolicyChange]:
    return []


@pytest.fixture
def cache(tmp_path: Path, told: list[PolicyChange]) -> Iterator[PolicyCache]:
    opened = PolicyCache(tmp_path / "state.sqlite3", on_change=told.append)
    yield opened
    opened.close()


@pytest.mark.parametrize(
    ("new", "changed"),
    [
        (entry("2"), ("policy_id",)),
        (entry("1", mode="testing"), ("mode",)),
        (entry("1", mx="mx2.d.test"), ("mx",)),
        (entry("1", max_age=600), ("max_age",)),
        (entry("2", mode="none", mx="*.d.test", max_age=1), ("policy_id", "mode", "mx", "max_age")),
    ],
)
def test_each_kind_of_change_is_recorded_and_told(
    cache: PolicyCache, told: list[PolicyChange], new: CachedPolicy, changed: tuple[str, ...]
) -> None:
    cache.put(entry())
    assert told == []  # a first policy is recorded, not told
    cache.put(replace(new, fetched_at=2000.0))
    (change,) = told
    assert change.changed == changed
    assert (change.old_id, change.new_id) == ("1", new.policy_id)
    first, second = cache.history("D.test.")
    assert (first.old, first.new_id, first.changed) == (None, "1", ())
    assert second.changed == changed
    assert second.changed_at == 2000.0


def test_a_refetch_of_the_same_policy_is_no_change(
    cache: PolicyCache, told: list[PolicyChange]
) -> None:
    cache.put(entry())
    cache.put(entry(at=5000.0))  # refreshed: same id, same content
    cache.forget("d.test")
    cache.put(entry(at=9000.0))  # forgotten and fetched again: still the one known before
    assert told == []
    assert len(cache.history("d.test")) == 1


def test_a_max_age_zero_policy_is_a_change_and_stored_no_longer(
    cache: PolicyCache, told: list[PolicyChange]
) -> None:
    cache.put(entry())
    cache.put(entry("2", max_age=0, at=2000.0))
    assert [c.changed for c in told] == [("policy_id", "max_age")]
    assert cache.get("d.test") is None  # STS-68: not cached


def test_history_is_bounded_per_domain_and_in_age(cache: PolicyCache) -> None:
    for n in range(HISTORY_PER_DOMAIN + 10):
        cache.put(entry(str(n), at=1000.0 + n))
    kept = cache.history("d.test")
    assert len(kept) == HISTORY_PER_DOMAIN
    assert kept[-1].new_id == str(HISTORY_PER_DOMAIN + 9)

    later = 1000.0 + HISTORY_DAYS * 86400.0 + 100
    cache.put(entry("new", at=later))
    (only,) = cache.history("d.test")  # everything older than HISTORY_DAYS is gone
    assert (only.old_id, only.new_id) == (str(HISTORY_PER_DOMAIN + 9), "new")
