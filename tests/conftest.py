"""Shared fixtures: the lab world (RFC-CHECKLIST.md §0.1, F0), started and stopped per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.world import World


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
