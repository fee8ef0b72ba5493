"""The policy cache on PostgreSQL (policy/cache_postgres.py, issue 15) beside the SQLite one:
the same behaviour on both engines (stores, history, memory layer, shared fetch state), and
what only a server shows: several nodes on one database (one claim wins, nodes starting at
once), the versioned schema, and the server stopped then started again. A real server
(tests/support/postgres.py), never a mock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from policy.cache import (
    HISTORY_PER_DOMAIN,
    CachedPolicy,
    FetchBackoff,
    FetchClaim,
    PolicyCache,
    PolicyCacheError,
    PolicyChange,
    PolicyStore,
    Remembered,
)
from policy.cache_postgres import COMPONENT, MIGRATIONS, PostgresPolicyCache
from policy.model import Mode, TlsRptResult
from policy.parse import parse_policy
from tests.support.postgres import PostgresServer

NOW = 1_000_000.0
FAILED = FetchBackoff(NOW + 300, TlsRptResult.STS_WEBPKI_INVALID, "certificate for other.test")


def body(mode: str = "enforce", mx: str = "mx1.d.test", max_age: int = 86400) -> bytes:
    return f"version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: {max_age}\r\n".encode()


def entry(
    domain: str = "d.test", policy_id: str = "1", at: float = NOW, **fields: Any
) -> CachedPolicy:
    policy = parse_policy(body(**fields))
    return CachedPolicy(domain, policy_id, policy, at, at + policy.max_age, at)


class Monotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Opener:
    """Opens caches on one store, as relay nodes (or processes) do; closes them all."""

    def __init__(self, make: Callable[..., PolicyStore]) -> None:
        self._make = make
        self.opened: list[PolicyStore] = []

    def __call__(self, **options: Any) -> PolicyStore:
        cache = self._make(**options)
        self.opened.append(cache)
        return cache

    def close(self) -> None:
        for cache in self.opened:
            cache.close()


@pytest.fixture(params=["sqlite", "postgres"])
def open_cache(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    if request.param == "sqlite":
        path = tmp_path / "state.sqlite3"
        opener = Opener(lambda **options: PolicyCache(path, **options))
    else:
        url = request.getfixturevalue("pg_url")
        opener = Opener(lambda **options: PostgresPolicyCache(url, **options))
    yield opener
    opener.close()


@pytest.fixture
def open_pg(pg_url: str) -> Iterator[Opener]:
    opener = Opener(lambda **options: PostgresPolicyCache(pg_url, **options))
    yield opener
    opener.close()


def sql(url: str, statement: str, *args: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as db:
        cursor = db.execute(statement.encode(), args)
        return cursor.fetchall() if cursor.description else []


# --- the same behaviour on both engines ------------------------------------------------------


def test_put_get_replace_and_reopen(open_cache: Opener) -> None:
    cache = open_cache()
    cache.put(entry())
    assert cache.get("D.TEST.") == entry()
    assert cache.get("other.test") is None
    cache.put(entry(policy_id="2", mode="none"))
    cache.close()
    reopened = open_cache()  # STS-69: the cache outlives the process
    got = reopened.get("d.test")
    assert got is not None
    assert (got.policy_id, got.policy.mode, got.policy.text) == (
        "2",
        Mode.NONE,
        body("none").decode(),
    )


def test_max_age_zero_is_not_stored_and_supersedes(open_cache: Opener) -> None:
    cache = open_cache()
    cache.put(entry())
    cache.put(entry(policy_id="2", max_age=0))
    assert cache.get("d.test") is None
    assert cache.remembered("d.test") == Remembered(None)


def test_touch_forget_and_all(open_cache: Opener) -> None:
    cache = open_cache()
    cache.put(entry("b.test"))
    cache.put(entry("a.test"))
    cache.touch("a.test", NOW + 50)
    cache.touch("a.test", NOW + 10)  # only forward
    cache.touch("absent.test", NOW)
    assert [(e.domain, e.last_used_at) for e in cache.all()] == [
        ("a.test", NOW + 50),
        ("b.test", NOW),
    ]
    seen = cache.remembered("a.test")
    assert seen is not None
    assert seen.entry == cache.get("a.test")
    assert cache.forget("a.test") is True
    assert cache.forget("a.test") is False
    assert [e.domain for e in cache.all()] == ["b.test"]


def test_history_records_changes_and_tells_them(open_cache: Opener) -> None:
    told: list[PolicyChange] = []
    cache = open_cache(on_change=told.append)
    cache.put(entry())
    cache.put(entry(at=NOW + 5))  # a refetch of the same policy: no change
    cache.put(entry(policy_id="2", mode="testing", at=NOW + 10))
    assert [c.changed for c in told] == [("policy_id", "mode")]
    first, second = cache.history("d.test")
    assert (first.old, first.new_id) == (None, "1")
    assert (second.old_id, second.new_id, second.changed_at) == ("1", "2", NOW + 10)


def test_history_is_bounded_per_domain(open_cache: Opener) -> None:
    cache = open_cache()
    for n in range(HISTORY_PER_DOMAIN + 3):
        cache.put(entry(policy_id=str(n), at=NOW + n))
    kept = cache.history("d.test")
    assert len(kept) == HISTORY_PER_DOMAIN
    assert kept[-1].new_id == str(HISTORY_PER_DOMAIN + 2)


def test_another_nodes_forget_is_seen_within_revalidate_after(open_cache: Opener) -> None:
    clock = Monotonic()
    relay = open_cache(revalidate_after=5.0, monotonic=clock)
    other = open_cache()
    relay.put(entry())
    assert other.forget("d.test")
    clock.now += 4.9
    assert relay.remembered("d.test") == Remembered(entry())  # still trusted
    clock.now += 0.1
    assert relay.remembered("d.test") is None  # stale: the caller reads the store
    assert relay.get("d.test") is None
    other.put(replace(entry(), policy_id="3"))
    clock.now += 5.0
    assert relay.remembered("d.test") is None
    got = relay.get("d.test")
    assert got is not None
    assert got.policy_id == "3"


def test_a_back_off_is_seen_by_every_node(open_cache: Opener) -> None:
    one, two = open_cache(), open_cache()
    one.back_off("D.test.", "1", FAILED, NOW)
    assert two.fetch_state("d.test", "1", NOW) == FAILED
    assert two.fetch_state("d.test", "1", FAILED.until) is None  # ended
    assert two.fetch_state("d.test", "2", NOW) is None  # per TXT id
    assert two.claim_fetch("d.test", "1", NOW + 1, NOW + 31) == FAILED
    two.clear_fetch_state("D.TEST", "1")
    assert one.fetch_state("d.test", "1", NOW) is None


def test_one_claim_wins_and_a_claim_that_ran_out_can_be_taken(open_cache: Opener) -> None:
    one, two = open_cache(), open_cache()
    assert one.claim_fetch("d.test", "1", NOW, NOW + 30) is None  # the claim is one's
    assert two.claim_fetch("d.test", "1", NOW, NOW + 30) == FetchClaim(NOW + 30)
    assert one.claim_fetch("d.test", "1", NOW, NOW + 30) == FetchClaim(NOW + 30)  # not re-entrant
    assert two.claim_fetch("d.test", "2", NOW, NOW + 30) is None  # another id
    # The claimant died or hung: past its `until` the claim holds nobody back.
    assert two.claim_fetch("d.test", "1", NOW + 30, NOW + 60) is None
    assert one.fetch_state("d.test", "1", NOW + 31) == FetchClaim(NOW + 60)


def test_a_stored_policy_ends_its_ids_state_only(open_cache: Opener) -> None:
    one, two = open_cache(), open_cache()
    assert one.claim_fetch("d.test", "1", NOW, NOW + 30) is None
    one.back_off("d.test", "", FAILED, NOW)  # a refresh found no record
    one.back_off("d.test", "2", FAILED, NOW)
    one.back_off("other.test", "1", FAILED, NOW)
    two.put(entry("d.test", "1"))
    assert one.fetch_state("d.test", "1", NOW) is None
    assert one.fetch_state("d.test", "", NOW) is None
    assert one.fetch_state("d.test", "2", NOW) == FAILED
    assert one.fetch_state("other.test", "1", NOW) == FAILED
    assert two.claim_fetch("d.test", "1", NOW, NOW + 30) is None


def test_usable_from_threads(open_cache: Opener) -> None:
    cache = open_cache()
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(10):
                cache.put(entry(f"t{n}-{i}.test"))
                assert cache.get(f"t{n}-{i}.test") is not None
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(cache.all()) == 40


# --- several nodes on one PostgreSQL database ------------------------------------------------


def test_nodes_claiming_at_once_make_one_claim(open_pg: Opener) -> None:
    nodes = [open_pg() for _ in range(6)]
    barrier = threading.Barrier(len(nodes))
    results: list[FetchBackoff | FetchClaim | None] = []
    lock = threading.Lock()

    def claim(node: PolicyStore) -> None:
        barrier.wait()
        got = node.claim_fetch("d.test", "1", NOW, NOW + 30)
        with lock:
            results.append(got)

    threads = [threading.Thread(target=claim, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results, key=repr) == [FetchClaim(NOW + 30)] * 5 + [None]


def test_history_of_one_change_stored_by_two_nodes_at_once(open_pg: Opener) -> None:
    told: list[PolicyChange] = []
    first = open_pg(on_change=told.append)
    first.put(entry())
    nodes = [open_pg(on_change=told.append) for _ in range(4)]
    barrier = threading.Barrier(len(nodes))

    def store(node: PolicyStore) -> None:
        barrier.wait()
        node.put(entry(policy_id="2", at=NOW + 10))

    threads = [threading.Thread(target=store, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(told) == 1  # one node recorded the change; the others found it stored
    assert [c.new_id for c in first.history("d.test")] == ["1", "2"]


def test_writes_delete_expired_rows_and_unreadable_rows_count_as_none(
    pg_url: str, open_pg: Opener
) -> None:
    one = open_pg()
    one.back_off("old.test", "1", FetchBackoff(NOW + 10, FAILED.result, "x"), NOW)
    assert one.claim_fetch("stale.test", "1", NOW, NOW + 10) is None
    sql(
        pg_url,
        "INSERT INTO sts_fetch_backoff VALUES ('bad.test', '1', 'failed', %s, 'no-such', 'x'),"
        " ('odd.test', '1', 'paused', %s, '', '')",
        NOW + 300,
        NOW + 300,
    )
    assert one.fetch_state("bad.test", "1", NOW) is None
    assert one.claim_fetch("odd.test", "1", NOW, NOW + 30) is None  # and replaced
    one.back_off("d.test", "1", FAILED, NOW + 10)
    rows = sql(pg_url, "SELECT domain, state FROM sts_fetch_backoff ORDER BY domain")
    assert rows == [("bad.test", "failed"), ("d.test", "failed"), ("odd.test", "fetching")]


def test_a_claim_gives_up_on_a_locked_row(pg_url: str, open_pg: Opener) -> None:
    # Another node's transaction holds the row: the claim fails after about a second, not
    # the statement timeout, and reads still answer.
    one = open_pg()
    one.back_off("d.test", "1", FetchBackoff(NOW + 1, FAILED.result, "x"), NOW)
    with psycopg.connect(pg_url) as holder:
        holder.execute("SELECT * FROM sts_fetch_backoff FOR UPDATE").fetchall()
        with pytest.raises(PolicyCacheError, match="lock timeout"):
            one.claim_fetch("d.test", "1", NOW + 2, NOW + 30)
        assert one.fetch_state("d.test", "1", NOW + 2) is None
    assert one.claim_fetch("d.test", "1", NOW + 2, NOW + 30) is None


def test_the_schema_is_versioned_and_made_once_by_nodes_starting_at_once(
    pg_url: str, open_pg: Opener
) -> None:
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            open_pg().put(entry())
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sql(pg_url, "SELECT component, version FROM sts_relay_schema") == [
        (COMPONENT, len(MIGRATIONS))
    ]
    open_pg()  # opening an upgraded database again changes nothing
    assert [e.domain for e in open_pg().all()] == ["d.test"]


def test_server_stopped_then_started(postgres: PostgresServer, open_pg: Opener) -> None:
    cache = open_pg(revalidate_after=0.0, reconnect_pause=0.0)
    cache.put(entry())
    postgres.stop()
    try:
        with pytest.raises(PolicyCacheError):
            cache.get("d.test")
        with pytest.raises(PolicyCacheError):
            cache.claim_fetch("d.test", "2", NOW, NOW + 30)
        with pytest.raises(PolicyCacheError):
            cache.put(entry(policy_id="2"))
    finally:
        postgres.start()
    assert cache.get("d.test") == entry()  # connected again, nothing lost
    cache.put(entry(policy_id="2"))
    assert [c.new_id for c in cache.history("d.test")] == ["1", "2"]


def test_a_connection_the_server_dropped_is_replaced_at_once(
    postgres: PostgresServer, open_pg: Opener
) -> None:
    # The server restarted while the cache was idle: the next call, read or write, is
    # answered on a new connection rather than failing once.
    cache = open_pg(revalidate_after=0.0)
    cache.put(entry())
    postgres.stop()
    postgres.start()
    assert cache.get("d.test") == entry()
    postgres.stop()
    postgres.start()
    cache.put(entry(policy_id="2"))
    got = cache.get("d.test")
    assert got is not None
    assert got.policy_id == "2"


def test_a_closed_cache_raises(open_pg: Opener) -> None:
    cache = open_pg()
    cache.close()
    with pytest.raises(PolicyCacheError, match="closed"):
        cache.get("d.test")
