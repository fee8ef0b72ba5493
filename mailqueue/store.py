"""The queue store interface: what every backend (embedded SQLite, future PostgreSQL) offers.

Owns the contract only; knows nothing of SQL, TLS or SMTP. All methods are coroutines
and never block the event loop. Storage failures surface as `StoreUnavailable`, never as
a driver exception.

Lease model (designed for several relay nodes sharing one queue): `lease_due` hands out
due recipients, grouped per (message, recipient domain), exclusively until `Lease.until`.
A worker ends a lease with `record` (an attempt was made) or `release` (no attempt). A
lease that runs out (its worker died) makes the recipients due again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mailqueue.model import Lease, MessageRecord, NewMessage, RecipientResult


class StoreUnavailable(Exception):
    """The store could not durably complete the operation (disk full, I/O error, locked,
    closed, or a schema this code does not know). Nothing of the operation was stored;
    the store keeps working once the cause is gone."""


class MessageNotFound(LookupError):
    """The message is not in the queue (delivered, deleted by an operator, or set aside)."""


class QueueStore(Protocol):
    """Durable queue of messages and per-recipient delivery state."""

    async def open(self) -> None:
        """Create or check the schema; recover leases left by a dead previous process."""

    async def close(self) -> None:
        """Finish pending writes and release resources."""

    async def put(self, msg: NewMessage) -> str:
        """Store a message durably; returns its queue id once committed (fsync'd)."""

    async def lease_due(self, owner: str, limit: int, lease_seconds: float) -> list[Lease]:
        """Lease up to `limit` groups of due recipients, one Lease per (message, domain)."""

    async def read_data(self, queue_id: str) -> bytes:
        """The message content; raises MessageNotFound."""

    async def record(self, queue_id: str, results: Sequence[RecipientResult]) -> None:
        """Apply attempt outcomes; ends the lease; deletes a message once all are final."""

    async def release(self, lease: Lease) -> None:
        """Give a lease back without an attempt: its recipients are due again now."""

    async def next_due_at(self) -> float | None:
        """Earliest time some recipient becomes leasable, or None when nothing waits."""

    async def list_messages(self, limit: int | None = None) -> list[MessageRecord]:
        """Queued messages, oldest first."""

    async def get_message(self, queue_id: str) -> MessageRecord | None:
        """One message, or None."""

    async def delete(self, queue_id: str) -> bool:
        """Remove a message and its recipients; False if there was none."""

    async def hold(self, queue_id: str) -> bool:
        """Stop delivery attempts for a message until `release_hold`; False if unknown."""

    async def release_hold(self, queue_id: str) -> bool:
        """Undo `hold`; False if unknown."""

    async def flush(self, queue_id: str | None = None) -> int:
        """Make deferred recipients (of one message or all) due now; returns how many."""

    async def counts(self) -> dict[str, int]:
        """Recipient counts per state, plus "held" and "set_aside"."""
