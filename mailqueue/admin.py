"""Queue administration as values: which messages an operator means, what a change did, and
the journal that carries each change to the running relay's log. Pure data; no I/O.

A `Selection` is what the `sts-relay queue` commands take, as Postfix's postsuper and
Exim's exiqgrep users expect: queue ids, or any of a recipient domain, a sender and a
state (ANDed), or everything. Every store applies one to the whole queue in one
transaction, whatever its size.

Message-wide actions (delete, hold, release) act on each selected message; recipient-wide
ones (flush, bounce) act on the selected messages' recipients that match the selection's
recipient criteria (`domain`, and `queued`/`deferred`/`active`/`set-aside`), never on
recipients a worker is delivering at that moment. Knows nothing of TLS, SMTP or DSNs: a
bounce asks its caller for the report message (`BounceReport`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from mailqueue.model import DsnRequest, LeasedRecipient, NewMessage

# Journal entries are kept this long after a relay logged them: a short audit trail in the
# store itself, whatever its engine.
JOURNAL_KEEP = 90 * 86400.0


class Pick(StrEnum):
    """The `--state` of a selection."""

    QUEUED = "queued"  # a recipient not attempted yet, not held, not being delivered
    DEFERRED = "deferred"  # a recipient waiting for its retry, not held, not being delivered
    HELD = "held"  # the message is held by an operator
    ACTIVE = "active"  # a recipient is being delivered right now (leased)
    SET_ASIDE = "set-aside"  # a recipient was set aside as unreadable


class AdminAction(StrEnum):
    DELETE = "delete"  # remove the messages, no report (postsuper -d)
    HOLD = "hold"  # keep them from delivery (postsuper -h)
    RELEASE = "release"  # undo hold (postsuper -H)
    FLUSH = "flush"  # make their waiting recipients due now (postqueue -f / -i)
    BOUNCE = "bounce"  # give up now and report to the sender (postsuper -b... / exim -Mg)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which messages: `queue_ids`, or the messages matching every criterion given.

    `sender` "" is the null sender; "@example.com" any sender at that domain (both case-
    insensitive). `domain`: a recipient still waiting there. `everything` selects the
    whole queue and excludes the other criteria.
    """

    queue_ids: tuple[str, ...] = ()
    domain: str | None = None
    sender: str | None = None
    state: Pick | None = None
    everything: bool = False

    def __post_init__(self) -> None:
        criteria = self.domain is not None or self.sender is not None or self.state is not None
        if self.everything and (criteria or self.queue_ids):
            raise ValueError("select everything, or by ids or criteria, not both")
        if self.queue_ids and criteria:
            raise ValueError("select by queue ids or by criteria, not both")

    @property
    def given(self) -> bool:
        """Whether anything at all was asked for (an empty Selection matches nothing)."""
        criteria = (self.domain, self.sender, self.state)
        return self.everything or bool(self.queue_ids) or any(c is not None for c in criteria)

    @property
    def recipient_level(self) -> bool:
        """Whether the selection names recipients, not only messages."""
        return self.domain is not None or self.state not in (None, Pick.HELD)

    def describe(self) -> str:
        """One line for logs and messages: `id=A,B`, `domain=d state=deferred`, `all`."""
        if self.everything:
            return "all"
        parts = []
        if self.queue_ids:
            parts.append("id=" + ",".join(self.queue_ids))
        if self.domain is not None:
            parts.append(f"domain={self.domain}")
        if self.sender is not None:
            parts.append(f"sender={self.sender or '<>'}")
        if self.state is not None:
            parts.append(f"state={self.state.value}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class AdminResult:
    """What one administrative change did.

    `matched`: messages selected. `count`: what changed: messages for delete, hold and
    release (a message already held is matched, not held again); recipients for flush and
    bounce. `held`: matched messages that are held (flush leaves them alone). `in_flight`:
    recipients left alone because a worker is delivering them. `missing`: queue ids asked
    for that are not in the queue. `dsns`: reports queued by a bounce.
    """

    action: AdminAction
    selection: str
    matched: int
    count: int
    held: int = 0
    in_flight: int = 0
    missing: tuple[str, ...] = ()
    dsns: int = 0


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One change as the journal keeps it, for the running relay to log (`queue_admin`)."""

    id: int  # increasing; never reused
    at: float  # when the change was committed (POSIX seconds)
    action: str
    queue_id: str | None  # the one id selected, else None
    selection: str
    matched: int
    count: int
    operator: str  # who ran the command (the OS user)


@dataclass(frozen=True, slots=True)
class BounceCandidate:
    """A message some of whose recipients an operator bounces, for the report to be built.

    `read_data` returns the stored content (None when it cannot be read); call it only when
    a report is owed.
    """

    queue_id: str
    sender: str
    received_at: float
    dsn: DsnRequest
    recipients: tuple[LeasedRecipient, ...]
    read_data: Callable[[], bytes | None]
    requiretls: bool = False  # submitted with REQUIRETLS (RFC 8689): its report is too


# The report a bounce owes the sender (None: none, e.g. a null sender or NOTIFY=NEVER).
BounceReport = Callable[[BounceCandidate], NewMessage | None]
