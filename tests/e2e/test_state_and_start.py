"""One store, found the same way by every command; start-up failures as log events.

`sts-relay` runs as a subprocess: a second `serve` on a served state directory, commands
run from other working directories, commands that find no store, and `serve` failing to
start (busy port, bad certificate, unusable state, bad configuration).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import STS_RELAY, Done, RelayProcess, run_cli
from tests.support.waiting import read_events
from tests.support.world import World, to_toml


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("STS_RELAY_")}


async def run_in(cwd: Path, *args: str, within: float = 30.0) -> Done:
    """`sts-relay ARGS...` to completion, from the working directory `cwd`."""
    proc = await asyncio.create_subprocess_exec(
        str(STS_RELAY),
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    async with asyncio.timeout(within):
        out, err = await proc.communicate()
    return Done(proc.returncode or 0, out.decode(), err.decode())


def events_of(done: Done) -> list[dict[str, Any]]:
    return read_events(done.stdout.splitlines())


def write(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(config), encoding="utf-8")
    return path


async def test_a_second_serve_on_a_served_state_directory_refuses_to_start(
    start_relay: StartRelay, world: World, tmp_path: Path
) -> None:
    await world.sts_domain("enforce-ok.test")
    relay = await start_relay()
    state = relay.find(event="started")[0]["state_path"]
    # Another port, the same state directory: the lock, not the port, refuses it.
    other = world.relay_config(Path(state))
    second = await run_cli(write(tmp_path / "second.toml", other), "serve")

    assert second.code == 1
    (failed,) = events_of(second)
    assert failed["event"] == "start_failed"
    assert failed["level"] == "error"
    assert f"state directory {state} is already served by another sts-relay" in failed["reason"]
    assert f"(pid {relay.pid})" in failed["reason"]
    assert "cannot start" in second.stderr
    assert "Traceback" not in second.stderr

    await relay.send(["u@enforce-ok.test"])  # the first one is untouched
    await relay.delivery("u@enforce-ok.test", "sent")
    await relay.kill()  # a crash: the kernel drops the lock with the process
    again = await start_relay()
    assert again.find(event="started")[0]["state_path"] == state


async def test_commands_from_other_directories_find_the_same_store(
    world: World, tmp_path: Path
) -> None:
    """A relative state.path in a file is taken from the file's directory, not from where a
    command happens to run; `started` logs it absolute."""
    sink = await world.sts_domain("queue.test", mode=None, starttls=False, data_reply="451 later")
    config = world.relay_config(Path("var"), queue={"retry_schedule": [3600]})
    path = write(tmp_path / "etc" / "relay.toml", config)
    served_from, asked_from = tmp_path / "a", tmp_path / "b"
    served_from.mkdir()
    asked_from.mkdir()
    proc = await asyncio.create_subprocess_exec(
        str(STS_RELAY),
        "serve",
        "--config",
        str(path),
        cwd=served_from,
        stdout=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    relay = RelayProcess(path, config["listen"]["addresses"][0])
    try:
        assert proc.stdout is not None
        lines: list[bytes] = []
        async with asyncio.timeout(20):
            while not any(b'"listening"' in line for line in lines):
                lines.append(await proc.stdout.readline())
        started = next(e for e in read_events(lines) if e["event"] == "started")
        assert started["state_path"] == str(tmp_path / "etc" / "var")
        queue_id = (await relay.send(["u@queue.test"])).rsplit(" ", 1)[1]

        listed = await run_in(asked_from, "queue", "list", "--json", "--config", str(path))
        assert listed.code == 0, listed.stderr
        assert [m["queue_id"] for m in json.loads(listed.stdout)] == [queue_id]
        assert sink is not None
    finally:
        proc.terminate()
        async with asyncio.timeout(20):
            await proc.wait()
    assert not (served_from / "var").exists()
    assert not (asked_from / "var").exists()


@pytest.mark.parametrize(
    "command",
    [
        ("queue", "list"),
        ("queue", "hold", "--all"),
        ("policy", "show", "enforce-ok.test"),
        ("policy", "history", "enforce-ok.test"),
        ("tlsrpt", "show"),
        ("user", "list"),
    ],
)
async def test_commands_never_create_a_store(tmp_path: Path, command: tuple[str, ...]) -> None:
    cwd = tmp_path / "somewhere"
    cwd.mkdir()
    done = await run_in(cwd, *command)
    assert done.code == 1
    assert done.stderr.startswith(f"sts-relay: no sts-relay state at {cwd / 'var'}")
    assert "Traceback" not in done.stderr
    assert list(cwd.iterdir()) == []  # nothing created

    as_json = await run_in(cwd, *command, "--json") if command[0] != "user" else None
    if as_json is not None:
        assert as_json.code == 1
        assert json.loads(as_json.stdout)["error"].startswith("no sts-relay state at ")
    assert list(cwd.iterdir()) == []


@pytest.fixture
def busy_port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


async def test_start_failed_on_a_busy_port(world: World, tmp_path: Path, busy_port: int) -> None:
    config = world.relay_config(
        tmp_path / "state", listen={"addresses": [f"127.0.0.1:{busy_port}"]}
    )
    done = await run_cli(write(tmp_path / "relay.toml", config), "serve")

    assert done.code == 1
    (failed,) = events_of(done)  # nothing else: no `started`, no `listening`
    assert failed["event"] == "start_failed"
    assert str(busy_port) in failed["reason"]
    assert "in use" in failed["reason"]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("what", ["certificate", "state", "config"])
async def test_start_failed_is_one_json_event_then_a_non_zero_exit(
    world: World, tmp_path: Path, what: str
) -> None:
    config = world.relay_config(tmp_path / "state")
    expected = {"certificate": "not-a-cert.pem", "state": "Not a directory", "config": "dns"}
    if what == "certificate":
        junk = tmp_path / "not-a-cert.pem"
        junk.write_text("not a certificate\n", encoding="utf-8")
        config["tls"].update(cert_file=str(junk), key_file=str(junk))
    elif what == "state":
        blocker = tmp_path / "a-file"
        blocker.write_text("", encoding="utf-8")
        config["state"]["path"] = str(blocker / "state")  # cannot be created, even by root
    else:
        config["dns"]["timeout"] = "soon"
    done = await run_cli(write(tmp_path / "relay.toml", config), "serve")

    assert done.code == (2 if what == "config" else 1)
    (failed,) = events_of(done)
    assert (failed["event"], failed["level"]) == ("start_failed", "error")
    assert expected[what] in failed["reason"]
    assert "Traceback" not in done.stderr


async def test_a_hostname_that_is_not_fully_qualified_is_a_warning(
    world: World, tmp_path: Path, start_relay: StartRelay
) -> None:
    config = world.relay_config(tmp_path / "state", delivery={"hostname": "3f2a9c81d0e4"})
    path = write(tmp_path / "relay.toml", config)
    checked = await run_cli(path, "config", "check", "--json")
    assert checked.code == 0
    (warning,) = [w for w in json.loads(checked.stdout)["warnings"] if "delivery.hostname" in w]
    assert "'3f2a9c81d0e4' is not a fully qualified domain name" in warning
    text = await run_cli(path, "config", "check")
    assert "sts-relay: warning: delivery.hostname '3f2a9c81d0e4'" in text.stderr

    relay = await start_relay(delivery={"hostname": "localhost"})
    started = relay.find(event="started")[0]
    assert started["level"] == "warning"
    assert any("delivery.hostname 'localhost'" in w for w in started["warnings"])
    assert await relay.stop() == 0
    fine = await start_relay(delivery={"hostname": "relay.example.com"})
    assert not [w for w in fine.find(event="started")[0]["warnings"] if "hostname" in w]
