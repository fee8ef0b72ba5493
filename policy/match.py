"""MX host names against policy `mx` patterns (RFC 8461 §4.1), and host-name validity.

Owns the name rules only; knows nothing about DNS lookups, TLS or SMTP. The caller passes
the MX name exactly as the MX record gives it (§4.1: before any CNAME expansion).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

_LDH_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?")
_MAX_NAME: Final = 253


def _normalise(name: str) -> str:
    # RFC 8461 §4.1 (RFC 6125 §6.4.1): compare case-insensitively, ignore one root dot.
    return name.lower().removesuffix(".")


def is_valid_hostname(name: str) -> bool:
    """True for an ASCII LDH host name (one trailing dot allowed), e.g. before TLS (STS-101).

    Rejects wildcards, underscores, U-labels, empty labels, over-long names and an
    all-numeric last label (RFC 3696 §2: no all-numeric top-level domain).
    """
    if not name.isascii():
        return False
    host = _normalise(name)
    if not host or len(host) > _MAX_NAME:
        return False
    labels = host.split(".")
    if labels[-1].isdigit():
        return False
    return all(_LDH_LABEL.fullmatch(label) for label in labels)


def mx_matches(mx_host: str, patterns: Iterable[str]) -> bool:
    """True if `mx_host` matches one policy pattern (RFC 8461 §4.1).

    A pattern `*.example.com` matches exactly one extra left-most label: it matches
    `mail.example.com`, not `example.com` nor `a.b.example.com`. An invalid host name
    matches nothing (so `*.example.com` as a host never matches itself).
    """
    if not is_valid_hostname(mx_host):
        return False
    host = _normalise(mx_host)
    _, _, parent = host.partition(".")
    for raw in patterns:
        pattern = _normalise(raw)
        if pattern.startswith("*."):
            if parent and pattern[2:] == parent:
                return True
        elif pattern == host:
            return True
    return False
