"""The queue store interface: what every backend (embedded SQLite, future PostgreSQL) offers.

Owns the contract only; knows nothing of SQL, TLS or SMTP. All methods are coroutines
and never block the event loop. Storage failures surface as `StoreUnavailable`, never as
a driver exception.

Lease model (designed for several relay nodes sharing one queue): `lease_due` hands out
due recipients, grouped per (message, recipient domain), exclusively until `Lease.until`,
to one `Lease.owner`; no other owner, in this process or another one on the same store,
gets that (message, domain) while the lease is live. A lease that runs out (its worker
died, or its attempt outlived it) makes the recipients due again; `renew` extends a live
one.

Who may record: only the lease's current holder. A lease is named by (owner, until): the
store applies a result only to rows that still carry both, so a worker whose lease was
taken over (expired, then leased by another owner) or renewed changes nothing, and learns
so from `Recorded.lost`. Rows of an expired lease that nobody leased again still carry
them: a late result is still applied. The holder ends a lease with `record` (an attempt
was made) or `release` (no attempt); `renew` hands back a new Lease (new `until`) that
replaces the old value for all later calls.

`record` is all or nothing: the outcomes, the DSN they owe and the deletion of a finished
message are one commit. On `StoreUnavailable` nothing was stored and the caller retries
the very same call; a retry of a call whose commit did happen (its reply was lost)
returns that call's `Recorded` and applies or queues nothing again. `renew` and `release`
are as safe to retry. (A holder that renews while a record is unresolved and gets None may
have recorded already: the retried record says.) So after an MX's 250, a failing store
never makes the relay send that recipient the message again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mailqueue.admin import AdminAction, AdminResult, BounceReport, JournalEntry, Selection
from mailqueue.model import Lease, MessageRecord, NewMessage, RecipientResult, Recorded


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
        """Lease up to `limit` groups of due recipients, one Lease per (message, domain),
        to `owner` (non-empty: this process's identity) until now + `lease_seconds`."""

    async def read_data(self, queue_id: str) -> bytes:
        """The message content; raises MessageNotFound."""

    async def record(
        self, lease: Lease, results: Sequence[RecipientResult], dsn: NewMessage | None = None
    ) -> Recorded:
        """Apply attempt outcomes to the rows still under `lease`, ending it for them, and
        queue `dsn` (the report those outcomes owe) in the same commit; deletes a message
        once all its recipients are final.

        The DSN is queued only when at least one result was applied: it reports outcomes,
        and outcomes that were not applied are another lease's to report. Leave
        `dsn.queue_id` None (the store picks a free id). One result per address.
        All or nothing: StoreUnavailable means nothing was stored; retry the same call.
        A lease is recorded once: recording it again returns the first call's Recorded.
        ValueError (nothing stored) for a result that is not SENT, BOUNCED or DEFERRED,
        a repeated address, or a DSN that `put` would refuse.
        """

    async def renew(self, lease: Lease, until: float) -> Lease | None:
        """Extend a lease still held (same owner and until) to `until`: the returned Lease
        replaces `lease` for record, renew and release. None when it is no longer ours.
        Retrying the same call after its commit returns the same renewed Lease."""

    async def release(self, lease: Lease) -> None:
        """Give a lease still held back without an attempt: due again now (a lease taken
        over by another owner, or renewed, is left alone)."""

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
        """Recipient counts per state, plus "held", "set_aside" and "messages". Runs on
        every metrics scrape and readiness probe: it must not count the queue row by row
        (a million recipients), but read counts kept as the queue changes."""

    # Bulk administration (mailqueue/admin.py): one transaction per call, whatever the
    # selection's size, with a journal entry for the running relay to log.

    async def select(self, selection: Selection) -> list[MessageRecord]:
        """The messages of `selection`, oldest first."""

    async def administer(
        self,
        action: AdminAction,
        selection: Selection,
        *,
        operator: str,
        reason: str = "",
        report: BounceReport | None = None,
    ) -> AdminResult:
        """Apply `action` to `selection` (see mailqueue/admin.py for what each touches) and,
        when something changed, journal it in the same commit. For a bounce, `reason` is
        the recipients' last error and `report` builds the report owed to each sender."""

    async def journal(self, after: int, limit: int = 500) -> list[JournalEntry]:
        """Journal entries with an id above `after`, oldest first."""

    async def journal_head(self) -> int:
        """The id of the newest journal entry (0: none): entries above it are news."""

    async def journal_logged(self) -> int:
        """The id of the last journal entry a relay has logged (0: none)."""

    async def mark_journal_logged(self, upto: int) -> None:
        """Entries up to `upto` are logged (old logged entries are dropped meanwhile)."""
