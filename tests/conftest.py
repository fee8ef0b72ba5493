"""Shared fixtures: the lab world (RFC-CHECKLIST.md §0.1, F0), started and stopped per test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.dane_lab import DaneWorld
from tests.support.dns import DnsServer
from tests.support.postgres import PostgresServer, postgres_server
from tests.support.world import World

# A host that accepts TCP and never greets (SMTP-13): its address, and the connections held.
SilentHost = tuple[str, list[asyncio.StreamWriter]]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """DNS, policy host and MX sinks on loopback, with the bounce sink for `src.test`."""
    lab = World(tmp_path / "lab")
    await lab.start()
    try:
        await lab.add_bounce_sink()
        yield lab
    finally:
        await lab.stop()


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    """The lab DNS server alone, on an ephemeral loopback port."""
    server = DnsServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def dane_world(tmp_path: Path) -> AsyncIterator[DaneWorld]:
    """The lab with `dane.test` DNSSEC-signed and unbound validating in front of the lab DNS
    (RFC 7672 tests); skips when unbound is not installed (fails under CI)."""
    lab = DaneWorld(tmp_path / "lab")
    await lab.start()
    try:
        await lab.add_bounce_sink()
        yield lab
    finally:
        await lab.stop()


@pytest.fixture
async def silent_ip(world: World) -> AsyncIterator[SilentHost]:
    """Accepts TCP on the delivery port of a fresh lab IP and never greets."""
    ip = world.allocate_ip()
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, ip, world.delivery_port)
    try:
        yield ip, held
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL cluster for the session (tests/support/postgres.py); a test
    takes a database of its own with `postgres.new_database()`."""
    with postgres_server() as server:
        yield server


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """The URL of a fresh, empty database on the session's PostgreSQL."""
    return postgres.new_database()
