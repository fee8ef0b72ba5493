"""The catalogue of operator-facing events, written one line each (chasquid's maillog idea).

Owns the event names, their fields and their levels, and the two line formats: a JSON
object per line (`ts`, `level`, `event`, then the fields, in catalogue order) or text
(`ts level event key=value ...`). Knows nothing of where the facts come from.

To add an event: add its name and fields to EVENTS and a method of the same name with
exactly those keyword-only parameters (a test checks the two agree, and the README's
event table against EVENTS).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

LEVELS = ("debug", "info", "warning", "error")

EVENTS: dict[str, tuple[str, ...]] = {
    "started": ("version", "state_path", "warnings", "dnssec", "processes"),
    "start_failed": ("reason",),
    "listening": ("addresses",),
    "stopping": ("reason",),
    "stopped": ("abandoned",),
    "metrics_listening": ("address",),
    "process_started": ("index", "pid"),
    "process_exited": ("index", "pid", "status", "released_leases", "restart_in"),
    "reloaded": ("parts",),
    "reload_failed": ("error",),
    "received": ("queue_id", "message_id", "sender", "rcpts", "size", "client"),
    "rejected": ("client", "stage", "code", "reason", "sender", "rcpt"),
    "delivery": (
        "queue_id",
        "rcpt",
        "domain",
        "status",
        "mx",
        "ip",
        "tls",
        "verified",
        "tls_resumed",
        "sts_mode",
        "policy_id",
        "tls_policy",
        "dane_record",
        "requiretls",
        "reason",
        "tlsrpt_result",
        "attempt",
        "delay_s",
        "held",
    ),
    "destination_held": ("domain", "until", "reason"),
    "bounce_queued": ("queue_id", "dsn_queue_id", "sender", "rcpts"),
    "policy_fetched": ("domain", "policy_id", "mode", "max_age", "mx"),
    "policy_fetch_failed": ("domain", "policy_id", "result", "reason", "cached_mode"),
    "policy_forgotten": ("domain", "policy_id"),
    "policy_changed": (
        "domain",
        "changed",
        "old_policy_id",
        "old_mode",
        "old_mx",
        "old_max_age",
        "policy_id",
        "mode",
        "mx",
        "max_age",
    ),
    "tls_override": ("queue_id", "domain", "mx", "override", "decision", "reason"),
    "queue_admin": (
        "action",
        "queue_id",
        "selection",
        "matched",
        "count",
        "operator",
        "requested_at",
    ),
    "store_error": ("error",),
    "worker_error": ("queue_id", "domain", "error"),
    "tlsrpt_report": ("domain", "day", "report_id", "uri", "state", "attempts", "error"),
    "session_error": ("client", "error"),
    "authenticated": ("client", "user", "mechanism"),
    "auth_failed": ("client", "user", "mechanism", "reason"),
}

_BARE = re.compile(r"[^\s\"=\\\x00-\x1f\x7f-\x9f\u2028\u2029]+")
# Left raw by json.dumps(ensure_ascii=False), yet str.splitlines() breaks lines at U+0085,
# U+2028 and U+2029, and DEL and the C1 controls act on terminals: written as \uXXXX (inside
# a JSON string, where alone they can occur, that is the same text) so that every reader
# sees one event per line.
_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029]")


def _escape_unsafe(line: str) -> str:
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def timestamp_field(posix: float) -> str:
    """A time carried in an event field (not `ts`), e.g. `queue_admin`'s `requested_at`:
    UTC, milliseconds, with its offset."""
    return datetime.fromtimestamp(posix, tz=UTC).isoformat(timespec="milliseconds")


def _rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_LEVEL_RANK = {level: rank for rank, level in enumerate(LEVELS)}
# One encoder for every line: json.dumps() with these options builds a new one per call.
_JSON = json.JSONEncoder(ensure_ascii=False, default=str, separators=(",", ":"))
_second_text: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def _now_rfc3339() -> str:
    """_rfc3339(_utc_now()), without a datetime: the text of a second is made once."""
    global _second_text
    now = time.time()
    second = int(now)
    cached = _second_text
    if cached[0] != second:
        cached = _second_text = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{int((now - second) * 1000):03d}Z"


def _text_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        value = ",".join(str(v) for v in value)
    text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text, ensure_ascii=False)


class EventLog:
    """Writes events to `stream`, one line each, flushed; safe to call from any thread."""

    def __init__(
        self,
        stream: TextIO,
        fmt: str = "json",
        level: str = "info",
        *,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if fmt not in ("json", "text"):
            raise ValueError(f"unknown log format {fmt!r}")
        if level not in LEVELS:
            raise ValueError(f"unknown log level {level!r}")
        self._stream = stream
        self._fmt = fmt
        self._min = LEVELS.index(level)
        self._clock = clock
        self._lock = threading.Lock()
        self._observers: list[Callable[[str, dict[str, Any]], None]] = []

    def subscribe(self, observer: Callable[[str, dict[str, Any]], None]) -> None:
        """Also hand every event (whatever its level) to `observer`, e.g. the metrics."""
        self._observers.append(observer)

    def _emit(self, event: str, level: str, fields: dict[str, Any]) -> None:
        for observer in self._observers:
            observer(event, fields)
        if _LEVEL_RANK[level] < self._min:
            return
        ts = _now_rfc3339() if self._clock is _utc_now else _rfc3339(self._clock())
        if self._fmt == "json":
            record = {"ts": ts, "level": level, "event": event, **fields}
            line = _JSON.encode(record)
        else:
            parts = [ts, level, event]
            parts += [f"{k}={_text_value(v)}" for k, v in fields.items()]
            line = " ".join(parts)
        if not line.isascii():
            line = _escape_unsafe(line)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    # --- lifecycle ---

    def started(
        self,
        *,
        version: str,
        state_path: str,
        warnings: Sequence[str],
        dnssec: str | None = None,
        processes: int = 1,
    ) -> None:
        """Serving; `state_path` is absolute; `warnings` (e.g. a delivery.hostname that is
        not a fully qualified name, an AD bit believed from a remote resolver) make it a
        warning; `dnssec` says what `dns.dnssec` puts in force (DANE on or off, and why);
        `processes` how many processes share the work (`serve.processes`)."""
        fields = {
            "version": version,
            "state_path": state_path,
            "warnings": list(warnings),
            "dnssec": dnssec,
            "processes": processes,
        }
        self._emit("started", "warning" if warnings else "info", fields)

    def start_failed(self, *, reason: str) -> None:
        """`serve` could not start (port in use, bad certificate, unwritable or already
        served state, bad configuration); the process exits non-zero after this line."""
        self._emit("start_failed", "error", {"reason": reason})

    def listening(self, *, addresses: Sequence[str]) -> None:
        self._emit("listening", "info", {"addresses": list(addresses)})

    def stopping(self, *, reason: str) -> None:
        self._emit("stopping", "info", {"reason": reason})

    def stopped(self, *, abandoned: int) -> None:
        """The relay is about to exit; `abandoned` deliveries were cut off (still queued)."""
        self._emit("stopped", "warning" if abandoned else "info", {"abandoned": abandoned})

    def process_started(self, *, index: int, pid: int) -> None:
        """One process of a relay with `serve.processes` > 1 is serving (its index from 0;
        index 0 also runs the relay's one-per-relay jobs)."""
        self._emit("process_started", "info", {"index": index, "pid": pid})

    def process_exited(
        self, *, index: int, pid: int, status: str, released_leases: int, restart_in: float | None
    ) -> None:
        """A process of the relay ended (`status`: "exit N" or the signal's name). Its
        leases were returned to the queue at once (it can no longer be delivering them);
        `restart_in` seconds until it is replaced, None when the relay is stopping."""
        level = "info" if restart_in is None else "error"
        fields = {
            "index": index,
            "pid": pid,
            "status": status,
            "released_leases": released_leases,
            "restart_in": restart_in,
        }
        self._emit("process_exited", level, fields)

    def metrics_listening(self, *, address: str) -> None:
        self._emit("metrics_listening", "info", {"address": address})

    def reloaded(self, *, parts: Sequence[str]) -> None:
        """SIGHUP: what was reloaded (certificates, users, tls_overrides)."""
        self._emit("reloaded", "info", {"parts": list(parts)})

    def reload_failed(self, *, error: str) -> None:
        """SIGHUP with a broken configuration: the previous settings stay in force."""
        self._emit("reload_failed", "error", {"error": error})

    # --- the listener ---

    def received(
        self,
        *,
        queue_id: str,
        message_id: str | None,
        sender: str,
        rcpts: Sequence[str],
        size: int,
        client: str,
    ) -> None:
        self._emit(
            "received",
            "info",
            {
                "queue_id": queue_id,
                "message_id": message_id,
                "sender": sender,
                "rcpts": list(rcpts),
                "size": size,
                "client": client,
            },
        )

    def rejected(
        self,
        *,
        client: str,
        stage: str,
        code: str,
        reason: str,
        sender: str | None = None,
        rcpt: str | None = None,
    ) -> None:
        """An SMTP command refused by policy or limits; `code` is "554 5.7.1"."""
        fields = {"client": client, "stage": stage, "code": code, "reason": reason}
        self._emit("rejected", "info", {**fields, "sender": sender, "rcpt": rcpt})

    def session_error(self, *, client: str, error: str) -> None:
        """An unexpected error inside an SMTP session; the client saw only 451 4.3.0."""
        self._emit("session_error", "error", {"client": client, "error": error})

    def authenticated(self, *, client: str, user: str, mechanism: str) -> None:
        """A client logged in with SMTP AUTH (RFC 4954)."""
        self._emit(
            "authenticated", "info", {"client": client, "user": user, "mechanism": mechanism}
        )

    def auth_failed(
        self, *, client: str, user: str | None, mechanism: str | None, reason: str
    ) -> None:
        """A failed or refused SMTP AUTH ("bad credentials", "rate limited", ...)."""
        fields = {"client": client, "user": user, "mechanism": mechanism, "reason": reason}
        self._emit("auth_failed", "warning", fields)

    # --- delivery ---

    def delivery(
        self,
        *,
        queue_id: str,
        rcpt: str,
        domain: str,
        status: str,
        mx: str | None,
        ip: str | None,
        tls: str | None,
        verified: bool,
        tls_resumed: bool | None = None,
        sts_mode: str | None,
        policy_id: str | None,
        tls_policy: str | None,
        dane_record: str | None = None,
        requiretls: bool = False,
        reason: str | None,
        tlsrpt_result: str | None,
        attempt: int,
        delay_s: float,
        held: bool = False,
    ) -> None:
        """One recipient's attempt: status "sent" (info), "deferred" or "bounced" (warning).
        `tls_resumed`: the connection's TLS handshake resumed an earlier session (None in
        the clear or when no MX was reached). `held`: deferred without being tried, its
        domain being held as unreachable (`destination_held`)."""
        self._emit(
            "delivery",
            "info" if status == "sent" else "warning",
            {
                "queue_id": queue_id,
                "rcpt": rcpt,
                "domain": domain,
                "status": status,
                "mx": mx,
                "ip": ip,
                "tls": tls,
                "verified": verified,
                "tls_resumed": tls_resumed,
                "sts_mode": sts_mode,
                "policy_id": policy_id,
                "tls_policy": tls_policy,
                "dane_record": dane_record,
                "requiretls": requiretls,
                "reason": reason,
                "tlsrpt_result": tlsrpt_result,
                "attempt": attempt,
                "delay_s": delay_s,
                "held": held,
            },
        )

    def destination_held(self, *, domain: str, until: str, reason: str) -> None:
        """Every MX address of `domain` failed before any SMTP reply: its mail is deferred
        without being tried until `until` (delivery.unreachable_hold). One line per hold."""
        self._emit(
            "destination_held", "warning", {"domain": domain, "until": until, "reason": reason}
        )

    def bounce_queued(
        self, *, queue_id: str, dsn_queue_id: str, sender: str, rcpts: Sequence[str]
    ) -> None:
        fields = {"queue_id": queue_id, "dsn_queue_id": dsn_queue_id, "sender": sender}
        self._emit("bounce_queued", "info", {**fields, "rcpts": list(rcpts)})

    def tls_override(
        self,
        *,
        queue_id: str | None,
        domain: str,
        mx: str | None,
        override: str,
        decision: str,
        reason: str,
    ) -> None:
        """An operator override (or `TLS-Required: No`) changed a TLS decision."""
        self._emit(
            "tls_override",
            "warning",
            {
                "queue_id": queue_id,
                "domain": domain,
                "mx": mx,
                "override": override,
                "decision": decision,
                "reason": reason,
            },
        )

    def tlsrpt_report(
        self,
        *,
        domain: str,
        day: str,
        report_id: str,
        uri: str,
        state: str,
        attempts: int,
        error: str | None,
    ) -> None:
        """An RFC 8460 report was queued, sent, or failed (to be retried) for one URI."""
        level = "warning" if state in ("pending", "failed") else "info"
        fields = {"domain": domain, "day": day, "report_id": report_id, "uri": uri}
        outcome = {"state": state, "attempts": attempts, "error": error}
        self._emit("tlsrpt_report", level, {**fields, **outcome})

    def worker_error(self, *, queue_id: str, domain: str, error: str) -> None:
        self._emit(
            "worker_error", "error", {"queue_id": queue_id, "domain": domain, "error": error}
        )

    # --- policies ---

    def policy_fetched(
        self, *, domain: str, policy_id: str, mode: str, max_age: int, mx: Sequence[str]
    ) -> None:
        self._emit(
            "policy_fetched",
            "info",
            {
                "domain": domain,
                "policy_id": policy_id,
                "mode": mode,
                "max_age": max_age,
                "mx": list(mx),
            },
        )

    def policy_fetch_failed(
        self,
        *,
        domain: str,
        policy_id: str | None,
        result: str,
        reason: str,
        cached_mode: str | None,
    ) -> None:
        """Warning when a cached enforce/testing policy is in play, info otherwise."""
        level = "info" if cached_mode in (None, "none") else "warning"
        self._emit(
            "policy_fetch_failed",
            level,
            {
                "domain": domain,
                "policy_id": policy_id,
                "result": result,
                "reason": reason,
                "cached_mode": cached_mode,
            },
        )

    def policy_changed(
        self,
        *,
        domain: str,
        changed: Sequence[str],
        old_policy_id: str,
        old_mode: str,
        old_mx: Sequence[str],
        old_max_age: int,
        policy_id: str,
        mode: str,
        mx: Sequence[str],
        max_age: int,
    ) -> None:
        """A fetched policy differs from the cached one in `changed` (of policy_id, mode,
        mx, max_age); a warning when the mode leaves enforce."""
        weaker = old_mode == "enforce" and mode != "enforce"
        self._emit(
            "policy_changed",
            "warning" if weaker else "info",
            {
                "domain": domain,
                "changed": list(changed),
                "old_policy_id": old_policy_id,
                "old_mode": old_mode,
                "old_mx": list(old_mx),
                "old_max_age": old_max_age,
                "policy_id": policy_id,
                "mode": mode,
                "mx": list(mx),
                "max_age": max_age,
            },
        )

    def policy_forgotten(self, *, domain: str, policy_id: str | None) -> None:
        """An operator removed a cached policy (`sts-relay policy forget`)."""
        self._emit("policy_forgotten", "warning", {"domain": domain, "policy_id": policy_id})

    # --- the store and operators ---

    def store_error(self, *, error: str) -> None:
        self._emit("store_error", "error", {"error": error})

    def queue_admin(
        self,
        *,
        action: str,
        queue_id: str | None,
        selection: str,
        matched: int,
        count: int,
        operator: str,
        requested_at: str,
    ) -> None:
        """A change made with `sts-relay queue ...`: `selection` as given ("id=...",
        "domain=... state=deferred", "all"), `matched` messages, `count` changed (messages;
        recipients for flush and bounce), by `operator` (the OS user) at `requested_at`."""
        self._emit(
            "queue_admin",
            "info",
            {
                "action": action,
                "queue_id": queue_id,
                "selection": selection,
                "matched": matched,
                "count": count,
                "operator": operator,
                "requested_at": requested_at,
            },
        )
