"""Builds the running relay from a Config and runs it until told to stop.

The one place where configuration becomes objects: the store, the policy cache and
resolver, the delivery worker and the listener. `policy` and `mailqueue` take plain
arguments from here and never see the Config.

Also owns the process lifecycle of `serve`: SIGTERM/SIGINT stop accepting, let deliveries
in flight finish within `delivery.shutdown_grace` and leave the rest queued; SIGHUP reloads
what can change without a restart (TLS overrides, the listener's certificates).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import signal
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import dns.asyncresolver
import dns.nameserver

from mailqueue.ids import use_id_slot
from mailqueue.model import Lease
from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite import SqliteStore
from mailqueue.store import StoreUnavailable
from policy.cache import CachedPolicy, PolicyCache, PolicyChange, PolicyStore
from policy.model import Policy, PolicyLookup, TlsRptResult
from policy.resolver import PolicyCacheUnavailable, PolicyResolver
from policy.webpki import client_context, unverified_context
from relay import __version__
from relay.config import Config, ConfigError, config_warnings, parse_hostport
from relay.delivery.attempt import AttemptSettings
from relay.delivery.bounce import BounceSettings
from relay.delivery.dane import dane_lookup
from relay.delivery.dns_cache import DEFAULT_MAX_TTL, TtlCache
from relay.delivery.dns_coalesce import CoalescingResolver
from relay.delivery.dnssec import dnssec_in_force
from relay.delivery.holds import hold_seconds
from relay.delivery.overrides import TlsOverrides, parse_overrides
from relay.delivery.pipeline import Pipeline
from relay.delivery.pool import ConnectionPool
from relay.delivery.scheduler import Scheduler, SchedulerSettings
from relay.events import EventLog, timestamp_field
from relay.inbound.listener import Listener
from relay.inbound.sockets import ListeningSocket
from relay.metrics import Metrics, MetricsServer
from relay.posture import PostureFeed, build_posture
from relay.reporting import Reporting, build_reporting
from relay.state import DB_NAME as DB_NAME  # re-exported: tests and tools use it
from relay.state import ServeLock

if TYPE_CHECKING:  # imported when `state.url` asks for it: psycopg costs 10 MiB a process
    from typing import TypeAlias

    from mailqueue.postgres import PostgresStore

    AnyStore: TypeAlias = SqliteStore | PostgresStore

# Proactive policy refresh (RFC 8461 §3.3, §10.2): which domains count as "still being
# mailed" (how often to look is `policy.refresh_interval`).
_RECENTLY_USED_S = 7 * 86400.0
# After a store error a background loop pauses this long, doubling up to the maximum, and
# goes back to its normal pace after a success.
_FIRST_RETRY_S = 1.0
_MAX_RETRY_S = 60.0

# The store's file name (DB_NAME) lives with the state directory's rules: relay/state.py.
# How often `serve` looks for queue changes made by `sts-relay queue ...` (the journal).
_ADMIN_JOURNAL_POLL_S = 0.5


def database_path(cfg: Config) -> Path:
    return Path(cfg.state.path) / DB_NAME


def make_resolver(
    nameservers: tuple[str, ...], timeout: float, *, max_ttl: float = DEFAULT_MAX_TTL
) -> dns.asyncresolver.Resolver:
    """A dnspython resolver for the configured servers, or the system's when none are set,
    with a TTL-honouring answer cache that keeps nothing longer than `max_ttl` seconds.
    Identical queries in flight at the same time are sent once (delivery/dns_coalesce.py)."""
    if nameservers:
        resolver = CoalescingResolver(configure=False)
        servers: list[str | dns.nameserver.Nameserver] = []
        for entry in nameservers:
            host, port = parse_hostport(entry, default_port=53)
            servers.append(dns.nameserver.Do53Nameserver(host, port))
        resolver.nameservers = servers
    else:
        resolver = CoalescingResolver()
    resolver.timeout = timeout
    resolver.lifetime = timeout
    # Answers reused for their TTL (relay/delivery/dns_cache.py); the check for a newer
    # policy before a bounce bypasses it (policy/discover.py, RFC 8461 §5.1).
    resolver.cache = TtlCache(max_ttl=max_ttl)
    return resolver


class _LeaseGate:
    """The queue store as the worker sees it: leasing can be closed for a graceful stop."""

    leasing = True

    async def lease_due(self, owner: str, limit: int, lease_seconds: float) -> list[Lease]:
        if not self.leasing:
            return []
        return await super().lease_due(owner, limit, lease_seconds)  # type: ignore[misc,no-any-return]


class GatedStore(_LeaseGate, SqliteStore):
    """The embedded SQLite queue store, gated."""


@functools.cache
def _gated_postgres() -> type[PostgresStore]:
    from mailqueue.postgres import PostgresStore

    class GatedPostgresStore(_LeaseGate, PostgresStore):
        """The shared PostgreSQL queue store (`state.url`), gated."""

    return GatedPostgresStore


class CountingResolver(PolicyResolver):
    """The policy resolver, reporting each delivery lookup's source (cache hits) to metrics."""

    on_lookup: Callable[[PolicyLookup], None] = staticmethod(lambda _lookup: None)

    async def resolve(self, domain: str) -> PolicyLookup:
        lookup = await super().resolve(domain)
        self.on_lookup(lookup)
        return lookup


def open_store(cfg: Config) -> AnyStore:
    """The queue store of `state.url` (PostgreSQL, shared) or `state.path` (SQLite), for a
    command (no background maintenance: the serving relays do it)."""
    if cfg.state.url:
        return open_shared_store(cfg)
    return _open_sqlite(cfg, SqliteStore)


def open_shared_store(cfg: Config) -> PostgresStore:
    """The PostgreSQL queue store of `state.url`, for a command or the supervisor."""
    from mailqueue.postgres import PostgresStore

    return PostgresStore(cfg.state.url, **_schedule(cfg), maintenance_every=None)


def _open_gated(cfg: Config) -> GatedStore | PostgresStore:
    """The serving relay's store; `leasing` closes it for a graceful stop (_drain)."""
    if cfg.state.url:
        return _gated_postgres()(cfg.state.url, **_schedule(cfg))
    return _open_sqlite(cfg, GatedStore)


def _schedule(cfg: Config) -> dict[str, Any]:
    return {
        "schedule": RetrySchedule(tuple(float(d) for d in cfg.queue.retry_schedule)),
        "lifetime": float(cfg.queue.lifetime),
    }


_Store = TypeVar("_Store", bound=SqliteStore)


def _open_sqlite(cfg: Config, store_class: type[_Store]) -> _Store:
    Path(cfg.state.path).mkdir(parents=True, exist_ok=True)
    return store_class(database_path(cfg), **_schedule(cfg))


def open_policy_cache(cfg: Config) -> PolicyStore:
    Path(cfg.state.path).mkdir(parents=True, exist_ok=True)
    if cfg.state.url:  # shared by every node: one fetch per refresh for them all
        from policy.cache_postgres import PostgresPolicyCache

        return PostgresPolicyCache(cfg.state.url)
    return PolicyCache(database_path(cfg))


class _PolicyEvents:
    """Turns the policy resolver's observations, and the cache's changes, into log events."""

    def __init__(self, events: EventLog) -> None:
        self._events = events

    def policy_changed(self, change: PolicyChange) -> None:
        old, new = change.old, change.new
        if old is None:
            return  # a first policy: policy_fetched says it
        self._events.policy_changed(
            domain=change.domain,
            changed=change.changed,
            old_policy_id=change.old_id or "",
            old_mode=old.mode.value,
            old_mx=old.mx,
            old_max_age=old.max_age,
            policy_id=change.new_id,
            mode=new.mode.value,
            mx=new.mx,
            max_age=new.max_age,
        )

    def policy_fetched(self, domain: str, policy_id: str, policy: Policy) -> None:
        self._events.policy_fetched(
            domain=domain,
            policy_id=policy_id,
            mode=policy.mode.value,
            max_age=policy.max_age,
            mx=list(policy.mx),
        )

    def policy_fetch_failed(
        self,
        domain: str,
        policy_id: str | None,
        result: TlsRptResult,
        detail: str,
        cached: CachedPolicy | None,
    ) -> None:
        self._events.policy_fetch_failed(
            domain=domain,
            policy_id=policy_id,
            result=result.value,
            reason=detail,
            cached_mode=cached.policy.mode.value if cached else None,
        )


@dataclass(frozen=True, slots=True)
class ProcessRole:
    """Which process of the relay this one is (relay/processes/ runs `serve.processes`).

    Every process accepts mail and delivers it; the primary (index 0) also runs what the
    relay must do once, whatever the count: the proactive policy refresh, sending TLS
    reports, logging the changes made with `sts-relay queue`. `owner_token` makes the
    scheduler's lease owner unique (`lease_owner`), so the supervisor can name the leases of
    a process that died.
    """

    index: int = 0
    count: int = 1
    owner_token: str = field(default_factory=lambda: secrets.token_hex(4))
    id_slot: int = 0  # this process's part of the queue ids (mailqueue/ids.py)

    @property
    def primary(self) -> bool:
        return self.index == 0


def lease_owner(hostname: str, pid: int, token: str) -> str:
    """The owner the scheduler of process `pid` writes on its leases."""
    return f"{hostname}:{pid}:{token}"


@dataclass
class Relay:
    """The running parts, for tests and for the `serve` command."""

    store: GatedStore | PostgresStore  # PostgreSQL's is gated too (_gated_postgres)
    cache: PolicyStore
    policies: PolicyResolver
    worker: Scheduler
    listener: Listener
    metrics: Metrics = field(default_factory=Metrics)
    overrides: TlsOverrides | None = None
    stopping: bool = False
    reporting: Reporting | None = None
    posture: PostureFeed | None = None  # the TLS posture counters (relay/posture.py)
    state_path: Path = Path()  # state.path: the serve lock, the users file (SQLite: the store)


def build(cfg: Config, events: EventLog, role: ProcessRole | None = None) -> Relay:
    role = role or ProcessRole()
    resolver = make_resolver(tuple(cfg.dns.nameservers), cfg.dns.timeout, max_ttl=cfg.dns.max_ttl)
    verified = client_context(cfg.tls.ca_file)
    cache = open_policy_cache(cfg)
    cache.on_change = _PolicyEvents(events).policy_changed  # logs `policy_changed`
    metrics = Metrics()
    events.subscribe(metrics.observe_event)
    overrides = TlsOverrides(cfg.tls.overrides)
    policies = CountingResolver(
        cache,
        resolver,
        verified,
        https_port=cfg.policy.https_port,
        fetch_deadline=cfg.policy.fetch_deadline,
        dns_timeout=cfg.dns.timeout,
        failure_backoff=cfg.policy.failure_backoff,
        observer=_PolicyEvents(events),
    )
    policies.on_lookup = metrics.observe_lookup
    store = _open_gated(cfg)
    attempt = AttemptSettings(
        port=cfg.delivery.port,
        helo=cfg.delivery.hostname,
        # MX connections get contexts of their own: they resume TLS sessions, each context
        # from its own cache (policy/webpki.py); policy fetches never do.
        verified_ctx=client_context(cfg.tls.ca_file, resume=True),
        unverified_ctx=unverified_context(resume=True),
        on_tls_handshake=metrics.observe_tls_handshake,
        connect_timeout=cfg.delivery.connect_timeout,
        command_timeout=cfg.delivery.command_timeout,
        dns_timeout=cfg.dns.timeout,
        allow_loopback_mx=cfg.delivery.allow_loopback_mx,
        max_messages_per_connection=cfg.delivery.max_messages_per_connection,
        max_connections_per_host=cfg.delivery.max_connections_per_host,
        own_addresses=frozenset(
            parse_hostport(a)[0] for a in (*cfg.listen.addresses, *cfg.listen.tls_addresses)
        ),
    )
    reporting = build_reporting(
        cfg, database_path(cfg), queue=store, resolver=resolver, ssl_context=verified, events=events
    )
    # Connections reused across leases for the same MX (relay/delivery/pool.py).
    pool = ConnectionPool(replace(attempt.pool_limits(), max_idle=cfg.delivery.concurrency))
    pipeline = Pipeline(
        policies=policies,
        resolver=resolver,
        attempt_settings=attempt,
        pool=pool,
        events=events,
        overrides=overrides.get,
        tls_hook=reporting.session_hook,
        # DANE (RFC 7672) when dns.dnssec trusts the resolver's AD bit.
        dane=dane_lookup(
            dnssec_in_force(cfg.dns.dnssec, cfg.dns.nameservers), resolver, timeout=cfg.dns.timeout
        ),
    )
    worker = Scheduler(
        store=store,
        pipeline=pipeline,
        pool=pool,
        settings=SchedulerSettings(
            concurrency=cfg.delivery.concurrency,
            owner=lease_owner(cfg.delivery.hostname, os.getpid(), role.owner_token),
            bounce=BounceSettings(
                reporting_mta=cfg.delivery.hostname,
                delay_notice_after=cfg.queue.delay_notice_after,
            ),
            lease_time=cfg.delivery.lease_time,
            attempt_deadline=cfg.delivery.attempt_deadline,
            unreachable_hold=hold_seconds(
                cfg.delivery.unreachable_hold, cfg.queue.retry_schedule[0]
            ),
        ),
        events=events,
    )
    reporting.reporter.on_queued = worker.wake
    posture = build_posture(
        cfg,
        database_path(cfg),
        metrics=metrics,
        events=events,
        processes=role.count,
        gauges=role.primary,
    )
    worker.on_recorded = posture.record  # counted in memory once committed, flushed below
    listener = Listener(cfg, store=store, events=events, on_queued=worker.wake)
    return Relay(
        store=store,
        cache=cache,
        policies=policies,
        worker=worker,
        listener=listener,
        metrics=metrics,
        overrides=overrides,
        reporting=reporting,
        posture=posture,
        state_path=Path(cfg.state.path),
    )


async def _refresh_policies(
    policies: PolicyResolver,
    every: float,
    events: EventLog,
    *,
    first_retry: float = _FIRST_RETRY_S,
    max_retry: float = _MAX_RETRY_S,
) -> None:
    """Until cancelled: every `every` seconds, refresh the cached policies that are due.

    A store that fails (the policy cache unreadable, the state directory gone) must not end
    the task, and with it `serve`: it is logged as store_error and tried again after a pause
    of `first_retry` seconds, doubling up to `max_retry`; a success restores the pace.
    """
    pause, retry = every, first_retry
    while True:
        await asyncio.sleep(pause)
        error = None
        try:
            await policies.refresh_due(time.time(), _RECENTLY_USED_S)
        except PolicyCacheUnavailable as exc:
            error = str(exc)  # already "policy cache unreadable: <cause>"
        except (StoreUnavailable, sqlite3.Error, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            pause, retry = every, first_retry
        else:
            pause, retry = retry, min(retry * 2, max_retry)
            events.store_error(error=f"policy refresh: {error} (retrying in {pause:g} s)")


async def readiness(relay: Relay) -> str | None:
    """None when the relay can take mail (listener accepting, store writable), else why not.

    "Writable" is what the store has seen, not what permission bits say: its last write
    failed (then it tries a write of its own, so readiness returns as soon as storage
    does), or its database or WAL file was deleted or replaced under the process
    (mailqueue/writer.py: it then refuses to acknowledge anything, 451 to DATA).
    """
    if relay.stopping:
        return "stopping"
    if not relay.listener.bound_addresses:
        return "listener not accepting"
    try:
        await relay.store.counts()
        problem = await relay.store.writable()
        await asyncio.to_thread(_probe_write, relay.state_path)
    except (StoreUnavailable, OSError) as exc:
        return f"store not writable: {exc}"
    return None if problem is None else f"store not writable: {problem}"


def _probe_write(directory: Path) -> None:
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".readyz-") as probe:
        probe.write(b"ok")
        probe.flush()


async def _drain(relay: Relay, grace: float) -> int:
    """Lease nothing more and wait up to `grace` seconds for deliveries in flight; return
    how many were still running (they are cut off and stay queued: their leases are
    released when the store is next opened)."""
    if isinstance(relay.store, _LeaseGate):  # the serving store of either engine is gated
        relay.store.leasing = False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while relay.worker.in_flight and loop.time() < deadline:  # noqa: ASYNC110 - a count only
        await asyncio.sleep(0.05)
    return relay.worker.in_flight


ConfigLoader = Callable[[], Config]


async def _log_admin_journal(
    relay: Relay,
    events: EventLog,
    *,
    every: float = _ADMIN_JOURNAL_POLL_S,
    max_retry: float = _MAX_RETRY_S,
    log: bool = True,
) -> None:
    """Until cancelled: log each change made with `sts-relay queue ...` (the store's journal,
    written by the command in the same transaction as the change) once, as `queue_admin`,
    and wake the worker so that a flush or a release takes effect at once. Entries written
    while no relay ran are logged at the next start. With `log` false (the other processes
    of a relay: one logs) only the waking is done."""
    logged: int | None = None
    pause, retry = every, _FIRST_RETRY_S
    store = relay.store
    while True:
        try:
            if not isinstance(store, SqliteStore):
                # Several nodes: each entry is claimed by one of them, which logs it (the
                # others are woken by the store's notifications: _wake_on_notifications).
                entries = await store.claim_journal() if log else []
            else:
                if logged is None:
                    logged = await store.journal_logged()
                entries = await store.journal(logged)
            for entry in entries if log else ():
                events.queue_admin(
                    action=entry.action,
                    queue_id=entry.queue_id,
                    selection=entry.selection,
                    matched=entry.matched,
                    count=entry.count,
                    operator=entry.operator,
                    requested_at=timestamp_field(entry.at),
                )
            if entries:
                logged = entries[-1].id
                if log and isinstance(store, SqliteStore):
                    await store.mark_journal_logged(logged)
                relay.worker.wake()
            pause, retry = (0.0 if entries else every), _FIRST_RETRY_S
        except StoreUnavailable as exc:
            pause, retry = retry, min(retry * 2, max_retry)
            events.store_error(error=f"admin journal: {exc} (retrying in {pause:g} s)")
        await asyncio.sleep(pause)


async def _wake_on_notifications(relay: Relay, store: PostgresStore) -> None:
    """Until cancelled: wake the worker whenever any node changed the queue (`queue flush`,
    hold, release...: the store's LISTEN), so the change takes effect at once here too."""
    async for _ in store.notifications():
        relay.worker.wake()


async def _reload_on(
    hangup: asyncio.Event, relay: Relay, events: EventLog, load: ConfigLoader
) -> None:
    """SIGHUP: re-read the configuration and apply what can change while running.

    All or nothing: whatever can fail (reading the file, parsing the overrides, loading the
    certificate and key) happens before anything is applied, so `reload_failed` means the
    previous settings all stay. The listener swaps in a new certificate only once it has
    loaded; the overrides, parsed beforehand, are installed after it, which cannot fail.
    """
    while True:
        await hangup.wait()
        hangup.clear()
        try:
            cfg = await asyncio.to_thread(load)
            overrides = parse_overrides(cfg.tls.overrides)
            parts = []
            reload_tls = getattr(relay.listener, "reload_tls", None)
            if callable(reload_tls):
                reload_tls()
                parts.append("certificates")
        except (ConfigError, OSError, ValueError) as exc:
            events.reload_failed(error=str(exc))
            continue
        if relay.overrides is not None:
            relay.overrides.install(overrides)
            parts.insert(0, "tls_overrides")
        events.reloaded(parts=parts)


async def serve(
    cfg: Config,
    events: EventLog,
    stop: asyncio.Event,
    *,
    hangup: asyncio.Event | None = None,
    load: ConfigLoader | None = None,
    reason: Callable[[], str] = lambda: "signal",
) -> None:
    """Run the relay until `stop` is set; mail not yet delivered stays queued.

    When `hangup` is set, `load` is called for a fresh configuration (SIGHUP). The state
    directory's serve lock is held throughout (relay/state.py): when another process
    serves it, StateBusy is raised before anything else is opened.
    """
    if cfg.state.url:  # other nodes draw queue ids too: a slot of our own, at random
        use_id_slot(secrets.randbelow(256))
    with ServeLock(cfg.state.path):
        await _serve_locked(cfg, events, stop, hangup=hangup, load=load, reason=reason)


async def _serve_locked(
    cfg: Config,
    events: EventLog,
    stop: asyncio.Event,
    *,
    hangup: asyncio.Event | None,
    load: ConfigLoader | None,
    reason: Callable[[], str],
) -> None:
    async with running(cfg, events) as relay:
        metrics_server: MetricsServer | None = None
        try:
            announce_started(cfg, events, processes=1)
            if cfg.metrics.address:
                metrics_server = MetricsServer(
                    lambda: relay.metrics.render(relay.store.counts), lambda: readiness(relay)
                )
                address = await metrics_server.start(cfg.metrics.address)
                events.metrics_listening(address=address)
            events.listening(addresses=relay.listener.bound_addresses)
            abandoned = await work(
                relay,
                cfg,
                events,
                stop,
                hangup=hangup,
                load=load,
                on_stopping=lambda: events.stopping(reason=reason()),
            )
        finally:
            if metrics_server is not None:
                await metrics_server.stop()
        events.stopped(abandoned=abandoned)


def announce_started(cfg: Config, events: EventLog, *, processes: int) -> None:
    dnssec = dnssec_in_force(cfg.dns.dnssec, cfg.dns.nameservers)
    events.started(
        version=__version__,
        state_path=str(cfg.state.path),
        warnings=[*config_warnings(cfg), *([dnssec.warning] if dnssec.warning else [])],
        dnssec=dnssec.summary,
        processes=processes,
    )


@contextlib.asynccontextmanager
async def running(
    cfg: Config,
    events: EventLog,
    *,
    role: ProcessRole | None = None,
    sockets: Sequence[ListeningSocket] | None = None,
) -> AsyncIterator[Relay]:
    """The relay built, its store open and its listener serving (on `sockets` when a
    supervisor bound them); on exit everything is stopped and closed, counters written."""
    relay = build(cfg, events, role)
    await relay.store.open()
    try:
        await relay.listener.start(sockets)
        yield relay
    finally:
        with contextlib.suppress(Exception):
            await relay.listener.stop()
        if relay.reporting is not None:
            await relay.reporting.close()
        if relay.posture is not None:
            await relay.posture.close()
        if not isinstance(relay.store, SqliteStore):
            # Nothing of ours is in delivery any more; a shared store has no start-up
            # recovery (a node cannot know it is alone): hand our leases back now.
            with contextlib.suppress(StoreUnavailable):
                await relay.store.release_owner(relay.worker.owner)
        await relay.store.close()
        relay.cache.close()


async def work(
    relay: Relay,
    cfg: Config,
    events: EventLog,
    stop: asyncio.Event,
    *,
    role: ProcessRole | None = None,
    hangup: asyncio.Event | None = None,
    load: ConfigLoader | None = None,
    on_stopping: Callable[[], None] = lambda: None,
) -> int:
    """Deliver and run the background jobs until `stop` is set; then stop accepting, let
    deliveries in flight finish within `delivery.shutdown_grace` and return how many were
    cut off (they stay queued)."""
    primary = role is None or role.primary
    async with asyncio.TaskGroup() as tasks:
        worker = tasks.create_task(relay.worker.run())
        background = [tasks.create_task(_log_admin_journal(relay, events, log=primary))]
        if not isinstance(relay.store, SqliteStore):
            background.append(tasks.create_task(_wake_on_notifications(relay, relay.store)))
        if primary:
            refresh = _refresh_policies(relay.policies, cfg.policy.refresh_interval, events)
            background.append(tasks.create_task(refresh))
        if relay.reporting is not None:  # RFC 8460 counters and the daily report job
            background.append(tasks.create_task(relay.reporting.run(send=primary)))
        if relay.posture is not None:  # the TLS posture counters, written every 5 s
            background.append(tasks.create_task(relay.posture.run()))
        if hangup is not None and load is not None:
            background.append(tasks.create_task(_reload_on(hangup, relay, events, load)))
        await stop.wait()
        on_stopping()
        relay.stopping = True
        await relay.listener.stop()
        abandoned = await _drain(relay, cfg.delivery.shutdown_grace)
        worker.cancel()
        for task in background:
            task.cancel()
    return abandoned


async def run_until_signalled(cfg: Config, events: EventLog, load: ConfigLoader) -> None:
    """`sts-relay serve`: SIGTERM/SIGINT stop gracefully, SIGHUP reloads."""
    stop, hangup = asyncio.Event(), asyncio.Event()
    received: list[str] = []
    loop = asyncio.get_running_loop()

    def on_stop(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, hangup.set)
    await serve(cfg, events, stop, hangup=hangup, load=load, reason=lambda: received[0])
