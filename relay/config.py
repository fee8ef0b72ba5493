"""The relay's configuration: one TOML file, overridable key by key from the environment.

Owns the schema (one frozen dataclass per TOML section, each default written once, here),
parsing and validation, and the error messages that name the offending key. Knows nothing
of what the values are used for: `relay/app.py` alone turns a `Config` into objects.

Precedence, lowest first: the defaults written here; a defaults file named by
`STS_RELAY_DEFAULTS` (the Docker image ships one: its container defaults must never win over
the operator's file); the TOML file (`--config`, else `STS_RELAY_CONFIG`); the environment,
`STS_RELAY_<SECTION>_<KEY>` (upper case; lists are comma-separated, booleans are
true/false/1/0/yes/no).

`state.path` comes out absolute: a relative path is taken from the directory of the file
that set it, else from the working directory, so every command finds the same store.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import socket
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import dns.exception
import dns.name

ENV_PREFIX = "STS_RELAY_"
ENV_CONFIG = "STS_RELAY_CONFIG"
ENV_DEFAULTS = "STS_RELAY_DEFAULTS"  # a TOML file of defaults, below the operator's file

Parser = Callable[[object], Any]


class ConfigError(Exception):
    """A configuration mistake; the message names the key (`listen.addresses: ...`)."""


class _Invalid(Exception):
    """Raised by a value parser; the loader adds the key to make a ConfigError."""

    def __init__(self, expected: str, got: object = None, note: str | None = None) -> None:
        super().__init__(expected)
        self.expected = expected
        self.got = got
        self.note = note  # what exactly is wrong, when "expected ..." alone would not say


def _key(default: Any, parse: Parser) -> Any:
    return field(default=default, metadata={"parse": parse})


# --- value parsers (raw is a TOML value, or a string from the environment) ---


def _int(lo: int, hi: int | None = None) -> Parser:
    expected = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"

    def parse(raw: object) -> int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str) and re.fullmatch(r"[0-9]{1,19}", raw.strip()):
            # int() alone would take "+5", "5_000" and non-ASCII digits (RFC-CHECKLIST §11).
            value = int(raw.strip())
        else:
            raise _Invalid(expected)
        if value < lo or (hi is not None and value > hi):
            raise _Invalid(expected, None, f"{value} is out of range")
        return value

    return parse


def _seconds(raw: object) -> float:
    """A positive duration in seconds; an integer stays an integer (for display)."""
    expected = "a positive number of seconds"
    value: float
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, str) and re.fullmatch(r"[0-9]{1,15}", raw.strip()):
        value = int(raw.strip())
    elif isinstance(raw, str) and re.fullmatch(r"[0-9]{0,15}\.[0-9]{1,15}", raw.strip()):
        value = float(raw.strip())
    else:
        raise _Invalid(expected)
    if not math.isfinite(value) or value <= 0:
        raise _Invalid(expected)
    return value


def _seconds_or_zero(raw: object) -> float:
    """A duration in seconds where 0 means "off"."""
    if (isinstance(raw, int) and not isinstance(raw, bool) and raw == 0) or (
        isinstance(raw, str) and raw.strip() == "0"
    ):
        return 0
    try:
        return _seconds(raw)
    except _Invalid:
        raise _Invalid("a number of seconds (0 = off)") from None


def _bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        word = raw.strip().lower()
        if word in ("true", "1", "yes"):
            return True
        if word in ("false", "0", "no"):
            return False
    raise _Invalid("true or false")


def _choice(*options: str) -> Parser:
    def parse(raw: object) -> str:
        if isinstance(raw, str) and raw.strip().lower() in options:
            return raw.strip().lower()
        raise _Invalid(" or ".join(f'"{o}"' for o in options))

    return parse


_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _hostname(raw: object) -> str:
    """A DNS host name, or "" for the computed default."""
    if isinstance(raw, str) and (raw == "" or _HOSTNAME.fullmatch(raw)):
        return raw
    raise _Invalid("a host name")


def _text(raw: object) -> str:
    if isinstance(raw, str) and raw.strip():
        return raw.strip()
    raise _Invalid("a non-empty string")


def _optional_text(raw: object) -> str:
    if isinstance(raw, str):
        return raw.strip()
    raise _Invalid("a string")


def _ca_file(raw: object) -> str | None:
    if not isinstance(raw, str):
        raise _Invalid("a file path")
    if raw == "":
        return None
    if not (os.path.isfile(raw) and os.access(raw, os.R_OK)):
        raise _Invalid("a readable PEM file")
    return raw


TLS_OVERRIDE_ACTIONS = ("require-verified", "opportunistic")
_OVERRIDE_FORMS = (
    '"domain=opportunistic" or "domain=require-verified match=MX-PATTERN[:MX-PATTERN...]"'
)


def a_label(name: str) -> str:
    """`name` in lower-case A-labels without a final dot ("Bücher.example." ->
    "xn--bcher-kva.example"): IDNA 2008 with the UTS #46 mapping (dnspython's default when
    the `idna` package is installed, as httpx requires; IDNA 2003 otherwise). An ASCII name
    is only lower-cased. Raises ValueError for a name that has no A-label form."""
    text = name.strip().removesuffix(".")
    if text.isascii():
        return text.lower()
    try:
        return dns.name.from_text(text).to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError):
        raise ValueError(f"{name!r} has no IDNA A-label form") from None


def _a_label_or_raw(name: str) -> str:
    try:
        return a_label(name)
    except ValueError:
        return name  # refused below, with the entry named


def _tls_override(raw: object) -> str:
    """ "domain=action[ match=patterns]": one operator override of one domain's TLS decision.

    `require-verified` must name the MX hosts it trusts (`match=mx.example.com:*.example.net`,
    MTA-STS pattern syntax, like Postfix's `secure match=`): names read from unsigned DNS
    would let whoever spoofs DNS choose them. Domains and patterns may be written as
    U-labels (`bücher.example`); they are kept as A-labels, the form DNS and mail use.
    """
    if not isinstance(raw, str):
        raise _Invalid(_OVERRIDE_FORMS)
    domain, sep, rest = raw.strip().partition("=")
    domain = _a_label_or_raw(domain)
    action, _, options = rest.strip().lower().partition(" ")
    if not sep or not _HOSTNAME.fullmatch(domain) or action not in TLS_OVERRIDE_ACTIONS:
        raise _Invalid(_OVERRIDE_FORMS, raw)
    option = options.strip()
    if action == "opportunistic":
        if option:
            raise _Invalid(f"nothing after opportunistic ({_OVERRIDE_FORMS})", raw)
        return f"{domain}={action}"
    name, eq, value = option.partition("=")
    patterns = [_a_label_or_raw(p) for p in value.split(":") if p.strip()]
    if name.strip() != "match" or not eq or not patterns:
        raise _Invalid(
            f"require-verified with its MX patterns, e.g. {domain}=require-verified"
            f" match=mx.{domain}:*.{domain} (unsigned DNS must not choose the names)",
            raw,
        )
    for pattern in patterns:
        if not _HOSTNAME.fullmatch(pattern.removeprefix("*.")):
            raise _Invalid(f"MX patterns like mx.{domain} or *.{domain}", pattern)
    return f"{domain}={action} match={':'.join(dict.fromkeys(patterns))}"


def _list(item: Parser, *, nonempty: bool = False) -> Parser:
    def parse(raw: object) -> tuple[Any, ...]:
        if isinstance(raw, str):
            items: list[object] = [p.strip() for p in raw.split(",") if p.strip()]
        elif isinstance(raw, list):
            items = list(raw)
        else:
            raise _Invalid("a list")
        if nonempty and not items:
            raise _Invalid("a non-empty list")
        out = []
        for one in items:
            try:
                out.append(item(one))
            except _Invalid as exc:
                raise _Invalid(exc.expected, one, exc.note) from None
        return tuple(out)

    return parse


def parse_hostport(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Split "host:port", "[v6]:port" (or "host", "[v6]", bare IPv6 with a default port).

    Raises ValueError when the text is not of that form or the port is not 0-65535.
    """
    text = text.strip()
    port_text: str | None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {text!r}")
        port_text = rest[1:] if rest else None
        ipaddress.IPv6Address(host)  # brackets are for IPv6 literals only
    elif text.count(":") > 1:
        # A bare IPv6 literal; it cannot carry a port without brackets.
        host, port_text = text, None
        ipaddress.IPv6Address(host)
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
    if not host:
        raise ValueError(f"no host in {text!r}")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"no port in {text!r}")
        return host, default_port
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or int(port_text) > 65535:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port_text)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port_note(text: str) -> str | None:
    """The note for a "host:port" text whose port is too large, else None."""
    port = text.strip().rpartition(":")[2]
    if port.isascii() and port.isdigit() and int(port) > 65535:
        return f"port {int(port)} is out of range: 0 to 65535"
    return None


def _hostport(raw: object) -> str:
    if isinstance(raw, str):
        try:
            return format_hostport(*parse_hostport(raw))
        except ValueError:
            raise _Invalid('"host:port"', raw, _port_note(raw)) from None
    raise _Invalid('"host:port"')


def _optional_hostport(raw: object) -> str:
    if isinstance(raw, str) and raw.strip() == "":
        return ""
    try:
        return _hostport(raw)
    except _Invalid as exc:
        raise _Invalid('"host:port" or ""', exc.got, exc.note) from None


def redact_url(url: str) -> str:
    """`url` with its password, if any, replaced by "***" (for errors and displays)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def _state_url(raw: object) -> str:
    expected = 'a "postgresql://user:password@host:port/database" URL, or "" for SQLite'
    if not isinstance(raw, str):
        raise _Invalid(expected)
    url = raw.strip()
    if url == "":
        return ""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise _Invalid(expected, redact_url(url), str(exc)) from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise _Invalid(expected, redact_url(url), f"scheme {parts.scheme or 'missing'!r}")
    if not parts.path.strip("/"):
        raise _Invalid(expected, redact_url(url), "no database name")
    return url


def _network(raw: object) -> str:
    if isinstance(raw, str):
        try:
            return str(ipaddress.ip_network(raw.strip(), strict=False))
        except ValueError:
            pass
    raise _Invalid("an IP network (CIDR)")


def _nameserver(raw: object) -> str:
    expected = '"ip" or "ip:port" (IPv6 as "[::1]:53")'
    if isinstance(raw, str):
        try:
            host, port = parse_hostport(raw, default_port=53)
            ipaddress.ip_address(host)
        except ValueError:
            raise _Invalid(expected) from None
        return format_hostport(host, port)
    raise _Invalid(expected)


# --- the schema: one frozen dataclass per TOML section ---


@dataclass(frozen=True, slots=True)
class ListenConfig:
    addresses: tuple[str, ...] = _key(("127.0.0.1:2525",), _list(_hostport, nonempty=True))
    trusted_networks: tuple[str, ...] = _key(("127.0.0.0/8", "::1/128"), _list(_network))
    hostname: str = _key("", _hostname)  # "" = delivery.hostname
    max_message_size: int = _key(52_428_800, _int(1))
    max_recipients: int = _key(1000, _int(1))
    max_sessions: int = _key(100, _int(1))
    command_timeout: float = _key(300, _seconds)
    data_timeout: float = _key(600, _seconds)
    tls_addresses: tuple[str, ...] = _key((), _list(_hostport))  # implicit TLS (port 465)
    max_sessions_per_client: int = _key(50, _int(1))  # as Postfix's default
    max_errors: int = _key(10, _int(1))
    # Issue 11: bytes of DATA held in memory by all sessions together (0 = 4 times
    # max_message_size); past it a new DATA gets 451 4.3.1.
    max_data_in_flight: int = _key(0, _int(0))
    # Session slots kept for trusted networks: an untrusted client is admitted only while
    # more than this many are free. Untrusted sessions that have not authenticated end after
    # untrusted_session_timeout; every session after max_session_time.
    reserved_sessions: int = _key(20, _int(0))
    untrusted_session_timeout: float = _key(30, _seconds)
    max_session_time: float = _key(3600, _seconds)


@dataclass(frozen=True, slots=True)
class StateConfig:
    path: str = _key("./var", _text)
    # "" = the embedded SQLite store under `path`; postgresql://... = queue, policy cache,
    # TLS-report and posture figures shared by every node on that database.
    url: str = _key("", _state_url)


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    hostname: str = _key("", _hostname)  # "" = the machine's FQDN
    port: int = _key(25, _int(1, 65535))
    # 40 in flight and 20 connections per MX address: Postfix's default destination
    # concurrency is 20; measured in the lab, 20/10 left deliveries waiting on connections.
    concurrency: int = _key(40, _int(1))
    connect_timeout: float = _key(30, _seconds)
    command_timeout: float = _key(300, _seconds)
    allow_loopback_mx: bool = _key(False, _bool)
    # Connection reuse (issue 4): transactions per connection (1 = no reuse), and open
    # connections per MX address; delivery.concurrency bounds them in total.
    max_messages_per_connection: int = _key(100, _int(1))
    max_connections_per_host: int = _key(20, _int(1))
    # SIGTERM: seconds for deliveries in flight to finish; the rest stays queued.
    shutdown_grace: float = _key(30, _seconds)
    # One attempt of one (message, domain) is cut off (deferred) after attempt_deadline;
    # its lease, which keeps every other worker and process off that work, lasts
    # lease_time, longer than the deadline by the time recording the result may take.
    attempt_deadline: float = _key(900, _seconds)
    lease_time: float = _key(1200, _seconds)
    # Seconds a domain whose every MX address failed before any SMTP reply (refused,
    # timed out, unreachable) is held: its mail is deferred without being tried
    # (relay/delivery/holds.py); never longer than the first queue.retry_schedule step.
    unreachable_hold: float = _key(60, _seconds_or_zero)


@dataclass(frozen=True, slots=True)
class QueueConfig:
    # RFC 5321 §4.5.4.1: retries configurable, growing; give up after 4-5 days.
    retry_schedule: tuple[float, ...] = _key(
        (300, 600, 1200, 2400, 3600, 7200, 14400), _list(_seconds, nonempty=True)
    )
    lifetime: float = _key(432_000, _seconds)
    # RFC 3461 §4.1: a "delayed" DSN once a recipient has waited this long; 0 disables.
    delay_notice_after: float = _key(14_400, _seconds_or_zero)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca_file: str | None = _key(None, _ca_file)
    # The listener's own certificate and key (PEM); STARTTLS and AUTH need them.
    cert_file: str | None = _key(None, _ca_file)
    key_file: str | None = _key(None, _ca_file)
    # Per-domain TLS overrides: "domain=opportunistic" or
    # "domain=require-verified match=mx.domain:*.domain" (relay/delivery/overrides.py).
    overrides: tuple[str, ...] = _key((), _list(_tls_override))


@dataclass(frozen=True, slots=True)
class AuthConfig:
    users_file: str = _key("", _optional_text)  # "" = <state.path>/users
    required: bool = _key(False, _bool)
    max_failures: int = _key(5, _int(1))  # failed logins per client address ...
    failure_window: float = _key(300, _seconds)  # ... within this many seconds
    max_failures_per_user: int = _key(20, _int(1))  # ... and per user name
    # Password hashing (scrypt) runs on threads of its own, never asyncio's default pool
    # (the store's and the policy cache's); checks beyond threads + queue get 454 4.7.0.
    hash_threads: int = _key(2, _int(1, 64))
    hash_queue: int = _key(16, _int(0))


@dataclass(frozen=True, slots=True)
class DnsConfig:
    nameservers: tuple[str, ...] = _key((), _list(_nameserver))  # () = system resolver
    timeout: float = _key(5.0, _seconds)
    # Seconds an answer stays in the in-process DNS cache at most, whatever its TTL
    # (relay/delivery/dns_cache.py): a spoofed TTL of 2^31-1 must not live for ever.
    max_ttl: float = _key(3600, _seconds)
    # Whose DNSSEC AD bit is believed, and so whether DANE (RFC 7672) applies: "auto" only
    # from nameservers that are all on loopback, "on" from any (warned), "off" never
    # (relay/delivery/dnssec.py).
    dnssec: str = _key("auto", _choice("off", "auto", "on"))


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    https_port: int = _key(443, _int(1, 65535))
    fetch_deadline: float = _key(20.0, _seconds)
    failure_backoff: float = _key(300.0, _seconds)
    # How often cached policies are looked at for a proactive refresh (RFC 8461 §3.3);
    # each is refetched once, at a random point between 50% and 75% of its max_age.
    refresh_interval: float = _key(60.0, _seconds)


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = _key("json", _choice("json", "text"))
    level: str = _key("info", _choice("debug", "info", "warning", "error"))


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    address: str = _key("127.0.0.1:9025", _optional_hostport)  # "" disables


@dataclass(frozen=True, slots=True)
class TlsRptConfig:
    """RFC 8460 reports; "" values are computed from `submitter` (see relay/reporting.py)."""

    enabled: bool = _key(True, _bool)
    submitter: str = _key("", _hostname)  # "" = delivery.hostname
    organization_name: str = _key("", _optional_text)  # "" = submitter
    contact_info: str = _key("", _optional_text)  # "" = tlsrpt-noreply@<submitter>
    send_delay: float = _key(14400, _seconds)  # random delay after 00:00 UTC, at most this
    dkim_key_file: str | None = _key(None, _ca_file)  # PEM RSA key (PKCS#1)
    dkim_selector: str = _key("", _optional_text)
    dkim_domain: str = _key("", _hostname)  # "" = submitter


@dataclass(frozen=True, slots=True)
class ServeConfig:
    # How many processes share the listening sockets and the queue (relay/processes/):
    # 0 = one per CPU the relay may run on; 1 = today's single process.
    processes: int = _key(0, _int(0, 256))
    # uvloop (libuv) costs less CPU per connection than the standard library's loop;
    # "asyncio" is there to rule the loop out when chasing a problem.
    event_loop: str = _key("uvloop", _choice("uvloop", "asyncio"))


@dataclass(frozen=True, slots=True)
class Config:
    serve: ServeConfig = field(default_factory=ServeConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    state: StateConfig = field(default_factory=StateConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tlsrpt: TlsRptConfig = field(default_factory=TlsRptConfig)


SECTIONS: dict[str, type[Any]] = {
    "serve": ServeConfig,
    "listen": ListenConfig,
    "state": StateConfig,
    "delivery": DeliveryConfig,
    "queue": QueueConfig,
    "tls": TlsConfig,
    "auth": AuthConfig,
    "dns": DnsConfig,
    "policy": PolicyConfig,
    "log": LogConfig,
    "metrics": MetricsConfig,
    "tlsrpt": TlsRptConfig,
}


def env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}_{key.upper()}"


# --- loading ---


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _check_file_keys(doc: Mapping[str, Any]) -> None:
    for section, table in doc.items():
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table ([{section}])")
        known = {f.name for f in fields(SECTIONS[section])}
        for key in table:
            if key not in known:
                raise ConfigError(f"{section}.{key}: unknown key")


def _check_env_keys(environ: Mapping[str, str]) -> None:
    known = {env_name(s, f.name) for s, cls in SECTIONS.items() for f in fields(cls)}
    known.update((ENV_CONFIG, ENV_DEFAULTS))
    for name in environ:
        if name.startswith(ENV_PREFIX) and name not in known:
            raise ConfigError(f"{name}: unknown setting (no such section or key)")


def _show(raw: object) -> str:
    return json.dumps(raw, default=str, ensure_ascii=False)


def _parse_value(parse: Parser, raw: object, where: str) -> Any:
    try:
        return parse(raw)
    except _Invalid as exc:
        got = raw if exc.got is None else exc.got
        note = f" ({exc.note})" if exc.note else ""
        raise ConfigError(f"{where}: expected {exc.expected}, got {_show(got)}{note}") from None


# Where an effective value came from (`config check --json`), lowest precedence first.
SOURCE_DEFAULT = "default"
SOURCE_DEFAULTS_FILE = "defaults file"
SOURCE_FILE = "file"
SOURCE_ENVIRONMENT = "environment"


@dataclass(frozen=True, slots=True)
class _Layer:
    """A TOML document and where it came from."""

    doc: Mapping[str, Any]
    path: Path | None
    source: str


def config_file(path: str | Path | None, environ: Mapping[str, str]) -> Path | None:
    """The operator's file: `path`, else $STS_RELAY_CONFIG, else none."""
    if path is None or str(path) == "":
        path = environ.get(ENV_CONFIG) or None
    return None if path is None else Path(path)


def _layers(path: str | Path | None, environ: Mapping[str, str]) -> tuple[_Layer, _Layer]:
    """The defaults file's document and the operator's file's, each checked for unknown keys."""
    layers = []
    for file, source in (
        (environ.get(ENV_DEFAULTS) or None, SOURCE_DEFAULTS_FILE),
        (config_file(path, environ), SOURCE_FILE),
    ):
        doc = _read_toml(Path(file)) if file is not None else {}
        _check_file_keys(doc)
        layers.append(_Layer(doc, None if file is None else Path(file), source))
    return layers[0], layers[1]


def _raw_value(
    section: str, key: str, layers: tuple[_Layer, _Layer], environ: Mapping[str, str]
) -> tuple[object, str, _Layer | None] | None:
    """(raw value, where, the file layer it came from) of the highest layer setting it."""
    var = env_name(section, key)
    if var in environ:
        return environ[var], f"{section}.{key} (from {var})", None
    defaults, file = layers
    if key in file.doc.get(section, {}):
        return file.doc[section][key], f"{section}.{key}", file
    if key in defaults.doc.get(section, {}):
        return defaults.doc[section][key], f"{section}.{key} (from {defaults.path})", defaults
    return None


def _build_section(name: str, layers: tuple[_Layer, _Layer], environ: Mapping[str, str]) -> Any:
    cls = SECTIONS[name]
    values: dict[str, Any] = {}
    for f in fields(cls):
        found = _raw_value(name, f.name, layers, environ)
        if found is not None:
            values[f.name] = _parse_value(f.metadata["parse"], found[0], found[1])
    return cls(**values)


def config_sources(
    path: str | Path | None, environ: Mapping[str, str]
) -> dict[str, dict[str, str]]:
    """Where each key's effective value comes from: "default", "defaults file" (the
    $STS_RELAY_DEFAULTS file), "file" or "environment". Raises ConfigError as load_config."""
    layers = _layers(path, environ)
    out: dict[str, dict[str, str]] = {}
    for name, cls in SECTIONS.items():
        out[name] = {}
        for f in fields(cls):
            found = _raw_value(name, f.name, layers, environ)
            if found is None:
                out[name][f.name] = SOURCE_DEFAULT
            else:
                out[name][f.name] = SOURCE_ENVIRONMENT if found[2] is None else found[2].source
    return out


def _absolute_state_path(
    cfg: Config, layers: tuple[_Layer, _Layer], environ: Mapping[str, str], cwd: str
) -> str:
    """state.path made absolute: relative to the directory of the file that set it, else to
    the working directory (a relative default must not mean a new store per directory)."""
    found = _raw_value("state", "path", layers, environ)
    layer = found[2] if found is not None else None
    base = cwd if layer is None or layer.path is None else os.path.dirname(layer.path)
    return os.path.normpath(os.path.join(os.path.abspath(base), cfg.state.path))


def _check_listener_tls(cfg: Config) -> None:
    if (cfg.tls.cert_file is None) != (cfg.tls.key_file is None):
        raise ConfigError("tls.cert_file and tls.key_file: set both or neither")
    if cfg.listen.tls_addresses and cfg.tls.cert_file is None:
        raise ConfigError("listen.tls_addresses: needs tls.cert_file and tls.key_file")


def _data_in_flight(listen: ListenConfig) -> int:
    """listen.max_data_in_flight, 0 meaning 4 times listen.max_message_size; never below
    one message of the maximum size, or such a message could never be accepted."""
    if listen.max_data_in_flight == 0:
        return 4 * listen.max_message_size
    if listen.max_data_in_flight < listen.max_message_size:
        raise ConfigError(
            f"listen.max_data_in_flight: must be at least listen.max_message_size"
            f" ({listen.max_message_size}), got {listen.max_data_in_flight}"
        )
    return listen.max_data_in_flight


def _check_lease(cfg: Config) -> None:
    deadline, lease = cfg.delivery.attempt_deadline, cfg.delivery.lease_time
    if lease < deadline * 1.1 + 1:
        raise ConfigError(
            f"delivery.lease_time: must exceed delivery.attempt_deadline ({deadline:g} s) by"
            f" a tenth plus 1 s, to record the result before the lease ends; got {lease:g}"
        )


def users_file_path(cfg: Config) -> Path:
    """Where the SMTP AUTH users file is: auth.users_file, else <state.path>/users."""
    return Path(cfg.auth.users_file or Path(cfg.state.path) / "users")


def load_config(
    path: str | Path | None,
    environ: Mapping[str, str],
    *,
    fqdn: Callable[[], str] = socket.getfqdn,
    cwd: Callable[[], str] = os.getcwd,
) -> Config:
    """Defaults, then the $STS_RELAY_DEFAULTS file, then the TOML file (`path`, else
    $STS_RELAY_CONFIG), then the environment. `state.path` comes out absolute.

    Raises ConfigError naming the key for any unknown or invalid setting.
    """
    layers = _layers(path, environ)
    _check_env_keys(environ)
    sections = {name: _build_section(name, layers, environ) for name in SECTIONS}
    cfg = Config(**sections)
    state = _absolute_state_path(cfg, layers, environ, cwd())
    cfg = replace(cfg, state=replace(cfg.state, path=state))
    _check_listener_tls(cfg)
    _check_lease(cfg)
    if cfg.tlsrpt.dkim_key_file is not None and not cfg.tlsrpt.dkim_selector:
        raise ConfigError("tlsrpt.dkim_selector: needed when tlsrpt.dkim_key_file is set")
    # Computed defaults: the EHLO name is the machine's FQDN unless set; the listener
    # greets with the same name unless told otherwise.
    delivery_host = cfg.delivery.hostname or fqdn()
    return replace(
        cfg,
        delivery=replace(cfg.delivery, hostname=delivery_host),
        listen=replace(
            cfg.listen,
            hostname=cfg.listen.hostname or delivery_host,
            max_data_in_flight=_data_in_flight(cfg.listen),
        ),
    )


_LOCAL_SUFFIXES = (".localdomain", ".local", ".localhost", ".internal", ".lan")


def is_fqdn(name: str) -> bool:
    """A name other hosts can look up: dotted, not localhost or a private-use suffix."""
    name = name.lower().removesuffix(".")
    return "." in name and name != "localhost" and not name.endswith(_LOCAL_SUFFIXES)


def config_warnings(cfg: Config) -> list[str]:
    """Settings that load but are likely mistakes (`config check`, the `started` event)."""
    warnings = []
    host = cfg.delivery.hostname
    if not is_fqdn(host):
        warnings.append(
            f"delivery.hostname {host!r} is not a fully qualified domain name (it is the"
            " EHLO name and the Reporting-MTA of bounces; receiving servers may refuse or"
            " distrust it): set delivery.hostname to this relay's public DNS name"
        )
    return warnings


def config_as_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The effective configuration as JSON-ready values, section by section."""
    out: dict[str, dict[str, Any]] = {}
    for name, section in asdict(cfg).items():
        out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
    return out
