"""Strict parsers for the `_mta-sts` TXT record (RFC 8461 §3.1) and the policy file (§3.2).

Owns the ABNF of both formats and nothing else: no DNS, no HTTP, no cache. Input is
untrusted, so every rule is checked literally (RFC 7405 `%s` case-sensitivity, exact
whitespace rules) and the only exceptions that leave this module are InvalidRecord and
InvalidPolicy, each with a one-line message naming the problem.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from policy.model import Mode, Policy, StsRecord

MAX_AGE_LIMIT: Final = 31_557_600  # RFC 8461 §3.2: "up to 31557600" seconds

_VERSION: Final = "v=STSv1"
# RFC 8461 §3.1: "records that do not begin with 'v=STSv1;' are discarded". The ABNF's
# sts-field-delim allows WSP before ";" (errata 6285 notes the clash); we follow the ABNF
# so that no record the grammar accepts is discarded.
_STS_PREFIX: Final = re.compile(rb"v=STSv1[ \t]*;")
_WSP: Final = " \t"
_TXT_ID: Final = re.compile(r"id=([A-Za-z0-9]{1,32})")
_TXT_EXT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}=[\x21-\x3a\x3c\x3e-\x7e]+")

_POLICY_KEY: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}")
# sts-policy-ext-value: vchar [*(SP / vchar) vchar]; vchar is %x21-7E or any UTF-8.
_POLICY_EXT_VALUE: Final = re.compile(r"[^\x00-\x20\x7f](?:[^\x00-\x1f\x7f]*[^\x00-\x20\x7f])?")
_MAX_AGE: Final = re.compile(r"[0-9]{1,10}")
# RFC 5321 sub-domain: Let-dig [Ldh-str]; DNS caps labels at 63 octets.
_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_MX_PATTERN: Final = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")
_MODES: Final = {"enforce": Mode.ENFORCE, "testing": Mode.TESTING, "none": Mode.NONE}


class InvalidRecord(ValueError):
    """The `_mta-sts` TXT record does not follow RFC 8461 §3.1."""


class InvalidPolicy(ValueError):
    """The policy body does not follow RFC 8461 §3.2."""


def parse_sts_record(text: str) -> StsRecord:
    """Parse one TXT record (its strings already concatenated) per the §3.1 ABNF.

    sts-text-record = sts-version 1*(sts-field-delim sts-field) [sts-field-delim]
    """
    if not text.isascii():
        raise InvalidRecord("TXT record is not US-ASCII")
    if not text.startswith(_VERSION):
        raise InvalidRecord("TXT record does not begin with v=STSv1")
    parts = text[len(_VERSION) :].split(";")
    if len(parts) < 2 or parts[0].strip(_WSP):
        raise InvalidRecord("v=STSv1 is not followed by a ';' delimiter")
    fields = parts[1:]
    trailing_delim = len(fields) > 1 and not fields[-1].strip(_WSP)
    if trailing_delim:
        fields = fields[:-1]  # the optional trailing sts-field-delim
    record_id: str | None = None
    for index, raw in enumerate(fields):
        unterminated = index == len(fields) - 1 and not trailing_delim
        # WSP may surround ";" only: a last field with no ";" after it ends the record.
        field = raw.lstrip(_WSP) if unterminated else raw.strip(_WSP)
        if not field:
            raise InvalidRecord("empty field in TXT record")
        if field.startswith("id="):
            match = _TXT_ID.fullmatch(field)
            if match is None:
                raise InvalidRecord("id must be 1 to 32 letters or digits")
            if record_id is None:
                record_id = match.group(1)
        elif _TXT_EXT.fullmatch(field) is None:
            raise InvalidRecord(f"malformed field {field[:40]!r} in TXT record")
    if record_id is None:
        raise InvalidRecord("TXT record has no id field")
    return StsRecord(id=record_id)


def select_sts_record(txt_records: Sequence[bytes]) -> StsRecord | None:
    """Pick the one MTA-STS record among a name's TXT records, or None (RFC 8461 §3.1).

    Each item is one record's character-strings joined with b"". Records not beginning
    with v=STSv1 and a ';' are discarded; if the rest are not exactly one valid ASCII
    record, the domain has no available policy.
    """
    candidates = [record for record in txt_records if _STS_PREFIX.match(record)]
    if len(candidates) != 1:
        return None
    raw = candidates[0]
    if not raw.isascii():
        return None
    try:
        return parse_sts_record(raw.decode("ascii"))
    except InvalidRecord:
        return None


def parse_policy(body: bytes) -> Policy:
    """Parse a policy file per the RFC 8461 §3.2 ABNF; first occurrence of a field wins."""
    try:
        # Strict UTF-8, not utf-8-sig: a BOM is not allowed by the ABNF (STS-50).
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidPolicy(f"policy is not valid UTF-8 (byte {exc.start})") from None
    fields = _policy_fields(text)
    version = fields.get("version")
    if version is None:
        raise InvalidPolicy("version field missing")
    if version != "STSv1":
        raise InvalidPolicy(f"unsupported version {version[:40]!r}")
    mode = _policy_mode(fields.get("mode"))
    max_age = _policy_max_age(fields.get("max_age"))
    mx = _policy_mx(text)
    if not mx and mode is not Mode.NONE:
        raise InvalidPolicy(f"no mx field in a {mode} policy")
    return Policy(mode=mode, mx=mx, max_age=max_age, text=text)


def _policy_lines(text: str) -> list[str]:
    # sts-policy-term = LF / CRLF (errata 6253). Only "\n" ends a line: str.splitlines()
    # would also split on CR, NEL, U+2028 and others (STS-40).
    lines = text.split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()  # one optional terminator after the last field
    return [line.removesuffix("\r") for line in lines]


def _policy_fields(text: str) -> dict[str, str]:
    """Check every line's syntax; return the first value seen for each key."""
    fields: dict[str, str] = {}
    for number, line in enumerate(_policy_lines(text), start=1):
        key, sep, rest = line.partition(":")
        if not sep or _POLICY_KEY.fullmatch(key) is None:
            raise InvalidPolicy(f"line {number}: expected 'key: value'")
        # sts-policy-field-delim = ":" *WSP, and *WSP may end a line.
        value = rest.strip(_WSP)
        if _POLICY_EXT_VALUE.fullmatch(value) is None:
            raise InvalidPolicy(f"line {number}: malformed value for {key!r}")
        # RFC 8461 §3.2: duplicates of non-mx fields after the first SHALL be ignored.
        fields.setdefault(key, value)
    return fields


def _policy_mode(value: str | None) -> Mode:
    if value is None:
        raise InvalidPolicy("mode field missing")
    mode = _MODES.get(value)
    if mode is None:
        raise InvalidPolicy(f"unknown mode {value[:40]!r}")
    return mode


def _policy_max_age(value: str | None) -> int:
    if value is None:
        raise InvalidPolicy("max_age field missing")
    # int() would accept "+1", "1_0" and non-ASCII digits; the ABNF is 1*10(DIGIT).
    if _MAX_AGE.fullmatch(value) is None:
        raise InvalidPolicy(f"max_age {value[:40]!r} is not 1 to 10 digits")
    max_age = int(value)
    if max_age > MAX_AGE_LIMIT:
        raise InvalidPolicy(f"max_age {max_age} exceeds {MAX_AGE_LIMIT}")
    return max_age


def _policy_mx(text: str) -> tuple[str, ...]:
    patterns: list[str] = []
    for line in _policy_lines(text):
        key, _, rest = line.partition(":")
        if key != "mx":
            continue
        value = rest.strip(_WSP)
        # RFC 8461 §3.2: ["*."] Domain, A-labels only (U-labels are not allowed).
        if _MX_PATTERN.fullmatch(value) is None or len(value) > 253:
            raise InvalidPolicy(f"invalid mx pattern {value[:60]!r}")
        pattern = value.lower()
        if pattern not in patterns:
            patterns.append(pattern)
    return tuple(patterns)
