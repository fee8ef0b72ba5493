"""A command line that behaves: `--config` anywhere, `config check` as TOML that `serve`
takes back and as JSON that says where each value came from, clear range errors, JSON
answers on errors, and the small things (`user list` with no users)."""

from __future__ import annotations

import asyncio
import json
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import STS_RELAY, Done, RelayProcess, run_cli
from tests.support.world import World, to_toml


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STS_RELAY_")}
    return {**env, **extra}


async def sts_relay(*args: str, env: dict[str, str] | None = None) -> Done:
    """`sts-relay ARGS...` exactly as given (no --config added)."""
    proc = await asyncio.create_subprocess_exec(
        str(STS_RELAY),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or clean_env(),
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    return Done(proc.returncode or 0, out.decode(), err.decode())


def write_config(world: World, tmp_path: Path, **overrides: dict[str, Any]) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(to_toml(world.relay_config(tmp_path / "state", **overrides)), "utf-8")
    return path


@pytest.mark.parametrize(
    "argv",
    [
        ("--config", "{c}", "config", "check", "--json"),
        ("config", "--config", "{c}", "check", "--json"),
        ("config", "check", "--config", "{c}", "--json"),
        ("config", "check", "--json", "--config={c}"),
    ],
)
async def test_config_is_accepted_before_or_after_the_subcommand(
    world: World, tmp_path: Path, argv: tuple[str, ...]
) -> None:
    path = write_config(world, tmp_path, delivery={"hostname": "where.example.com"})
    done = await sts_relay(*(a.format(c=path) for a in argv))
    assert done.code == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["file"] == str(path)
    assert shown["settings"]["delivery"]["hostname"] == "where.example.com"


async def test_queue_commands_take_config_after_the_subcommand(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay()
    after = await sts_relay("queue", "list", "--json", "--config", str(relay.config_path))
    before = await sts_relay("--config", str(relay.config_path), "queue", "list", "--json")
    assert (after.code, after.stdout) == (0, "[]\n")
    assert (before.code, before.stdout) == (0, "[]\n")
    flushed = await sts_relay("queue", "flush", "--json", "--config", str(relay.config_path))
    assert (flushed.code, json.loads(flushed.stdout)["count"]) == (0, 0)  # postqueue -f
    assert "the queue is empty" in flushed.stderr


async def test_config_check_prints_toml_that_serve_takes_back(world: World, tmp_path: Path) -> None:
    """The printed file names every key with the value in force (computed defaults written
    out), and a relay started from it runs with exactly the same settings."""
    original = write_config(world, tmp_path, tls={"overrides": ["a.test=opportunistic"]})
    printed = await run_cli(original, "config", "check")
    assert printed.code == 0, printed.stderr
    assert "configuration OK" in printed.stderr
    doc = tomllib.loads(printed.stdout)  # valid TOML
    assert doc["auth"]["users_file"] == str(tmp_path / "state" / "users")
    assert doc["tlsrpt"]["submitter"] == "relay.test"
    assert doc["listen"]["hostname"] == "relay.test"
    assert "ca_file" in doc["tls"]
    assert "# cert_file is not set (default)" in printed.stdout
    assert 'hostname = "relay.test"  # file' in printed.stdout
    assert "max_sessions = 100  # default" in printed.stdout

    again = tmp_path / "again" / "relay.toml"
    again.parent.mkdir()
    again.write_text(printed.stdout, encoding="utf-8")
    first = json.loads((await run_cli(original, "config", "check", "--json")).stdout)
    second = json.loads((await run_cli(again, "config", "check", "--json")).stdout)
    assert second["settings"] == first["settings"]

    relay = RelayProcess(again, doc["listen"]["addresses"][0])
    await relay.start()  # waits for `listening`
    try:
        started = relay.find(event="started")[0]
        assert started["state_path"] == str(tmp_path / "state")
    finally:
        assert await relay.stop() == 0


async def test_config_check_json_says_where_each_value_came_from(
    world: World, tmp_path: Path
) -> None:
    defaults = tmp_path / "image-defaults.toml"
    defaults.write_text(
        '[metrics]\naddress = "0.0.0.0:9025"\n[log]\nlevel = "debug"\n'
        "[delivery]\nconcurrency = 7\n",
        encoding="utf-8",
    )
    path = write_config(world, tmp_path)  # sets metrics.address itself (127.0.0.1:0)
    env = clean_env(STS_RELAY_DEFAULTS=str(defaults), STS_RELAY_DNS_TIMEOUT="3")
    done = await run_cli(path, "config", "check", "--json", env=env)
    assert done.code == 0, done.stderr
    shown = json.loads(done.stdout)
    sources, settings = shown["sources"], shown["settings"]
    assert shown["defaults_file"] == str(defaults)
    assert (sources["metrics"]["address"], settings["metrics"]["address"]) == (
        "file",
        "127.0.0.1:0",
    )  # the operator's file wins over the defaults file
    assert (sources["log"]["level"], settings["log"]["level"]) == ("defaults file", "debug")
    assert (sources["delivery"]["concurrency"], settings["delivery"]["concurrency"]) == (
        "defaults file",
        7,
    )
    assert (sources["dns"]["timeout"], settings["dns"]["timeout"]) == ("environment", 3)
    assert sources["listen"]["max_sessions"] == "default"
    assert shown["warnings"] == []


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            {"listen": {"addresses": ["127.0.0.1:99999"]}},
            'listen.addresses: expected "host:port", got "127.0.0.1:99999"'
            " (port 99999 is out of range: 0 to 65535)",
        ),
        (
            {"metrics": {"address": "127.0.0.1:70000"}},
            "(port 70000 is out of range: 0 to 65535)",
        ),
        (
            {"delivery": {"port": 70000}},
            "delivery.port: expected an integer from 1 to 65535, got 70000 (70000 is out of range)",
        ),
    ],
)
async def test_a_port_out_of_range_says_so(
    world: World, tmp_path: Path, setting: dict[str, dict[str, Any]], message: str
) -> None:
    path = write_config(world, tmp_path, **setting)
    done = await run_cli(path, "config", "check")
    assert done.code == 2
    assert message in done.stderr
    as_json = await run_cli(path, "config", "check", "--json")
    assert as_json.code == 2
    assert message in json.loads(as_json.stdout)["error"]


async def test_json_commands_answer_json_on_errors(start_relay: StartRelay) -> None:
    relay = await start_relay()
    config = relay.config_path

    shown = await run_cli(config, "policy", "show", "nothing-cached.test", "--json")
    assert shown.code == 1
    assert json.loads(shown.stdout) == {
        "domain": "nothing-cached.test",
        "error": "no cached policy for nothing-cached.test",
    }
    assert shown.stderr.strip() == "sts-relay: no cached policy for nothing-cached.test"
    forgot = await run_cli(config, "policy", "forget", "nothing-cached.test", "--json")
    assert (forgot.code, json.loads(forgot.stdout)["domain"]) == (1, "nothing-cached.test")
    history = await run_cli(config, "policy", "history", "nothing-cached.test", "--json")
    assert history.code == 1
    assert json.loads(history.stdout)["changes"] == []

    day = await run_cli(config, "tlsrpt", "show", "--day", "someday", "--json")
    assert day.code == 2
    assert "--day" in json.loads(day.stdout)["error"]
    usage = await run_cli(config, "queue", "hold", "--json")
    assert usage.code == 2
    assert "--all" in json.loads(usage.stdout)["error"]
    unknown = await run_cli(config, "queue", "list", "--json", "--no-such-option")
    assert unknown.code == 2
    assert "--no-such-option" in json.loads(unknown.stdout)["error"]
    broken = await run_cli(
        config, "queue", "list", "--json", env=clean_env(STS_RELAY_DNS_TIMEOUT="x")
    )
    assert broken.code == 2
    assert json.loads(broken.stdout)["error"].startswith("configuration error: dns.timeout")
    for done in (shown, forgot, history, day, usage, unknown, broken):
        assert "Traceback" not in done.stderr


async def test_user_list_with_no_users_says_so(start_relay: StartRelay) -> None:
    relay = await start_relay()
    text = await run_cli(relay.config_path, "user", "list")
    assert text.code == 0
    assert text.stdout == ""
    assert "no users in " in text.stderr
    assert "sts-relay user add NAME" in text.stderr
    as_json = await run_cli(relay.config_path, "user", "list", "--json")
    assert (as_json.code, json.loads(as_json.stdout)) == (0, [])
