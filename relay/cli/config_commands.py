"""`sts-relay config check [--json]`: the effective configuration, as `serve` would run it.

Text output is a TOML file that `serve --config` accepts back and that yields the same
settings: every key with the value that really applies (computed defaults written out:
the host names, the users file, the TLS-report identities), a comment naming where the
value came from, and keys that are not set as comments. `--json` gives the same values
with their sources ("default", "defaults file", "file", "environment"), the files read
and the warnings. Warnings (a delivery.hostname that is not a fully qualified name) do not
fail the check; what `serve` would refuse does (exit 2).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from relay.cli.output import EXIT_OK, print_json
from relay.config import (
    ENV_DEFAULTS,
    SOURCE_DEFAULT,
    Config,
    config_as_dict,
    config_file,
    config_sources,
    config_warnings,
    redact_url,
    users_file_path,
)
from relay.delivery.dnssec import dnssec_in_force
from relay.inbound.tls import server_context
from relay.reporting import report_settings

# Keys whose default is computed from others: what the TOML comment says of them.
_COMPUTED = {
    ("listen", "hostname"): "delivery.hostname",
    ("delivery", "hostname"): "the machine's FQDN",
    ("auth", "users_file"): "<state.path>/users",
    ("tlsrpt", "submitter"): "delivery.hostname",
    ("tlsrpt", "organization_name"): "tlsrpt.submitter",
    ("tlsrpt", "contact_info"): "tlsrpt-noreply@<submitter>",
    ("tlsrpt", "dkim_domain"): "tlsrpt.submitter",
}


def effective_settings(cfg: Config) -> dict[str, dict[str, Any]]:
    """config_as_dict with the computed defaults written out. Raises ConfigError for what
    `serve` would refuse at start (a TLS-report identity or DKIM key that cannot work, a
    listener certificate that does not load)."""
    settings = config_as_dict(cfg)
    settings["state"]["url"] = redact_url(cfg.state.url)  # never print a password
    settings["auth"]["users_file"] = str(users_file_path(cfg))
    report = report_settings(cfg)
    tlsrpt = settings["tlsrpt"]
    tlsrpt["submitter"] = report.submitter
    tlsrpt["organization_name"] = report.organization
    tlsrpt["contact_info"] = report.contact
    if report.dkim is not None:
        tlsrpt["dkim_domain"] = report.dkim.domain
    if cfg.tls.cert_file is not None and cfg.tls.key_file is not None:
        server_context(cfg.tls.cert_file, cfg.tls.key_file)  # ServerTlsError: an OSError
    return settings


def toml_value(value: Any) -> str:
    """A TOML literal for a setting (strings, numbers, booleans, lists of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are TOML basic-string escapes; TOML also forbids a raw DEL.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def config_toml(settings: Mapping[str, Mapping[str, Any]], sources: Mapping[str, Any]) -> str:
    lines = [
        "# sts-relay: the effective configuration (sts-relay config check).",
        "# `sts-relay serve --config THIS-FILE` runs with the same settings.",
    ]
    for section, values in settings.items():
        lines += ["", f"[{section}]"]
        for key, value in values.items():
            source = sources[section][key]
            if source == SOURCE_DEFAULT and (section, key) in _COMPUTED:
                source = f"default: {_COMPUTED[(section, key)]}"
            if value is None:
                lines.append(f"# {key} is not set ({source})")
            else:
                lines.append(f"{key} = {toml_value(value)}  # {source}")
    return "\n".join(lines) + "\n"


def run_config_check(
    cfg: Config, path: str | None, environ: Mapping[str, str], as_json: bool
) -> int:
    """Print the effective configuration; ConfigError/OSError for what serve would refuse."""
    settings = effective_settings(cfg)
    sources = config_sources(path, environ)
    warnings = config_warnings(cfg)
    # What dns.dnssec puts in force over the nameservers actually used (DANE on or off).
    dnssec = dnssec_in_force(cfg.dns.dnssec, cfg.dns.nameservers)
    if dnssec.warning:
        warnings = [*warnings, dnssec.warning]
    if as_json:
        file = config_file(path, environ)
        defaults = environ.get(ENV_DEFAULTS) or None
        print_json(
            {
                "file": None if file is None else str(Path(file).absolute()),
                "defaults_file": None if defaults is None else str(Path(defaults).absolute()),
                "settings": settings,
                "sources": sources,
                "warnings": warnings,
                "dnssec": dnssec.summary,
            }
        )
    else:
        sys.stdout.write(config_toml(settings, sources))
    for warning in warnings:
        print(f"sts-relay: warning: {warning}", file=sys.stderr)
    print(f"sts-relay: dnssec in force: {dnssec.summary}", file=sys.stderr)
    print("configuration OK", file=sys.stderr)
    return EXIT_OK
