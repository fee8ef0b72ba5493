"""The `_smtp._tls.<domain>` TXT record (RFC 8460 §3): selection and strict parsing.

Pure functions over the record strings as published; no DNS here (see discover.py).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Sequence

from tlsrpt.model import TlsRptRecord

_VERSION = "v=TLSRPTv1"
_FIELD_DELIM = re.compile(r"[ \t]*;[ \t]*")
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_URI_SPLIT = re.compile(r"[ \t]*,[ \t]*")
# RFC 3986 characters only (commas and "!" must be percent-encoded inside a URI).
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[A-Za-z0-9\-._~:/?#\[\]@$&'()*+;=%]+")
_ADDRESS = re.compile(r"[^\s@<>()\[\],;:\"\\]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


class InvalidRecord(ValueError):
    """The record is not an RFC 8460 §3 record."""


def select_record(records: Sequence[bytes]) -> TlsRptRecord | None:
    """RFC 8460 §3: keep records beginning with `v=TLSRPTv1`; exactly one must remain
    and be valid, else the domain does not implement TLSRPT (RPT-02)."""
    candidates = [r for r in records if _begins_with_version(r)]
    if len(candidates) != 1:
        return None
    try:
        text = candidates[0].decode("ascii")
        return parse_record(text)
    except (UnicodeDecodeError, InvalidRecord):
        return None


def _begins_with_version(record: bytes) -> bool:
    if not record.startswith(_VERSION.encode()):
        return False
    rest = record[len(_VERSION) :]
    return rest.lstrip(b" \t").startswith(b";")


def parse_record(text: str) -> TlsRptRecord:
    """Parse one record; raises InvalidRecord. Unknown extension fields are ignored;
    URIs other than mailto: and https: are dropped (RPT-03)."""
    fields = _FIELD_DELIM.split(text)
    if fields[0] != _VERSION:
        raise InvalidRecord("does not begin with v=TLSRPTv1")
    if fields[-1] == "":
        fields.pop()  # a trailing field-delim is allowed
    rua: tuple[str, ...] | None = None
    for field in fields[1:]:
        name, sep, value = field.partition("=")
        if name == "rua" and sep:
            if rua is not None:
                raise InvalidRecord("more than one rua field")
            rua = _parse_rua(value)
        elif not (sep and _EXT_NAME.fullmatch(name) and _EXT_VALUE.fullmatch(value)):
            raise InvalidRecord(f"malformed field {field[:40]!r}")
    if rua is None:
        raise InvalidRecord("no rua field")
    usable = tuple(u for u in rua if _usable(u))
    if not usable:
        raise InvalidRecord("no mailto: or https: reporting URI")
    return TlsRptRecord(usable)


def _parse_rua(value: str) -> tuple[str, ...]:
    uris = _URI_SPLIT.split(value)
    for uri in uris:
        if not _URI.fullmatch(uri):
            raise InvalidRecord(f"malformed URI {uri[:60]!r}")
    return tuple(uris)


def _usable(uri: str) -> bool:
    scheme = uri.split(":", 1)[0].lower()
    if scheme == "mailto":
        return mailto_address(uri) is not None
    if scheme == "https":
        return https_target(uri) is not None
    return False


def mailto_address(uri: str) -> str | None:
    """The one address of a `mailto:` URI (RFC 6068), or None if it names none or several."""
    if not uri.lower().startswith("mailto:"):
        return None
    path = urllib.parse.unquote(uri[len("mailto:") :].split("?", 1)[0])
    if not _ADDRESS.fullmatch(path):
        return None
    return path


def https_target(uri: str) -> tuple[str, int] | None:
    """(host, port) of an `https:` URI, or None when it has no usable host."""
    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port or 443
    except ValueError:
        return None
    if parts.scheme.lower() != "https" or not parts.hostname or parts.username is not None:
        return None
    return parts.hostname.lower().removesuffix("."), port
