"""Session counting off the delivery path: sessions are added in memory (no I/O, no await)
and written to the store in batches from a worker thread.

Owns the in-memory batch and its flushing; `close()` writes what is left, so a clean
shutdown loses no count. Knows nothing of SMTP or the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime

from policy.model import Policy
from tlsrpt.model import AppliedPolicy, PolicyType, Session
from tlsrpt.store import ReportStorage


def utc_day(timestamp: float) -> str:
    """The UTC calendar day (YYYY-MM-DD) of a POSIX time (RFC 8460 §4.1)."""
    return datetime.fromtimestamp(timestamp, tz=UTC).date().isoformat()


@functools.lru_cache(maxsize=1024)  # counted for every attempt; the same few policies
def applied_policy(policy: Policy | None) -> AppliedPolicy:
    """RFC 8460 §4.5: an STS policy is reported as its lines, one string each."""
    if policy is None:
        return AppliedPolicy(PolicyType.NO_POLICY_FOUND)
    lines = tuple(line.rstrip("\r").strip() for line in policy.text.split("\n"))
    return AppliedPolicy(PolicyType.STS, tuple(line for line in lines if line), policy.mx)


@functools.lru_cache(maxsize=4096)
def sending_address(receiving_ip: str) -> str:
    """The local address the kernel routes to `receiving_ip` from (RFC 8460 §4.3
    sending-mta-ip). A UDP connect sends no packet; "" when there is no route."""
    if not receiving_ip:
        return ""
    family = socket.AF_INET6 if ":" in receiving_ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((receiving_ip, 9))
            return str(sock.getsockname()[0])
    except OSError:
        return ""


class SessionCounter:
    """Counts sessions; `run()` flushes every `interval` seconds until cancelled."""

    def __init__(self, store: ReportStorage, *, interval: float = 5.0) -> None:
        self._store = store
        self._interval = interval
        self._pending: Counter[Session] = Counter()
        self._flush_lock = asyncio.Lock()
        self._writing: asyncio.Future[None] | None = None  # the last write, maybe running

    def add(self, session: Session) -> None:
        """Count one session; cheap and synchronous, safe to call on the delivery path."""
        self._pending[session] += 1

    @property
    def pending(self) -> int:
        return sum(self._pending.values())

    async def flush(self) -> None:
        """Write everything counted so far (in a worker thread)."""
        async with self._flush_lock:
            batch, self._pending = self._pending, Counter()
            if not batch:
                return
            write = asyncio.ensure_future(asyncio.to_thread(_write, self._store, batch))
            write.add_done_callback(functools.partial(self._settled, batch))
            self._writing = write
            # Shielded: a cancelled flush (shutdown) still lets its thread commit; close()
            # waits for it before the store closes. Nothing is counted twice: a batch is
            # taken back only when its write did not commit.
            await asyncio.shield(write)

    def _settled(self, batch: Counter[Session], write: asyncio.Future[None]) -> None:
        if write.cancelled() or write.exception() is not None:
            self._pending.update(batch)  # rolled back: counted again at the next flush

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            with contextlib.suppress(Exception):  # a busy database: the next flush retries
                await self.flush()

    async def close(self) -> None:
        """Wait for a write a cancelled flush left running, then write what remains."""
        if self._writing is not None:
            with contextlib.suppress(Exception):
                await self._writing
        await self.flush()


def _write(store: ReportStorage, batch: Counter[Session]) -> None:
    resolved: Counter[Session] = Counter()
    for session, n in batch.items():
        failure = session.failure
        if failure is not None and failure.receiving_ip and not failure.sending_ip:
            failure = replace(failure, sending_ip=sending_address(failure.receiving_ip))
            session = replace(session, failure=failure)
        resolved[session] += n
    store.add_counts(resolved)
