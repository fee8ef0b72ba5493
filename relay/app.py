"""Builds the running relay from a Config and runs it until told to stop.

The one place where configuration becomes objects: the store, the policy cache and
resolver, the delivery worker and the listener. `policy` and `mailqueue` take plain
arguments from here and never see the Config.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import dns.asyncresolver
import dns.nameserver

from mailqueue.schedule import RetrySchedule
from mailqueue.sqlite import SqliteStore
from policy.cache import CachedPolicy, PolicyCache
from policy.model import Policy, TlsRptResult
from policy.resolver import PolicyResolver
from policy.webpki import client_context, unverified_context
from relay import __version__
from relay.config import Config, parse_hostport
from relay.delivery.attempt import AttemptSettings
from relay.delivery.worker import Worker, WorkerSettings
from relay.events import EventLog
from relay.listener import Listener

# Proactive policy refresh (RFC 8461 §3.3, §10.2): how often to look, and which domains
# count as "still being mailed".
_REFRESH_EVERY_S = 60.0
_RECENTLY_USED_S = 7 * 86400.0

DB_NAME = "relay.sqlite3"


def database_path(cfg: Config) -> Path:
    return Path(cfg.state.path) / DB_NAME


def make_resolver(nameservers: tuple[str, ...], timeout: float) -> dns.asyncresolver.Resolver:
    """A dnspython resolver for the configured servers, or the system's when none are set."""
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        servers: list[str | dns.nameserver.Nameserver] = []
        for entry in nameservers:
            host, port = parse_hostport(entry, default_port=53)
            servers.append(dns.nameserver.Do53Nameserver(host, port))
        resolver.nameservers = servers
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.timeout = timeout
    resolver.lifetime = timeout
    return resolver


def open_store(cfg: Config) -> SqliteStore:
    Path(cfg.state.path).mkdir(parents=True, exist_ok=True)
    return SqliteStore(
        database_path(cfg),
        schedule=RetrySchedule(tuple(float(d) for d in cfg.queue.retry_schedule)),
        lifetime=float(cfg.queue.lifetime),
    )


def open_policy_cache(cfg: Config) -> PolicyCache:
    Path(cfg.state.path).mkdir(parents=True, exist_ok=True)
    return PolicyCache(database_path(cfg))


class _PolicyEvents:
    """Turns the policy resolver's observations into log events."""

    def __init__(self, events: EventLog) -> None:
        self._events = events

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


@dataclass
class Relay:
    """The running parts, for tests and for the `serve` command."""

    store: SqliteStore
    cache: PolicyCache
    policies: PolicyResolver
    worker: Worker
    listener: Listener


def build(cfg: Config, events: EventLog) -> Relay:
    resolver = make_resolver(tuple(cfg.dns.nameservers), cfg.dns.timeout)
    verified = client_context(cfg.tls.ca_file)
    cache = open_policy_cache(cfg)
    policies = PolicyResolver(
        cache,
        resolver,
        verified,
        https_port=cfg.policy.https_port,
        fetch_deadline=cfg.policy.fetch_deadline,
        dns_timeout=cfg.dns.timeout,
        failure_backoff=cfg.policy.failure_backoff,
        observer=_PolicyEvents(events),
    )
    store = open_store(cfg)
    attempt = AttemptSettings(
        port=cfg.delivery.port,
        helo=cfg.delivery.hostname,
        verified_ctx=verified,
        unverified_ctx=unverified_context(),
        connect_timeout=cfg.delivery.connect_timeout,
        command_timeout=cfg.delivery.command_timeout,
        dns_timeout=cfg.dns.timeout,
        allow_loopback_mx=cfg.delivery.allow_loopback_mx,
    )
    worker = Worker(
        store=store,
        policies=policies,
        resolver=resolver,
        attempt_settings=attempt,
        settings=WorkerSettings(
            hostname=cfg.delivery.hostname,
            concurrency=cfg.delivery.concurrency,
            owner=f"{cfg.delivery.hostname}:{os.getpid()}:{secrets.token_hex(4)}",
        ),
        events=events,
    )
    listener = Listener(cfg, store=store, events=events, on_queued=worker.wake)
    return Relay(store=store, cache=cache, policies=policies, worker=worker, listener=listener)


async def _refresh_policies(policies: PolicyResolver) -> None:
    while True:
        await asyncio.sleep(_REFRESH_EVERY_S)
        await policies.refresh_due(time.time(), _RECENTLY_USED_S)


async def serve(cfg: Config, events: EventLog, stop: asyncio.Event) -> None:
    """Run the relay until `stop` is set; mail not yet delivered stays queued."""
    relay = build(cfg, events)
    await relay.store.open()
    try:
        await relay.listener.start()
        events.started(version=__version__, state_path=str(cfg.state.path))
        events.listening(addresses=relay.listener.bound_addresses)
        async with asyncio.TaskGroup() as tasks:
            worker = tasks.create_task(relay.worker.run())
            refresh = tasks.create_task(_refresh_policies(relay.policies))
            await stop.wait()
            events.stopping(reason="signal")
            await relay.listener.stop()
            worker.cancel()
            refresh.cancel()
    finally:
        with contextlib.suppress(Exception):
            await relay.listener.stop()
        await relay.store.close()
        relay.cache.close()
