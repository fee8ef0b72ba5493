"""`dns.dnssec` (relay/delivery/dnssec.py): whose AD bit the relay believes (RFC 7672 §2.1,
DANE-01: never from a resolver across the network unless the operator says so)."""

from __future__ import annotations

import pytest

from relay.config import ConfigError, load_config
from relay.delivery.dnssec import DnssecMode, dnssec_setting


@pytest.mark.parametrize(
    ("mode", "servers", "trusted", "warned"),
    [
        ("auto", ["127.0.0.1:53"], True, False),
        ("auto", ["127.0.0.53", "[::1]:5353"], True, False),
        ("auto", ["127.0.0.1", "192.0.2.1"], False, False),  # one remote: not believed
        ("auto", [], False, False),
        ("on", ["192.0.2.1:53"], True, True),  # allowed, warned at start
        ("on", ["127.0.0.1"], True, False),
        ("off", ["127.0.0.1"], False, False),
    ],
)
def test_which_ad_bit_is_believed(
    mode: str, servers: list[str], trusted: bool, warned: bool
) -> None:
    setting = dnssec_setting(mode, servers)
    assert setting.mode is DnssecMode(mode)
    assert setting.trusted is trusted
    assert (setting.warning is not None) is warned
    assert setting.summary.startswith(f"{mode}: DANE {'on' if trusted else 'off'} (")


def test_default_is_auto_and_the_key_is_checked() -> None:
    assert load_config(None, {}).dns.dnssec == "auto"
    assert load_config(None, {"STS_RELAY_DNS_DNSSEC": "ON"}).dns.dnssec == "on"
    with pytest.raises(ConfigError, match=r"dns\.dnssec"):
        load_config(None, {"STS_RELAY_DNS_DNSSEC": "maybe"})
