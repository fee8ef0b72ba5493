"""Fixtures for end-to-end tests: `sts-relay serve` as a subprocess pointed at the lab."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.relay_process import RelayProcess
from tests.support.world import World, to_toml

StartRelay = Callable[..., Awaitable[RelayProcess]]


@pytest.fixture
async def start_relay(world: World, tmp_path: Path) -> AsyncIterator[StartRelay]:
    """Start a relay for the world; the same state directory survives restarts."""
    started: list[RelayProcess] = []
    state = tmp_path / "state"
    config_path = tmp_path / "relay.toml"
    config: dict[str, Any] | None = None

    async def start(**overrides: dict[str, Any]) -> RelayProcess:
        nonlocal config
        if config is None or overrides:
            config = world.relay_config(state, **overrides)
            config_path.write_text(to_toml(config), encoding="utf-8")
        relay = RelayProcess(config_path, config["listen"]["addresses"][0])
        started.append(relay)
        await relay.start()
        return relay

    yield start
    for relay in started:
        await relay.stop()
