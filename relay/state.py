"""The relay's state directory: where the store is, whether there is one, and who serves it.

Owns the store's file name, the check that every command but `serve` makes before it
touches the state (they never create a store: a mistyped `state.path`, or a relative one
run from another working directory, must not quietly show an empty queue), and the serve
lock. Knows nothing of what the store holds.

Three lock files sit in the state directory, each for its own job:
- `relay.sqlite3.queue-lock` belongs to the queue store (mailqueue/sqlite.py): every open
  store holds it shared, and an opener that finds itself alone takes it exclusively for a
  moment to return the leases of a dead process. Admin commands hold it beside a live relay.
- `relay.sqlite3.write-lock` belongs to the store's writer (mailqueue/writer.py): held
  exclusively for each write transaction, so a process waiting to write wakes as soon as
  another one's transaction ends.
- `serve.lock` belongs to `serve`: taken exclusively and without waiting at start and held
  for the life of the process, so a second `serve` on the same directory refuses to start.
  The kernel drops it when the process ends, however it ends (no stale lock after a crash:
  the file may stay, its lock does not). Admin commands never touch it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

DB_NAME = "relay.sqlite3"
LOCK_NAME = "serve.lock"


class NoState(Exception):
    """The state directory holds no store (commands other than `serve` never create one)."""

    def __init__(self, state_path: Path) -> None:
        super().__init__(f"no sts-relay state at {state_path}")
        self.state_path = state_path


class StateBusy(Exception):
    """Another `serve` holds the state directory."""


def existing_store(state_path: str | Path) -> Path:
    """The store's path in `state_path`; NoState when there is none."""
    db = Path(state_path) / DB_NAME
    if not db.is_file():
        raise NoState(Path(state_path))
    return db


class ServeLock:
    """The exclusive lock of one serving process on its state directory."""

    def __init__(self, state_path: str | Path) -> None:
        self.path = Path(state_path) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (creating the directory); StateBusy when another process has it,
        OSError when the directory cannot be created or written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise StateBusy(
                f"state directory {self.path.parent} is already served by another"
                f" sts-relay{pid}; stop that one first, or give this one another state.path"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # For the operator's eyes only; the lock, not this number, is what counts.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock. The file stays: removing it would race with the next opener."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ServeLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
