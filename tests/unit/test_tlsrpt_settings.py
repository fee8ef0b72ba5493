"""The `tlsrpt.*` configuration keys and the reporting settings computed from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import ConfigError, load_config
from relay.reporting import report_settings


def _settings(environ: dict[str, str]) -> object:
    return report_settings(load_config(None, environ, fqdn=lambda: "relay.example"))


def test_defaults_follow_the_delivery_hostname() -> None:
    s = report_settings(load_config(None, {}, fqdn=lambda: "Relay.Example"))
    assert s.enabled is True
    assert s.submitter == "relay.example"
    assert s.organization == "relay.example"
    assert s.contact == "tlsrpt-noreply@relay.example"
    assert s.sender == "tlsrpt-noreply@relay.example"
    assert s.send_delay == 14400
    assert s.dkim is None


def test_contact_address_sets_the_submitter_and_sender() -> None:
    s = report_settings(
        load_config(None, {"STS_RELAY_TLSRPT_CONTACT_INFO": "tls@mail.example"}, fqdn=lambda: "h")
    )
    assert (s.submitter, s.contact, s.sender) == (
        "mail.example",
        "tls@mail.example",
        "tls@mail.example",
    )


def test_contact_at_another_domain_than_the_submitter_is_refused() -> None:
    # RFC 8460 §5.3: TLS-Report-Submitter MUST be the domain of contact-info.
    env = {
        "STS_RELAY_TLSRPT_CONTACT_INFO": "tls@a.example",
        "STS_RELAY_TLSRPT_SUBMITTER": "b.example",
    }
    with pytest.raises(ConfigError, match=r"tlsrpt\.contact_info"):
        _settings(env)


def test_dkim_key_needs_a_selector_and_must_sign(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match=r"tlsrpt\.dkim_selector"):
        load_config(None, {"STS_RELAY_TLSRPT_DKIM_KEY_FILE": str(key)})
    env = {"STS_RELAY_TLSRPT_DKIM_KEY_FILE": str(key), "STS_RELAY_TLSRPT_DKIM_SELECTOR": "s1"}
    with pytest.raises(ConfigError, match=r"tlsrpt\.dkim_key_file"):
        _settings(env)


def test_reporting_can_be_turned_off() -> None:
    s = report_settings(load_config(None, {"STS_RELAY_TLSRPT_ENABLED": "false"}))
    assert s.enabled is False
