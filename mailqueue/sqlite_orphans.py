"""The leases of a process known to be dead, returned to the queue at once.

A relay of several processes (relay/processes/) learns of a process's death from the
kernel; what that process had leased cannot be in delivery any more, so it need not wait
for `lease_until`: its recipients become due now. (A delivery the MX had accepted just
before the death is attempted again: the duplicate window SMTP leaves open, as after any
crash.) Matching on the owner alone is safe: owners carry a random token, never reused.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

_BUSY_MS = 10_000


def release_leases_of(path: Path, owner: str, *, now: float | None = None) -> int:
    """Release every lease `owner` holds in the store at `path`; how many recipients."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=_BUSY_MS / 1e3)
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
        conn.execute("PRAGMA synchronous = FULL")
        return conn.execute(
            "UPDATE queue_recipients SET lease_owner = NULL, lease_until = NULL,"
            " next_attempt_at = ? WHERE lease_owner = ?",
            (time.time() if now is None else now, owner),
        ).rowcount
    finally:
        conn.close()
