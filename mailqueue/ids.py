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


class QueueIds:
    """12 base32 characters: 44 bits of milliseconds, 16 bits of a per-ms counter.

    Thread-safe. The counter starts at a random value in every millisecond, so two
    processes writing one store rarely collide (the store retries when they do).
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._last_ms = -1
        self._seq = 0
        self._lock = threading.Lock()

    def next(self, now: float) -> str:
        with self._lock:
            ms = max(int(now * 1000), self._last_ms)
            if ms == self._last_ms and self._seq + 1 < 1 << 16:
                self._seq += 1
            else:
                ms = ms + 1 if ms == self._last_ms else ms
                self._seq = self._rng.randrange(1 << 15)  # random start: distinct across processes
            self._last_ms = ms
            n = (ms & ((1 << 44) - 1)) << 16 | self._seq
        return "".join(_CROCKFORD[(n >> shift) & 31] for shift in range(55, -1, -5))


# Seeded from the OS once: SystemRandom would cost a getrandom() call per id, and ids need
# to be distinct, not secret.
_PROCESS_IDS = QueueIds(random.Random(int.from_bytes(os.urandom(16), "big")))  # noqa: S311


def new_queue_id() -> str:
    """A fresh queue id for `NewMessage.queue_id` (unique within this process)."""
    return _PROCESS_IDS.next(time.time())


def is_queue_id(text: str) -> bool:
    """Whether `text` has the shape of an id made here (admin input is checked with it)."""
    return len(text) == ID_LENGTH and all(c in _CROCKFORD for c in text)
