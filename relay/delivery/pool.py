"""Open SMTP connections kept for reuse, and the per-destination connection limit.

Owns which connection may carry which message: a pooled connection is keyed by
(MX host name, IP address, TLS requirement, REQUIRETLS). A connection opened under
VERIFIED has shown a WebPKI-valid certificate naming that MX host; the MX name check
against a domain's MTA-STS policy (`tls.mx_check`) is made per domain before the pool is
asked, so a verified connection to mx1 may carry mail for any domain whose policy lists
mx1 and asks no more than verified TLS (RFC 8461 §4.1, §5). Connections are never shared across
requirements: an opportunistic connection never serves an enforce domain. A connection
opened for a REQUIRETLS message (RFC 8689: the MX offered REQUIRETLS after STARTTLS) is
keyed apart too: REQUIRETLS mail never rides a connection opened for other mail, and
other mail never rides one opened for it.

Limits: at most `max_per_host` open connections (busy or idle) per IP address; at most
`max_messages` transactions per connection; idle connections are closed after
`idle_timeout` seconds, and at most `max_idle` are kept in all. The total of busy
connections is bounded by the worker's concurrency. Knows nothing of policies or queues.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from relay.delivery.client import Connection, quit_politely
from relay.delivery.tls import TlsRequirement


class PoolKey(NamedTuple):
    """Which transactions a pooled connection may carry."""

    host: str  # MX host name without trailing dot
    ip: str
    requirement: TlsRequirement
    requiretls: bool = False  # opened for REQUIRETLS mail (RFC 8689) and for it only


_QUIT_WITHIN_S = 2.0


@dataclass(frozen=True, slots=True)
class PoolLimits:
    max_per_host: int = 10
    max_messages: int = 100
    idle_timeout: float = 5.0
    max_idle: int = 100
    slot_wait: float = 5.0  # how long to wait for a free slot at a host before giving up


class ConnectionPool:
    """Idle connections by key, open-connection counts by IP. One event loop only."""

    def __init__(self, limits: PoolLimits, clock: Callable[[], float] | None = None) -> None:
        self.limits = limits
        self._clock = clock
        self._idle: dict[PoolKey, list[Connection]] = {}
        self._open: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self._waiting = 0  # acquirers waiting on `_changed` for a slot
        self._down: dict[str, float] = {}  # ip -> until when it is treated as down
        self.opened = 0  # connections opened through `reserve` (for tests and benchmarks)
        self.reused = 0  # transactions that went over an idle connection

    def _now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    @property
    def reuse_enabled(self) -> bool:
        return self.limits.max_messages > 1

    def take_idle(self, key: PoolKey) -> Connection | None:
        """An idle, live connection for `key` (the most recently used), or None."""
        idle = self._idle.get(key)
        now = self._now()
        while idle:
            conn = idle.pop()
            if conn.alive and now - conn.idle_since < self.limits.idle_timeout:
                self.reused += 1
                return conn
            self._forget(conn)
        return None

    def mark_down(self, ip: str, seconds: float) -> None:
        """`ip` timed out: for `seconds`, fail new connections to it at once instead of
        letting every queued message wait out the same timeout (Postfix's dead-host
        cache). Only timeouts count; a refused connection costs nothing to retry."""
        self._down[ip] = self._now() + seconds

    def is_down(self, ip: str) -> bool:
        until = self._down.get(ip)
        if until is None:
            return False
        if until <= self._now():
            del self._down[ip]
            return False
        return True

    def take_idle_for_host(
        self, host: str, requirement: TlsRequirement, requiretls: bool = False
    ) -> Connection | None:
        """An idle connection to any address of `host` under `requirement` (and opened for
        REQUIRETLS mail exactly when `requiretls`): reusing it skips the address lookup
        (Postfix's connection cache does the same per next hop)."""
        for key in list(self._idle):
            if (key.host, key.requirement, key.requiretls) == (host, requirement, requiretls):
                conn = self.take_idle(key)
                if conn is not None:
                    return conn
        return None

    async def acquire(self, key: PoolKey) -> Connection | bool:
        """An idle connection for `key`, else True once a slot for a new connection to
        its IP is reserved (the caller must then `put_back` or `forget` what it opens,
        or `unreserve`), else False when no slot freed up within `slot_wait` or the IP
        is marked down."""
        ip = key.ip
        try:
            async with asyncio.timeout(self.limits.slot_wait), self._changed:
                while True:
                    conn = self.take_idle(key)
                    if conn is not None:
                        return conn
                    if self.is_down(ip):
                        return False
                    if self._open.get(ip, 0) < self.limits.max_per_host or self._evict(ip):
                        self._open[ip] = self._open.get(ip, 0) + 1
                        self.opened += 1
                        return True
                    self._waiting += 1
                    try:
                        await self._changed.wait()
                    finally:
                        self._waiting -= 1
        except TimeoutError:
            return False

    def _evict(self, ip: str) -> bool:
        """Close one idle connection to `ip` kept for another key, to make room."""
        for key, idle in self._idle.items():
            if key.ip == ip and idle:
                self._forget(idle.pop(0))
                return True
        return False

    async def put_back(self, key: PoolKey, conn: Connection) -> None:
        """After a transaction: keep the connection for the next message, or retire it."""
        keep = (
            self.reuse_enabled
            and conn.alive
            and conn.transactions < self.limits.max_messages
            and self.idle_count() < self.limits.max_idle
        )
        if not keep:
            await self.retire(conn)
            return
        conn.idle_since = self._now()
        self._idle.setdefault(key, []).append(conn)
        await self._notify()

    async def retire(self, conn: Connection) -> None:
        """QUIT (briefly bounded) and close; frees the slot."""
        await quit_politely(conn.smtp, _QUIT_WITHIN_S)
        self._release(conn.ip)
        await self._notify()

    async def unreserve(self, ip: str) -> None:
        """A reserved slot whose connection could not be opened."""
        self._release(ip)
        await self._notify()

    async def discard(self, conn: Connection) -> None:
        """A broken connection: close without QUIT and free its slot."""
        self._forget(conn)
        await self._notify()

    def abandon(self, conn: Connection | None, ip: str) -> None:
        """Cancelled mid-use (an attempt cut off at its deadline): close `conn`, or give
        back the slot reserved for a connection being opened, at once and without awaiting
        (waiters see the slot at their next look)."""
        if conn is not None:
            conn.close()
        self._release(ip)

    def _forget(self, conn: Connection) -> None:
        conn.close()
        self._release(conn.ip)

    def _release(self, ip: str) -> None:
        left = self._open.get(ip, 0) - 1
        if left > 0:
            self._open[ip] = left
        else:
            self._open.pop(ip, None)

    async def _notify(self) -> None:
        if not self._waiting:
            return  # nobody to wake: the common case, once per message
        async with self._changed:
            self._changed.notify_all()

    def idle_count(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def open_count(self, ip: str | None = None) -> int:
        if ip is not None:
            return self._open.get(ip, 0)
        return sum(self._open.values())

    async def sweep(self) -> None:
        """Retire idle connections older than `idle_timeout` or closed by the server."""
        now = self._now()
        expired: list[Connection] = []
        for idle in self._idle.values():
            for conn in list(idle):
                if not conn.alive or now - conn.idle_since >= self.limits.idle_timeout:
                    idle.remove(conn)
                    expired.append(conn)
        for key in [k for k, idle in self._idle.items() if not idle]:
            del self._idle[key]
        for conn in expired:
            await self.retire(conn)

    async def run_sweeper(self, every: float = 1.0) -> None:
        """Sweep until cancelled, then close everything (the worker's TaskGroup owns it)."""
        try:
            while True:
                await asyncio.sleep(every)
                await self.sweep()
        finally:
            self.close_all()

    def close_all(self) -> None:
        """Close every idle connection at once (shutdown); no QUIT."""
        for idle in self._idle.values():
            for conn in idle:
                with contextlib.suppress(Exception):
                    self._forget(conn)
        self._idle.clear()
