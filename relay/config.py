"""The relay's configuration: one TOML file, overridable key by key from the environment.

Owns the schema (one frozen dataclass per TOML section, each default written once, here),
parsing and validation, and the error messages that name the offending key. Knows nothing
of what the values are used for: `relay/app.py` alone turns a `Config` into objects.

Environment overrides: `STS_RELAY_<SECTION>_<KEY>` (upper case) replaces the file's value;
lists are comma-separated, booleans are true/false/1/0/yes/no. `STS_RELAY_CONFIG` names
the file when no path is given.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ENV_PREFIX = "STS_RELAY_"
ENV_CONFIG = "STS_RELAY_CONFIG"

Parser = Callable[[object], Any]


class ConfigError(Exception):
    """A configuration mistake; the message names the key (`listen.addresses: ...`)."""


class _Invalid(Exception):
    """Raised by a value parser; the loader adds the key to make a ConfigError."""

    def __init__(self, expected: str, got: object = None) -> None:
        super().__init__(expected)
        self.expected = expected
        self.got = got


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
            raise _Invalid(expected)
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


def _tls_override(raw: object) -> str:
    """ "domain=action[ match=patterns]": one operator override of one domain's TLS decision.

    `require-verified` must name the MX hosts it trusts (`match=mx.example.com:*.example.net`,
    MTA-STS pattern syntax, like Postfix's `secure match=`): names read from unsigned DNS
    would let whoever spoofs DNS choose them.
    """
    if not isinstance(raw, str):
        raise _Invalid(_OVERRIDE_FORMS)
    domain, sep, rest = raw.strip().partition("=")
    domain = domain.strip().lower().removesuffix(".")
    action, _, options = rest.strip().lower().partition(" ")
    if not sep or not _HOSTNAME.fullmatch(domain) or action not in TLS_OVERRIDE_ACTIONS:
        raise _Invalid(_OVERRIDE_FORMS, raw)
    option = options.strip()
    if action == "opportunistic":
        if option:
            raise _Invalid(f"nothing after opportunistic ({_OVERRIDE_FORMS})", raw)
        return f"{domain}={action}"
    name, eq, value = option.partition("=")
    patterns = [p.strip().removesuffix(".") for p in value.split(":") if p.strip()]
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
                raise _Invalid(exc.expected, one) from None
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


def _hostport(raw: object) -> str:
    if isinstance(raw, str):
        try:
            return format_hostport(*parse_hostport(raw))
        except ValueError:
            pass
    raise _Invalid('"host:port"')


def _optional_hostport(raw: object) -> str:
    if isinstance(raw, str) and raw.strip() == "":
        return ""
    try:
        return _hostport(raw)
    except _Invalid:
        raise _Invalid('"host:port" or ""') from None


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
    max_sessions_per_client: int = _key(20, _int(1))
    max_errors: int = _key(10, _int(1))


@dataclass(frozen=True, slots=True)
class StateConfig:
    path: str = _key("./var", _text)


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    hostname: str = _key("", _hostname)  # "" = the machine's FQDN
    port: int = _key(25, _int(1, 65535))
    concurrency: int = _key(20, _int(1))
    connect_timeout: float = _key(30, _seconds)
    command_timeout: float = _key(300, _seconds)
    allow_loopback_mx: bool = _key(False, _bool)
    # Connection reuse (issue 4): transactions per connection (1 = no reuse), and open
    # connections per MX address; delivery.concurrency bounds them in total.
    max_messages_per_connection: int = _key(100, _int(1))
    max_connections_per_host: int = _key(10, _int(1))
    # SIGTERM: seconds for deliveries in flight to finish; the rest stays queued.
    shutdown_grace: float = _key(30, _seconds)
    # One attempt of one (message, domain) is cut off (deferred) after attempt_deadline;
    # its lease, which keeps every other worker and process off that work, lasts
    # lease_time, longer than the deadline by the time recording the result may take.
    attempt_deadline: float = _key(900, _seconds)
    lease_time: float = _key(1200, _seconds)


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


@dataclass(frozen=True, slots=True)
class DnsConfig:
    nameservers: tuple[str, ...] = _key((), _list(_nameserver))  # () = system resolver
    timeout: float = _key(5.0, _seconds)


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
class Config:
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
    known.add(ENV_CONFIG)
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
        raise ConfigError(f"{where}: expected {exc.expected}, got {_show(got)}") from None


def _build_section(name: str, table: Mapping[str, Any], environ: Mapping[str, str]) -> Any:
    cls = SECTIONS[name]
    values: dict[str, Any] = {}
    for f in fields(cls):
        var = env_name(name, f.name)
        if var in environ:
            raw: object = environ[var]
            where = f"{name}.{f.name} (from {var})"
        elif f.name in table:
            raw, where = table[f.name], f"{name}.{f.name}"
        else:
            continue
        values[f.name] = _parse_value(f.metadata["parse"], raw, where)
    return cls(**values)


def _check_listener_tls(cfg: Config) -> None:
    if (cfg.tls.cert_file is None) != (cfg.tls.key_file is None):
        raise ConfigError("tls.cert_file and tls.key_file: set both or neither")
    if cfg.listen.tls_addresses and cfg.tls.cert_file is None:
        raise ConfigError("listen.tls_addresses: needs tls.cert_file and tls.key_file")


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
) -> Config:
    """Defaults, then the TOML file (`path`, else $STS_RELAY_CONFIG), then the environment.

    Raises ConfigError naming the key for any unknown or invalid setting.
    """
    if path is None or str(path) == "":
        path = environ.get(ENV_CONFIG) or None
    doc = _read_toml(Path(path)) if path is not None else {}
    _check_file_keys(doc)
    _check_env_keys(environ)
    sections = {name: _build_section(name, doc.get(name, {}), environ) for name in SECTIONS}
    cfg = Config(**sections)
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
        listen=replace(cfg.listen, hostname=cfg.listen.hostname or delivery_host),
    )


def config_as_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The effective configuration as JSON-ready values, section by section."""
    out: dict[str, dict[str, Any]] = {}
    for name, section in asdict(cfg).items():
        out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
    return out
