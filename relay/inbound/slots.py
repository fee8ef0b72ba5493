"""Who gets a session slot, and how much DATA all sessions may hold in memory together.

Owns the listener's shared limits (issue 11): sessions in total and per client address,
the slots kept for trusted clients (an untrusted client is admitted only while more than
`reserved` slots are free, so a flood of idle strangers never makes a trusted application
wait), the sessions storing a message (for a graceful stop), and the budget of DATA bytes
held across all sessions. Knows nothing of SMTP: sessions are opaque objects here, and
relay/inbound/data.MessageBuffer spends the budget.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

REPLY_TOO_MANY_SESSIONS = "421 4.7.0 Too many connections, try again later"
REPLY_TOO_MANY_FROM_CLIENT = "421 4.7.0 Too many connections from your address, try again later"


class DataBudget:
    """Bytes of DATA held in memory by all sessions together, never more than `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    @property
    def full(self) -> bool:
        return self.held >= self.limit

    def take(self, size: int) -> bool:
        """Hold `size` more bytes, or False (nothing taken) if that would pass the limit."""
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


@dataclass
class SessionTable:
    """The live sessions, for the concurrency limits and for shutdown."""

    limit: int
    per_client_limit: int
    reserved: int = 0  # slots an untrusted client may not take
    data: DataBudget = field(default_factory=lambda: DataBudget(1 << 62))
    live: set[Any] = field(default_factory=set)
    per_client: dict[str, int] = field(default_factory=dict)
    storing: int = 0
    quiet: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.quiet.set()

    def admit(self, session: Any, client: str, *, trusted: bool) -> str | None:
        """Count the session in, or the 421 reply that refuses it."""
        free = self.limit - len(self.live)
        if free <= 0 or (not trusted and free <= self.reserved):
            return REPLY_TOO_MANY_SESSIONS
        if self.per_client.get(client, 0) >= self.per_client_limit:
            return REPLY_TOO_MANY_FROM_CLIENT
        self.live.add(session)
        self.per_client[client] = self.per_client.get(client, 0) + 1
        return None

    def leave(self, session: Any, client: str) -> None:
        if session not in self.live:
            return
        self.live.discard(session)
        left = self.per_client.get(client, 1) - 1
        if left > 0:
            self.per_client[client] = left
        else:
            self.per_client.pop(client, None)
