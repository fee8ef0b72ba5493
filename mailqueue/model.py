"""Values of the queue: what is stored, what is leased, what is recorded.

Pure data; no I/O. Times are POSIX seconds (float, UTC).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class RcptState(StrEnum):
    """Where one recipient of one message stands."""

    QUEUED = "queued"  # never attempted
    DEFERRED = "deferred"  # attempted, will be retried at next_attempt_at
    SENT = "sent"  # final: handed to the recipient's MX
    BOUNCED = "bounced"  # final: permanent failure (a DSN was queued if one was owed)


FINAL_STATES = frozenset({RcptState.SENT, RcptState.BOUNCED})


@dataclass(frozen=True, slots=True)
class DsnRequest:
    """RFC 3461 parameters given at submission, kept with the message for its whole life.

    `notify` maps a recipient to its NOTIFY keywords ("NEVER", or some of "SUCCESS",
    "FAILURE", "DELAY"); a recipient absent from it gave no NOTIFY. `orcpt` maps a
    recipient to its ORCPT value ("rfc822;addr", decoded). `envid` is decoded xtext.
    """

    ret: str | None = None  # "FULL" or "HDRS"
    envid: str | None = None
    notify: dict[str, tuple[str, ...]] = field(default_factory=dict)
    orcpt: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message as the listener hands it over; `data` is the full RFC 5322 message, CRLF."""

    sender: str  # "" for the null reverse-path
    recipients: tuple[str, ...]
    data: bytes
    client: str = ""  # peer address of the submitting client, for the record
    dsn: DsnRequest = field(default_factory=DsnRequest)
    queue_id: str | None = None  # chosen by the submitter (mailqueue.new_queue_id()), else by put
    # RFC 8689 §2: MAIL FROM carried REQUIRETLS; kept with the message for its whole life.
    requiretls: bool = False


@dataclass(frozen=True, slots=True)
class LeasedRecipient:
    address: str
    attempts: int  # attempts already made before this one
    delay_notified: bool = False  # a "delayed" DSN was already sent for this recipient


@dataclass(frozen=True, slots=True)
class Lease:
    """Due work for one message and one recipient domain, held exclusively until `until`.

    `owner` and `until` together name the lease: the store records, renews or releases
    only rows that still carry both. A Lease built by hand (owner "") names no rows.
    """

    queue_id: str
    domain: str
    sender: str
    recipients: tuple[LeasedRecipient, ...]
    received_at: float
    expires_at: float  # received_at + lifetime: after this a deferral becomes a bounce
    until: float
    dsn: DsnRequest = field(default_factory=DsnRequest)
    owner: str = ""  # who leased it (lease_due's `owner`); a default so notice tests need none
    requiretls: bool = False  # the message was submitted with REQUIRETLS (RFC 8689)


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What the worker reports for one leased recipient; the store applies the schedule."""

    address: str
    state: RcptState  # SENT, DEFERRED or BOUNCED
    error: str | None = None  # last error (remote reply or local reason), one line
    delay_notified: bool = False  # set once a "delayed" DSN has been queued for it


@dataclass(frozen=True, slots=True)
class Recorded:
    """What `record` did. Every address of the results is in `applied` or in `lost`.

    `lost`: not applied because its row is no longer under this lease (another owner
    leased it, it was renewed or recovered, it is already final, or the message was
    deleted). `dsn_queue_id`: the id of the DSN queued in the same commit, None when none
    was given or none was queued (nothing applied).
    """

    applied: tuple[str, ...]
    lost: tuple[str, ...]
    dsn_queue_id: str | None = None


# How long every store keeps what a `record` call did, so that a retry of it gets the same
# answer (mailqueue/store.py). A caller retries within seconds to minutes (while it keeps
# the lease renewed); an hour is a wide margin and stays small on a busy relay.
RECEIPT_KEEP = 3600.0


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
