"""Queue ids: short, unique, sortable by time. Knows nothing of storage or SMTP.

`new_queue_id()` lets a submitter (the listener) choose the id before it writes the
Received header, so the trace header, a generated Message-ID and the queue agree.
"""

from __future__ import annotations

import os
import random
import threading
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # ascending in ASCII: ids sort by time
ID_LENGTH = 12


# With a slot: the counter's high bits name the writer, its low bits count.
SLOT_BITS = 8
_COUNT_BITS = 16 - SLOT_BITS


class QueueIds:
    """12 base32 characters: 44 bits of milliseconds, 16 bits of a per-ms counter.

    Thread-safe. Writers of one store at the same time (the processes of one relay) each
    take a slot (`use_slot`): their counters cannot meet, whatever the rate. Without one,
    the counter starts at a random value in every millisecond, so an occasional writer (an
    admin command) rarely meets another (the store refuses a duplicate id).
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._last_ms = -1
        self._seq = 0
        self._slot: int | None = None
        self._lock = threading.Lock()

    def use_slot(self, slot: int) -> None:
        """Draw ids from slot `slot` (0 .. 2**SLOT_BITS - 1) from now on."""
        if not 0 <= slot < 1 << SLOT_BITS:
            raise ValueError(f"queue id slot {slot} out of range")
        with self._lock:
            self._slot = slot
            self._last_ms += 1  # no id of this millisecond again, whatever it was

    def next(self, now: float) -> str:
        with self._lock:
            ms = max(int(now * 1000), self._last_ms)
            top = 1 << 16 if self._slot is None else 1 << _COUNT_BITS
            if ms == self._last_ms and self._seq + 1 < top:
                self._seq += 1
            else:
                ms = ms + 1 if ms == self._last_ms else ms
                # A random start keeps slot-less writers apart; a slot needs none.
                self._seq = self._rng.randrange(1 << 15) if self._slot is None else 0
            self._last_ms = ms
            counter = self._seq if self._slot is None else self._slot << _COUNT_BITS | self._seq
            n = (ms & ((1 << 44) - 1)) << 16 | counter
        return "".join(_CROCKFORD[(n >> shift) & 31] for shift in range(55, -1, -5))


# Seeded from the OS once: SystemRandom would cost a getrandom() call per id, and ids need
# to be distinct, not secret.
_PROCESS_IDS = QueueIds(random.Random(int.from_bytes(os.urandom(16), "big")))  # noqa: S311
# A forked process (serve.processes > 1) would otherwise draw the same "random" counter
# starts as its siblings: the same ids in the same millisecond, refused by the store (451).
os.register_at_fork(
    after_in_child=lambda: _PROCESS_IDS._rng.seed(int.from_bytes(os.urandom(16), "big"))
)


def use_id_slot(slot: int) -> None:
    """This process writes one store beside others: give its ids their own slot."""
    _PROCESS_IDS.use_slot(slot)


def new_queue_id() -> str:
    """A fresh queue id for `NewMessage.queue_id` (unique within this process)."""
    return _PROCESS_IDS.next(time.time())


def is_queue_id(text: str) -> bool:
    """Whether `text` has the shape of an id made here (admin input is checked with it)."""
    return len(text) == ID_LENGTH and all(c in _CROCKFORD for c in text)
