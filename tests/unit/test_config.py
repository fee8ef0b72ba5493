"""relay.config: defaults, the TOML file, environment overrides, and errors that name the key."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from relay.config import (
    SECTIONS,
    Config,
    ConfigError,
    config_as_dict,
    env_name,
    load_config,
    parse_hostport,
)


def _fqdn() -> str:
    return "relay.example.test"


def load(path: Path | None = None, **env: str) -> Config:
    return load_config(path, env, fqdn=_fqdn)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def test_defaults_without_any_config() -> None:
    cfg = load()
    assert cfg.listen.addresses == ("127.0.0.1:2525",)
    assert cfg.listen.trusted_networks == ("127.0.0.0/8", "::1/128")
    assert cfg.listen.max_message_size == 52_428_800
    assert cfg.listen.max_recipients == 1000
    assert cfg.listen.max_sessions == 100
    assert cfg.listen.command_timeout == 300
    assert cfg.listen.data_timeout == 600
    assert cfg.state.path == str(Path.cwd() / "var")  # made absolute at load
    assert cfg.delivery.hostname == "relay.example.test"
    assert cfg.listen.hostname == "relay.example.test"
    assert cfg.delivery.port == 25
    assert cfg.delivery.concurrency == 40
    assert cfg.delivery.max_connections_per_host == 20
    assert cfg.delivery.allow_loopback_mx is False
    assert cfg.queue.retry_schedule == (300.0, 600.0, 1200.0, 2400.0, 3600.0, 7200.0, 14400.0)
    assert cfg.queue.lifetime == 432_000
    assert cfg.tls.ca_file is None
    assert cfg.dns.nameservers == ()
    assert cfg.dns.timeout == 5.0
    assert cfg.policy.https_port == 443
    assert cfg.policy.fetch_deadline == 20.0
    assert cfg.policy.failure_backoff == 300.0
    assert cfg.log.format == "json"
    assert cfg.log.level == "info"
    assert cfg.metrics.address == "127.0.0.1:9025"


def test_retry_defaults_follow_rfc5321() -> None:
    # SMTP-08: give up after 4-5 days at least; a growing schedule.
    cfg = load()
    assert cfg.queue.lifetime >= 4 * 86400
    schedule = cfg.queue.retry_schedule
    assert list(schedule) == sorted(schedule)
    assert schedule[0] < schedule[-1]


def test_file_values(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    path = write(
        tmp_path,
        f"""
[listen]
addresses = ["0.0.0.0:25", "[::]:587"]
trusted_networks = ["10.0.0.0/8", "192.168.1.7/24"]
hostname = "mx.out.test"
max_recipients = 5

[delivery]
hostname = "relay.out.test"
port = 2526
allow_loopback_mx = true

[queue]
retry_schedule = [2, 4.5]
lifetime = 60

[tls]
ca_file = "{ca}"

[dns]
nameservers = ["127.0.0.1:5353", "::1", "[::1]:53", "192.0.2.1"]
timeout = 1.5

[log]
format = "text"
level = "debug"

[metrics]
address = ""
""",
    )
    cfg = load(path)
    assert cfg.listen.addresses == ("0.0.0.0:25", "[::]:587")
    assert cfg.listen.trusted_networks == ("10.0.0.0/8", "192.168.1.0/24")
    assert cfg.listen.hostname == "mx.out.test"
    assert cfg.listen.max_recipients == 5
    assert cfg.delivery.hostname == "relay.out.test"
    assert cfg.delivery.port == 2526
    assert cfg.delivery.allow_loopback_mx is True
    assert cfg.queue.retry_schedule == (2.0, 4.5)
    assert cfg.queue.lifetime == 60
    assert cfg.tls.ca_file == str(ca)
    assert cfg.dns.nameservers == ("127.0.0.1:5353", "[::1]:53", "[::1]:53", "192.0.2.1:53")
    assert cfg.dns.timeout == 1.5
    assert cfg.log.format == "text"
    assert cfg.log.level == "debug"
    assert cfg.metrics.address == ""


def test_listen_hostname_defaults_to_delivery_hostname(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, '[delivery]\nhostname = "out.relay.test"\n'))
    assert cfg.listen.hostname == "out.relay.test"


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[delivery]\nport = 2526\n[listen]\nmax_sessions = 3\n")
    cfg = load(
        path,
        STS_RELAY_DELIVERY_PORT="2600",
        STS_RELAY_LISTEN_ADDRESSES="127.0.0.1:0, [::1]:0",
        STS_RELAY_LISTEN_TRUSTED_NETWORKS="",
        STS_RELAY_QUEUE_RETRY_SCHEDULE="1,2,3",
        STS_RELAY_DELIVERY_ALLOW_LOOPBACK_MX="yes",
        STS_RELAY_DNS_TIMEOUT="0.5",
        STS_RELAY_TLS_CA_FILE="",
    )
    assert cfg.delivery.port == 2600
    assert cfg.listen.max_sessions == 3  # from the file, not overridden
    assert cfg.listen.addresses == ("127.0.0.1:0", "[::1]:0")
    assert cfg.listen.trusted_networks == ()
    assert cfg.queue.retry_schedule == (1.0, 2.0, 3.0)
    assert cfg.delivery.allow_loopback_mx is True
    assert cfg.dns.timeout == 0.5
    assert cfg.tls.ca_file is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), ("no", False)],
)
def test_environment_booleans(text: str, expected: bool) -> None:
    assert load(STS_RELAY_DELIVERY_ALLOW_LOOPBACK_MX=text).delivery.allow_loopback_mx is expected


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[state]\npath = '/srv/relay'\n")
    assert load(None, STS_RELAY_CONFIG=str(path)).state.path == "/srv/relay"


def test_every_key_has_an_environment_variable() -> None:
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert env_name(section, f.name) == f"STS_RELAY_{section}_{f.name}".upper()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[listen]\naddresses = ["x"]', 'listen.addresses: expected "host:port", got "x"'),
        ('[listen]\naddresses = ["h:99999"]', 'listen.addresses: expected "host:port", got'),
        ("[listen]\naddresses = []", "listen.addresses: expected a non-empty list"),
        ("[listen]\naddresses = 5", "listen.addresses: expected a list, got 5"),
        ('[listen]\ntrusted_networks = ["10.0.0.300/8"]', "listen.trusted_networks: expected"),
        ("[listen]\nmax_message_size = 0", "listen.max_message_size: expected an integer"),
        (
            '[listen]\nmax_recipients = "ten"',
            'listen.max_recipients: expected an integer >= 1, got "ten"',
        ),
        ("[listen]\nmax_sessions = true", "listen.max_sessions: expected an integer"),
        ("[listen]\ncommand_timeout = -1", "listen.command_timeout: expected a positive number"),
        (
            '[listen]\nhostname = "bad host"',
            'listen.hostname: expected a host name, got "bad host"',
        ),
        ("[delivery]\nport = 0", "delivery.port: expected an integer from 1 to 65535, got 0"),
        (
            '[delivery]\nallow_loopback_mx = "maybe"',
            "delivery.allow_loopback_mx: expected true or false",
        ),
        ("[queue]\nretry_schedule = []", "queue.retry_schedule: expected a non-empty list"),
        (
            "[queue]\nretry_schedule = [60, 0]",
            "queue.retry_schedule: expected a positive number of seconds, got 0",
        ),
        ("[queue]\nlifetime = 0", "queue.lifetime: expected a positive number of seconds"),
        ('[tls]\nca_file = "/nonexistent/ca.pem"', "tls.ca_file: expected a readable PEM file"),
        ('[dns]\nnameservers = ["ns.example.test"]', "dns.nameservers: expected"),
        ('[state]\npath = ""', "state.path: expected a non-empty string"),
        ('[log]\nformat = "xml"', 'log.format: expected "json" or "text", got "xml"'),
        ('[log]\nlevel = "loud"', "log.level: expected"),
        ('[metrics]\naddress = "9025"', 'metrics.address: expected "host:port" or ""'),
        ("[listen]\nport = 25", "listen.port: unknown key"),
        ("[smtpd]\nport = 25", "smtpd: unknown section"),
        ("listen = 5", "listen: expected a table"),
    ],
)
def test_file_errors_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, toml))
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"STS_RELAY_DELIVERY_PORT": "25a"},
            "delivery.port (from STS_RELAY_DELIVERY_PORT): expected an integer"
            ' from 1 to 65535, got "25a"',
        ),
        (
            {"STS_RELAY_DELIVERY_PORT": "+25"},
            "delivery.port (from STS_RELAY_DELIVERY_PORT): expected",
        ),
        (
            {"STS_RELAY_LISTEN_ADDRESSES": "127.0.0.1:25,x"},
            'listen.addresses (from STS_RELAY_LISTEN_ADDRESSES): expected "host:port", got "x"',
        ),
        ({"STS_RELAY_DNS_TIMEOUT": "nan"}, "dns.timeout (from STS_RELAY_DNS_TIMEOUT): expected"),
        (
            {"STS_RELAY_LISTEN_ADRESSES": "127.0.0.1:25"},
            "STS_RELAY_LISTEN_ADRESSES: unknown setting",
        ),
    ],
)
def test_environment_errors_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(None, **env)
    assert str(info.value).startswith(message)


def test_unreadable_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load(write(tmp_path, "[listen\n"))


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("127.0.0.1:25", None, ("127.0.0.1", 25)),
        ("[::1]:2525", None, ("::1", 2525)),
        ("localhost:0", None, ("localhost", 0)),
        ("10.0.0.1", 53, ("10.0.0.1", 53)),
        ("::1", 53, ("::1", 53)),
        ("[::1]", 53, ("::1", 53)),
    ],
)
def test_parse_hostport(text: str, default: int | None, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, default_port=default) == expected


@pytest.mark.parametrize(
    "text", ["x", ":25", "host:", "host:65536", "host:2x", "[::1", "[nothost]:25", "::1", "h:+5"]
)
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_hostport(text)


def test_config_as_dict_is_json_and_complete() -> None:
    settings = config_as_dict(load())
    assert set(settings) == set(SECTIONS)
    for section, cls in SECTIONS.items():
        assert set(settings[section]) == {f.name for f in fields(cls)}
    assert settings["listen"]["addresses"] == ["127.0.0.1:2525"]
    assert settings["queue"]["retry_schedule"] == [300, 600, 1200, 2400, 3600, 7200, 14400]
    assert settings["tls"]["ca_file"] is None
    assert json.loads(json.dumps(settings)) == settings
