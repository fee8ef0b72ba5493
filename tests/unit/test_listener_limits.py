"""The listener's shared limits as pure logic (issue 11): their configuration keys, session
slots kept for the trusted, failed-login reservations, and the bounded password checks."""

from __future__ import annotations

import asyncio
import re
from dataclasses import fields
from pathlib import Path

import pytest

from relay.config import AuthConfig, ConfigError, ListenConfig, load_config
from relay.inbound.auth import ChecksBusy, PasswordChecks
from relay.inbound.slots import (
    REPLY_TOO_MANY_FROM_CLIENT,
    REPLY_TOO_MANY_SESSIONS,
    DataBudget,
    SessionTable,
)
from relay.users import FailureLimiter, UsersFile, hash_password, write_users


def test_defaults() -> None:
    cfg = load_config(None, {}, fqdn=lambda: "relay.test")
    assert cfg.listen.max_data_in_flight == 4 * cfg.listen.max_message_size == 209_715_200
    assert cfg.listen.reserved_sessions == 20
    assert cfg.listen.untrusted_session_timeout == 30
    assert cfg.listen.max_session_time == 3600
    assert cfg.auth.max_failures_per_user == 20
    assert (cfg.auth.hash_threads, cfg.auth.hash_queue) == (2, 16)


def test_data_in_flight_follows_the_message_size_unless_set() -> None:
    cfg = load_config(None, {"STS_RELAY_LISTEN_MAX_MESSAGE_SIZE": "1000"}, fqdn=lambda: "r.test")
    assert cfg.listen.max_data_in_flight == 4000
    env = {"STS_RELAY_LISTEN_MAX_DATA_IN_FLIGHT": "1000000000"}
    assert load_config(None, env, fqdn=lambda: "r.test").listen.max_data_in_flight == 10**9


def test_data_in_flight_below_one_message_is_refused() -> None:
    env = {
        "STS_RELAY_LISTEN_MAX_MESSAGE_SIZE": "1000",
        "STS_RELAY_LISTEN_MAX_DATA_IN_FLIGHT": "999",
    }
    with pytest.raises(ConfigError, match=r"^listen\.max_data_in_flight: must be at least"):
        load_config(None, env, fqdn=lambda: "r.test")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("STS_RELAY_LISTEN_RESERVED_SESSIONS", "-1"),
        ("STS_RELAY_LISTEN_UNTRUSTED_SESSION_TIMEOUT", "0"),
        ("STS_RELAY_LISTEN_MAX_SESSION_TIME", "soon"),
        ("STS_RELAY_AUTH_HASH_THREADS", "0"),
        ("STS_RELAY_AUTH_MAX_FAILURES_PER_USER", "0"),
    ],
)
def test_bad_values_name_their_key(key: str, value: str) -> None:
    name = key.removeprefix("STS_RELAY_").lower().replace("_", ".", 1)
    with pytest.raises(ConfigError, match=rf"^{name}"):
        load_config(None, {key: value}, fqdn=lambda: "r.test")


def test_untrusted_clients_leave_the_reserved_slots_free() -> None:
    table = SessionTable(limit=5, per_client_limit=5, reserved=2)
    strangers = [object() for _ in range(4)]
    replies = [table.admit(s, f"198.51.100.{n}", trusted=False) for n, s in enumerate(strangers)]
    assert replies == [None, None, None, REPLY_TOO_MANY_SESSIONS]
    trusted = [object() for _ in range(3)]
    assert [table.admit(t, "127.0.0.1", trusted=True) for t in trusted] == [
        None,
        None,
        REPLY_TOO_MANY_SESSIONS,
    ]
    table.leave(strangers[0], "198.51.100.0")
    assert table.admit(object(), "198.51.100.9", trusted=False) == REPLY_TOO_MANY_SESSIONS
    assert table.admit(object(), "127.0.0.1", trusted=True) is None


def test_per_client_limit_still_applies() -> None:
    table = SessionTable(limit=10, per_client_limit=1, reserved=0)
    assert table.admit(object(), "127.0.0.1", trusted=True) is None
    assert table.admit(object(), "127.0.0.1", trusted=True) == REPLY_TOO_MANY_FROM_CLIENT


def test_budget_takes_all_or_nothing() -> None:
    budget = DataBudget(10)
    assert budget.take(6)
    assert not budget.take(5)
    assert budget.take(4)
    assert budget.full
    budget.give(10)
    assert budget.held == 0


def test_an_attempt_counts_from_its_start() -> None:
    now = [100.0]
    limiter = FailureLimiter(3, 60, lambda: now[0])
    stamps = [limiter.reserve("192.0.2.1") for _ in range(5)]
    assert [s is not None for s in stamps] == [True, True, True, False, False]
    assert limiter.blocked("192.0.2.1")
    first = stamps[0]
    assert first is not None
    limiter.release("192.0.2.1", first)  # that one succeeded
    assert not limiter.blocked("192.0.2.1")
    now[0] += 61
    assert limiter.count("192.0.2.1") == 0
    assert limiter.failed("192.0.2.1") == 1


async def test_checks_beyond_threads_and_queue_are_refused_at_once(tmp_path: Path) -> None:
    users = tmp_path / "users"
    write_users(users, {"alice": hash_password("pw")})  # the real cost: ~0.1 s a check
    checks = PasswordChecks(UsersFile(users), threads=1, queue=1)
    try:
        running = asyncio.create_task(checks.verify("alice", b"pw"))
        waiting = asyncio.create_task(checks.verify("alice", b"no"))
        await asyncio.sleep(0)  # both are in: one on the thread, one queued
        with pytest.raises(ChecksBusy):
            await checks.verify("alice", b"pw")
        assert await running is True
        assert await waiting is False
        assert await checks.verify("alice", b"pw") is True  # room again
    finally:
        checks.close()


_CONFIG_ROW = re.compile(r"^\| `([a-z_]+\.[a-z_]+)` \| ([^|]*) \|")


def test_readme_documents_every_listen_and_auth_key() -> None:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = {m[1]: m[2] for line in section.splitlines() if (m := _CONFIG_ROW.match(line))}
    for name, cls in (("listen", ListenConfig), ("auth", AuthConfig)):
        for f in fields(cls):
            assert f"{name}.{f.name}" in documented, f"{name}.{f.name} is not in the README"
    new = {
        "listen.max_data_in_flight": 0,
        "listen.reserved_sessions": 20,
        "listen.untrusted_session_timeout": 30,
        "listen.max_session_time": 3600,
        "auth.max_failures_per_user": 20,
        "auth.hash_threads": 2,
        "auth.hash_queue": 16,
    }
    for key, default in new.items():
        section_name, _, field_name = key.partition(".")
        cls = ListenConfig if section_name == "listen" else AuthConfig
        assert getattr(cls(), field_name) == default, key
        assert documented[key].startswith(f"`{default}`"), key
