"""Prometheus metrics and the small HTTP server for `/metrics`, `/healthz` and `/readyz`.

Owns the metric names, their help text and labels (listed in the README), one
CollectorRegistry per relay (never the process-global one, so several relays in one test
process do not collide), and the HTTP endpoint. Counts come from the event catalogue
(`EventLog.subscribe`), from policy lookups and from the posture figures of committed
attempts (`observe_posture`, relay/posture.py); the queue gauges are read from the store, the
policy-waiting gauges from the posture tally, at scrape time. Knows nothing of SMTP, MTA-STS
rules or SQLite: readiness and queue counts come in as callables from `relay/app.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from policy.model import PolicyLookup
from posture.model import Attempt, Status
from relay.config import format_hostport, parse_hostport

# Seconds from receipt to delivery: from a fast LAN hop to the 4-hour retry steps.
_DELAY_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, float("inf"))
# The HTTP side: one short request per connection, bounded in time and size.
_REQUEST_TIMEOUT_S = 5.0
_MAX_HEADER_BYTES = 8192
_TEXT = "text/plain; charset=utf-8"

QueueCounts = Callable[[], Awaitable[Mapping[str, int]]]
Readiness = Callable[[], Awaitable[str | None]]  # None when ready, else why not
Render = Callable[[], Awaitable[bytes]]  # the exposition text (Metrics.render, or merged)


class Metrics:
    """Every metric of the relay, in its own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory...
        self.received = Counter(
            "sts_relay_messages_received", "Messages accepted (250 after DATA).", registry=r
        )
        self.rejected = Counter(
            "sts_relay_smtp_rejected", "SMTP commands refused, by stage.", ["stage"], registry=r
        )
        self.deliveries = Counter(
            "sts_relay_deliveries",
            "Recipient delivery attempts by outcome: sent, deferred or bounced.",
            ["status"],
            registry=r,
        )
        self.delay = Histogram(
            "sts_relay_delivery_delay_seconds",
            "Seconds from receipt to successful delivery, per recipient.",
            buckets=_DELAY_BUCKETS,
            registry=r,
        )
        self.tls = Counter(
            "sts_relay_tls_sessions",
            "Delivery attempts that reached an MX, by RFC 8460 result type ('success' when "
            "TLS was up and nothing failed, 'no-tls' for plaintext) and MTA-STS mode "
            "('no-policy' when none applied).",
            ["result", "mode"],
            registry=r,
        )
        self.dane = Counter(
            "sts_relay_dane_sessions",
            "Delivery attempts whose MX was held to DANE (RFC 7672), by outcome: 'verified' (a"
            " TLSA record matched), 'unauthenticated' (only unusable records: TLS without"
            " authentication), else the RFC 8460 result type (tlsa-invalid, dnssec-invalid,"
            " starttls-not-supported, certificate-host-mismatch, ...).",
            ["outcome"],
            registry=r,
        )
        self.delivery_tls_sessions = Counter(
            "sts_relay_delivery_tls_sessions",
            "TLS handshakes of delivery connections that completed, by handshake: 'resumed'"
            " (an earlier session of the same MX name, context and kind of policy) or 'full'.",
            ["handshake"],
            registry=r,
        )
        self.held = Counter(
            "sts_relay_deliveries_held",
            "Recipient attempts deferred without being tried: their domain was held as"
            " unreachable (delivery.unreachable_hold).",
            registry=r,
        )
        self.holds = Counter(
            "sts_relay_destination_holds",
            "Holds begun: a domain whose every MX address failed before any SMTP reply.",
            registry=r,
        )
        self.bounces = Counter(
            "sts_relay_bounces_queued", "Delivery status notifications queued.", registry=r
        )
        self.policy_lookups = Counter(
            "sts_relay_policy_lookups",
            "Policy lookups for deliveries, by source: cached (a cache hit), fetched, none,"
            " unavailable (the policy cache could not be read).",
            ["source"],
            registry=r,
        )
        self.policy_fetches = Counter(
            "sts_relay_policy_fetches",
            "HTTPS policy fetches by outcome (ok, error).",
            ["outcome"],
            registry=r,
        )
        self.policy_fetch_errors = Counter(
            "sts_relay_policy_fetch_errors",
            "Failed policy fetches by RFC 8460 result type.",
            ["result"],
            registry=r,
        )
        self.tls_overrides = Counter(
            "sts_relay_tls_overrides",
            "Attempts whose TLS decision an operator override changed, by override.",
            ["override"],
            registry=r,
        )
        self.auth_failures = Counter(
            "sts_relay_auth_failures",
            "Failed SMTP AUTH attempts, by mechanism (rate-limited ones included).",
            ["mechanism"],
            registry=r,
        )
        self.queue = Gauge(
            "sts_relay_queue_recipients",
            "Recipients in the queue by state (queued, deferred, sent, bounced, held, set_aside);"
            " read from the store at scrape time.",
            ["state"],
            registry=r,
        )
        self.queue_messages = Gauge(
            "sts_relay_queue_messages", "Messages in the queue (read at scrape time).", registry=r
        )
        # The TLS posture (README "TLS posture report"), counted as committed.
        self.delivered = Counter(
            "sts_relay_delivered_recipients",
            "Recipients delivered, by mechanism (dane, sts-enforce, sts-testing, override,"
            " tls-required-no, opportunistic, plaintext), TLS version ('none' in the clear)"
            " and whether the MX was authenticated.",
            ["mechanism", "tls_version", "authenticated"],
            registry=r,
        )
        self.delivered_messages = Counter(
            "sts_relay_delivered_messages",
            "Messages delivered ((message, domain) transfers), by mechanism.",
            ["mechanism"],
            registry=r,
        )
        self.delivery_failures = Counter(
            "sts_relay_delivery_failures",
            "Recipients deferred or bounced, by cause: policy (a TLS or policy failure) or other.",
            ["status", "cause"],
            registry=r,
        )
        self.policy_refresh_errors = Counter(
            "sts_relay_policy_refresh_errors",
            "Failed policy fetches for a domain that had a policy (one is cached), by the"
            " cached policy's mode.",
            ["cached_mode"],
            registry=r,
        )
        self.policy_waiting_recipients = Gauge(
            "sts_relay_policy_waiting_recipients",
            "Recipients waiting because their domain's policy cannot be met, by the"
            " mechanism that requires it (sts-enforce, dane, override); read at scrape time.",
            ["mechanism"],
            registry=r,
        )
        self.policy_waiting_oldest = Gauge(
            "sts_relay_policy_waiting_oldest_seconds",
            "Seconds the longest-waiting mail has waited on a policy it cannot meet (0: none),"
            " by mechanism; read at scrape time.",
            ["mechanism"],
            registry=r,
        )
        # Label children already made, by (id of the metric, label values...) (_labelled).
        self._children: dict[tuple[object, ...], Counter] = {}
        # Per mechanism: (recipients, oldest wait in s); set by relay/posture.py.
        self.policy_waiting: Callable[[], Mapping[str, tuple[int, float]]] | None = None

    # -- feeding -----------------------------------------------------------------------

    def _labelled(self, metric: Counter, *values: str) -> Counter:
        """`metric.labels(*values)`, kept: prometheus_client's labels() takes a lock and
        builds its key on every call, and every message or attempt asks for one."""
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe_event(self, event: str, fields: dict[str, Any]) -> None:
        """An EventLog observer: counts what the event catalogue reports."""
        if event == "received":
            self.received.inc()
        elif event == "rejected":
            self._labelled(self.rejected, str(fields.get("stage"))).inc()
        elif event == "delivery":
            self._delivery(fields)
        elif event == "bounce_queued":
            self.bounces.inc()
        elif event == "destination_held":
            self.holds.inc()
        elif event == "policy_fetched":
            self.policy_fetches.labels(outcome="ok").inc()
        elif event == "policy_fetch_failed":
            self.policy_fetches.labels(outcome="error").inc()
            self.policy_fetch_errors.labels(result=str(fields.get("result"))).inc()
            if fields.get("cached_mode") is not None:  # the domain had a policy
                self.policy_refresh_errors.labels(cached_mode=str(fields["cached_mode"])).inc()
        elif event == "tls_override":
            self.tls_overrides.labels(override=str(fields.get("override"))).inc()
        elif event == "auth_failed":
            self.auth_failures.labels(mechanism=str(fields.get("mechanism"))).inc()

    def _delivery(self, fields: dict[str, Any]) -> None:
        status = str(fields.get("status"))
        self._labelled(self.deliveries, status).inc()
        if fields.get("held"):
            self.held.inc()
        if status == "sent" and isinstance(fields.get("delay_s"), int | float):
            self.delay.observe(float(fields["delay_s"]))
        if fields.get("ip") is None and fields.get("tlsrpt_result") is None:
            return  # no MX was reached and no TLS or policy failure: nothing to say of TLS
        result = fields.get("tlsrpt_result") or ("success" if fields.get("tls") else "no-tls")
        mode = fields.get("sts_mode") or "no-policy"
        self._labelled(self.tls, str(result), str(mode)).inc()
        if fields.get("tls_policy") == "dane":
            self.dane.labels(outcome=_dane_outcome(fields)).inc()

    def observe_tls_handshake(self, resumed: bool) -> None:
        """A delivery connection's TLS handshake completed (relay/delivery/client.py)."""
        self.delivery_tls_sessions.labels(handshake="resumed" if resumed else "full").inc()

    def observe_lookup(self, lookup: PolicyLookup) -> None:
        self.policy_lookups.labels(source=lookup.source).inc()

    def observe_posture(self, attempt: Attempt) -> None:
        """The posture figures of one committed attempt (relay/posture.py)."""
        delivered: set[str] = set()
        for r in attempt.recipients:
            if r.status is Status.DELIVERED:
                mechanism = r.counted_mechanism.value
                delivered.add(mechanism)
                self.delivered.labels(
                    mechanism=mechanism,
                    tls_version=r.tls or "none",
                    authenticated="true" if r.authenticated else "false",
                ).inc()
            else:
                cause = r.cause.value if r.cause is not None else "other"
                self.delivery_failures.labels(status=r.status.value, cause=cause).inc()
        for mechanism in delivered:
            self.delivered_messages.labels(mechanism=mechanism).inc()

    async def render(self, queue_counts: QueueCounts) -> bytes:
        """The Prometheus text exposition, with queue gauges read now."""
        counts = await queue_counts()
        for state, value in counts.items():
            if state == "messages":
                self.queue_messages.set(value)
            else:
                self.queue.labels(state=state).set(value)
        if self.policy_waiting is not None:
            for mechanism, (recipients, oldest) in self.policy_waiting().items():
                self.policy_waiting_recipients.labels(mechanism=mechanism).set(recipients)
                self.policy_waiting_oldest.labels(mechanism=mechanism).set(round(oldest, 1))
        return generate_latest(self.registry)


def _dane_outcome(fields: dict[str, Any]) -> str:
    """The DANE outcome of a `delivery` event whose MX was held to DANE."""
    if fields.get("dane_record"):
        return "verified"
    if fields.get("tlsrpt_result"):
        return str(fields["tlsrpt_result"])
    return "unauthenticated" if fields.get("tls") else "failed"


class MetricsServer:
    """HTTP/1.1 on one address: GET /metrics, /healthz (alive), /readyz (ready to work)."""

    def __init__(self, render: Render, ready: Readiness) -> None:
        self._render = render
        self._ready = ready
        self._server: asyncio.Server | None = None
        self.address = ""

    async def start(self, address: str) -> str:
        """Bind `address` ("127.0.0.1:0" picks a port); return the bound "host:port"."""
        host, port = parse_hostport(address)
        self._server = await asyncio.start_server(self._serve, host, port, limit=_MAX_HEADER_BYTES)
        name = self._server.sockets[0].getsockname()
        self.address = format_hostport(str(name[0]), int(name[1]))
        return self.address

    def filenos(self) -> list[int]:
        """The listening sockets' descriptors (a forked process closes its copies)."""
        return [] if self._server is None else [s.fileno() for s in self._server.sockets]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
                status, ctype, body = await self._respond(head)
                await _write(writer, status, ctype, body, head.startswith(b"HEAD "))
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            pass  # a broken or slow client: just close
        except asyncio.LimitOverrunError:
            with contextlib.suppress(OSError, TimeoutError):
                await _write(writer, "431 Request Header Fields Too Large", _TEXT, b"", False)
        except Exception as exc:  # noqa: BLE001 - e.g. the store is gone: say so, keep serving
            with contextlib.suppress(OSError, TimeoutError):
                await _write(writer, "503 Service Unavailable", _TEXT, repr(exc).encode(), False)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _respond(self, head: bytes) -> tuple[str, str, bytes]:
        method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
        path = rest.split(" ", 1)[0].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", _TEXT, b"GET or HEAD\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, await self._render()
        if path == "/healthz":
            return "200 OK", _TEXT, b"ok\n"
        if path == "/readyz":
            problem = await self._ready()
            if problem is None:
                return "200 OK", _TEXT, b"ready\n"
            return "503 Service Unavailable", _TEXT, problem.encode() + b"\n"
        return "404 Not Found", _TEXT, b"not found\n"


async def _write(
    writer: asyncio.StreamWriter, status: str, ctype: str, body: bytes, head_only: bool
) -> None:
    header = (
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    writer.write(header.encode("latin-1") + (b"" if head_only else body))
    await writer.drain()
