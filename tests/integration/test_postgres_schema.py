"""The schemas of the shared PostgreSQL state (issue 15) for the policy cache, the TLS
reports and the posture: created by the relay, versioned per component in one table, safe
when nodes start at once on an empty database, refused when newer than the code; and an
unreachable database or a bad URL at start is a clear error (an OSError naming the
database, never the password).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

import policy.cache_postgres
import posture.store_postgres
import tlsrpt.store_postgres
from policy.cache import PolicyCacheError
from policy.cache_postgres import PostgresPolicyCache
from posture.store_postgres import PostgresPostureStore, PostureStoreError
from tests.support.postgres import PASSWORD, PostgresServer
from tlsrpt.store_postgres import PostgresReportStore, ReportStoreError

ROOT = Path(__file__).resolve().parents[2]
ENGINES: dict[str, tuple[Any, Callable[[str], Any], type[OSError]]] = {
    "policy-cache": (policy.cache_postgres, PostgresPolicyCache, PolicyCacheError),
    "tlsrpt": (tlsrpt.store_postgres, PostgresReportStore, ReportStoreError),
    "posture": (posture.store_postgres, PostgresPostureStore, PostureStoreError),
}


def test_nodes_starting_at_once_on_an_empty_database(pg_url: str) -> None:
    barrier = threading.Barrier(9)
    opened: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def start(make: Callable[[str], Any]) -> None:
        barrier.wait()
        try:
            store = make(pg_url)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)
            return
        with lock:
            opened.append(store)

    makers = [make for _, make, _ in ENGINES.values()] * 3
    threads = [threading.Thread(target=start, args=(make,)) for make in makers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in opened:
        store.close()
    assert errors == []
    with psycopg.connect(pg_url, autocommit=True) as db:
        versions = db.execute("SELECT component, version FROM sts_relay_schema").fetchall()
    assert sorted(versions) == sorted(
        (component, len(module.MIGRATIONS)) for component, (module, _, _) in ENGINES.items()
    )
    for _, make, _ in ENGINES.values():  # opened again: nothing to do
        make(pg_url).close()


@pytest.mark.parametrize("component", sorted(ENGINES))
def test_a_schema_newer_than_the_code_is_refused(pg_url: str, component: str) -> None:
    _, make, error = ENGINES[component]
    make(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute(
            "UPDATE sts_relay_schema SET version = version + 1 WHERE component = %s", (component,)
        )
    with pytest.raises(error, match=f"{component}: schema version .* newer than this relay"):
        make(pg_url)


@pytest.mark.parametrize("component", sorted(ENGINES))
def test_an_unreachable_database_at_start_is_a_clear_error(
    postgres: PostgresServer, component: str
) -> None:
    _, make, error = ENGINES[component]
    url = postgres.url("nowhere").replace(f":{postgres.port}/", ":1/")
    with pytest.raises(error, match=r"^PostgreSQL 127\.0\.0\.1:1/nowhere: connection") as caught:
        make(url)
    assert isinstance(caught.value, OSError)
    assert PASSWORD not in str(caught.value)
    with pytest.raises(error, match=r"^state\.url: ") as bad:
        make(f"postgresql://relay:{PASSWORD}@127.0.0.1:5432/x?nonsense=1")
    assert PASSWORD not in str(bad.value)


def test_a_wrong_password_is_a_clear_error(postgres: PostgresServer) -> None:
    url = postgres.url().replace(PASSWORD, "not-the-password")
    with pytest.raises(PolicyCacheError, match="password authentication failed"):
        PostgresPolicyCache(url)
