"""Readiness tells the truth about the store (issue 11, item 3), on a serving relay.

The store's database or WAL file deleted or replaced under the running process: `/readyz`
answers 503, DATA gets 451 and a `store_error` is logged, nothing is acknowledged into a
file no restart would find; with the file back, 200 and 250 again. A WAL deleted outright
cannot come back, but mail acknowledged before it went is not lost to the next SIGKILL.
(The suite may run as root, so permission bits would not fail a write: these are real
file replacements.)
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import aiosmtplib
import pytest

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import RelayProcess, run_cli
from tests.support.waiting import eventually
from tests.support.world import World

# Mail to this domain waits in the queue: its MX lookup fails (SERVFAIL), and the next
# attempt is far away, so the queue's content is what the test put there.
PARKED = "parked.test"
QUIET = {"retry_schedule": [3600]}


async def http_get(address: str, path: str) -> tuple[int, str]:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(10):
            raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def submit(relay: RelayProcess, n: int) -> str:
    """One message; "250 <queue id>" or "<code> <text>" for a refusal."""
    try:
        reply = await relay.send([f"u{n}@{PARKED}"], body=f"Subject: m{n}\r\n\r\n{n}\r\n".encode())
    except aiosmtplib.SMTPResponseException as exc:
        return f"{exc.code} {exc.message}"
    return f"250 {reply.rsplit(' ', 1)[1]}"


async def queued_ids(relay: RelayProcess) -> set[str]:
    done = await run_cli(relay.config_path, "queue", "list", "--json")
    assert done.code == 0, done.stderr
    return {m["queue_id"] for m in json.loads(done.stdout)}


def store_files(relay: RelayProcess) -> tuple[Path, Path]:
    state = Path(relay.find(event="started")[0]["state_path"])
    db = state / "relay.sqlite3"
    return db, Path(f"{db}-wal")


def readyz(relay: RelayProcess) -> str:
    return str(relay.find(event="metrics_listening")[0]["address"])


@pytest.fixture
def parked(world: World) -> None:
    world.dns.fail(PARKED, "MX", "servfail")


@pytest.mark.usefixtures("parked")
@pytest.mark.parametrize("which", ["wal", "database"])
async def test_a_store_file_replaced_under_the_relay_means_503_and_451_until_it_is_back(
    start_relay: StartRelay, which: str
) -> None:
    relay = await start_relay(queue=QUIET)
    db, wal = store_files(relay)
    target = wal if which == "wal" else db
    assert await http_get(readyz(relay), "/readyz") == (200, "ready\n")
    first = await submit(relay, 1)
    assert first.startswith("250 ")

    aside = target.with_name(target.name + ".aside")
    os.rename(target, aside)
    target.write_bytes(b"not the file the relay opened\n")

    status, reason = await http_get(readyz(relay), "/readyz")
    assert status == 503
    assert f"{target.name} was replaced" in reason
    refused = await submit(relay, 2)
    assert refused.startswith("451 4.3.0"), refused
    errors = relay.find(event="store_error")
    assert any(f"{target.name} was replaced" in e["error"] for e in errors), errors

    os.replace(aside, target)  # the operator puts the file back

    assert await http_get(readyz(relay), "/readyz") == (200, "ready\n")
    third = await submit(relay, 3)
    assert third.startswith("250 ")
    # The refused message was rolled back, not half stored.
    assert await queued_ids(relay) == {first.split()[1], third.split()[1]}


@pytest.mark.usefixtures("parked")
async def test_a_deleted_wal_refuses_mail_and_keeps_what_was_acknowledged_before(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(queue=QUIET)
    _, wal = store_files(relay)
    acknowledged = {(await submit(relay, n)).split()[1] for n in (1, 2, 3)}
    assert wal.stat().st_size > 0  # they sit in the WAL, not yet in the database file

    wal.unlink()

    status, reason = await http_get(readyz(relay), "/readyz")
    assert status == 503
    assert "relay.sqlite3-wal was deleted" in reason
    assert (await submit(relay, 4)).startswith("451 4.3.0")
    assert (await http_get(readyz(relay), "/readyz"))[0] == 503  # it stays so

    await relay.kill()  # SIGKILL: what the WAL held is gone with the process
    again = await start_relay()
    assert await queued_ids(again) == acknowledged
    await eventually(lambda: again.find(event="listening"))
    assert await http_get(readyz(again), "/readyz") == (200, "ready\n")
