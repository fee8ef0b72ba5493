"""`tls.overrides` and IDNA (issue 11, item 8): one domain, two spellings. Entries may be
written with U-labels; config keeps A-labels, and a lookup finds the entry whichever form
the mail uses."""

from __future__ import annotations

import pytest

from relay.config import ConfigError, a_label, load_config
from relay.delivery.overrides import OverrideRule, TlsOverride, TlsOverrides

ULABEL, ALABEL = "bücher.example", "xn--bcher-kva.example"


def _overrides(*entries: str) -> tuple[str, ...]:
    environ = {"STS_RELAY_TLS_OVERRIDES": ",".join(entries)}
    return load_config(None, environ, fqdn=lambda: "relay.test").tls.overrides


def test_a_u_label_entry_is_accepted_and_kept_as_a_labels() -> None:
    got = _overrides("Bücher.Example.=require-verified match=mx.bücher.example:*.BÜCHER.example")
    assert got == (f"{ALABEL}=require-verified match=mx.{ALABEL}:*.{ALABEL}",)
    assert _overrides(f"{ULABEL}=opportunistic") == (f"{ALABEL}=opportunistic",)


def test_a_name_without_an_a_label_form_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"tls\.overrides"):
        _overrides("☃.example=opportunistic")


@pytest.mark.parametrize(
    ("entry_domain", "mail_domain"),
    [(ULABEL, ALABEL), (ALABEL, ULABEL), (ULABEL, "BÜCHER.example."), (ALABEL, ALABEL)],
)
def test_an_entry_applies_to_either_spelling(entry_domain: str, mail_domain: str) -> None:
    overrides = TlsOverrides([f"{entry_domain}=require-verified match=mx1.{entry_domain}"])
    rule = overrides.get(mail_domain)
    assert rule == OverrideRule(TlsOverride.REQUIRE_VERIFIED, (f"mx1.{ALABEL}",))
    assert overrides.get("buecher.example") is None


def test_a_label() -> None:
    assert a_label("Bücher.Example.") == ALABEL
    assert a_label("faß.de") == "xn--fa-hia.de"  # IDNA 2008, not 2003's "fass.de"
    assert a_label(" MX1.Example.ORG. ") == "mx1.example.org"
    with pytest.raises(ValueError, match="A-label"):
        a_label("☃.example")
