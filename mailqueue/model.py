"""Values of the queue: what is stored, what is leased, what is recorded.

Pure data; no I/O. Times are POSIX seconds (float, UTC).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class RcptState(StrEnum):
    """Where one recipient of one message stands."""

    QUEUED = "queued"  # never attempted
    DEFERRED = "deferred"  # attempted, will be retried at next_attempt_at
    SENT = "sent"  # final: handed to the recipient's MX
    BOUNCED = "bounced"  # final: permanent failure (a DSN was queued if one was owed)


FINAL_STATES = frozenset({RcptState.SENT, RcptState.BOUNCED})


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message as the listener hands it over; `data` is the full RFC 5322 message, CRLF."""

    sender: str  # "" for the null reverse-path
    recipients: tuple[str, ...]
    data: bytes
    client: str = ""  # peer address of the submitting client, for the record


@dataclass(frozen=True, slots=True)
class LeasedRecipient:
    address: str
    attempts: int  # attempts already made before this one


@dataclass(frozen=True, slots=True)
class Lease:
    """Due work for one message and one recipient domain, held exclusively until `until`."""

    queue_id: str
    domain: str
    sender: str
    recipients: tuple[LeasedRecipient, ...]
    received_at: float
    expires_at: float  # received_at + lifetime: after this a deferral becomes a bounce
    until: float


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What the worker reports for one leased recipient; the store applies the schedule."""

    address: str
    state: RcptState  # SENT, DEFERRED or BOUNCED
    error: str | None = None  # last error (remote reply or local reason), one line


@dataclass(frozen=True, slots=True)
class RecipientRecord:
    address: str
    domain: str
    state: RcptState
    attempts: int
    next_attempt_at: float | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """A queued message as admin commands show it."""

    queue_id: str
    sender: str
    received_at: float
    size: int
    held: bool
    recipients: tuple[RecipientRecord, ...]
