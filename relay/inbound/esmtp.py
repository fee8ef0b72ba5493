"""Syntax of what a client puts on MAIL and RCPT: envelope paths, DSN and REQUIRETLS.

Owns the envelope path check (RFC 5321 §4.1.2), xtext (RFC 3461 §4), the RFC 3461
parameters NOTIFY and ORCPT (RCPT), RET and ENVID (MAIL), and RFC 8689's REQUIRETLS
(MAIL): parsed case-preserving from the raw argument, validated, decoded and taken out of
the argument before aiosmtpd sees the rest (aiosmtpd upper-cases every parameter, which
would corrupt ENVID and ORCPT, and refuses the ones it does not know). Pure functions;
knows nothing of sessions, TLS or the queue.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

# Envelope paths (RFC 5321 §4.1.2), checked on the raw argument: aiosmtpd's parser drops
# CR and NUL and "repairs" garbage (`<a b@c>` becomes `"a b"@c`); CR, LF and NUL must never
# reach the outbound client (aiosmtplib GHSA-v3q9-hj7j-63hq). UTF-8 allowed (RFC 6531).
_U8 = "\u0080-\ud7ff\ue000-\U0010ffff"
_ATOM = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_U8}]+"
_QUOTED = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_U8}]|\\[\x20-\x7e])*"'
_LABEL = rf"[A-Za-z0-9{_U8}](?:[A-Za-z0-9\-{_U8}]*[A-Za-z0-9{_U8}])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_MAILBOX = rf"(?:{_ATOM}(?:\.{_ATOM})*|{_QUOTED})@(?:{_DOMAIN}|\[[A-Za-z0-9.:]+\])"
_PATH = re.compile(rf"(?:<(?:@{_DOMAIN}(?:,@{_DOMAIN})*:)?({_MAILBOX})>|({_MAILBOX}))(?: |$)")
_NULL_PATH = re.compile(r"<>(?: |$)")

# RFC 5321 §4.1.2: esmtp-param = esmtp-keyword ["=" esmtp-value]
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*")
_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]+")
_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_MAX_ENVID = 100  # RFC 3461 §4.4
_MAX_ORCPT = 500  # RFC 3461 §4.2


def _path_match(arg: str, *, null_ok: bool) -> re.Match[str] | None:
    if null_ok and (null := _NULL_PATH.match(arg)):
        return null
    match = _PATH.match(arg)
    if match is None:
        return None
    domain = (match.group(1) or match.group(2)).rpartition("@")[2]
    if domain.startswith("["):
        literal = domain[1:-1]
        if literal[:5].lower() == "ipv6:":
            literal = literal[5:]
        elif ":" in literal:
            return None
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            return None
    return match


def path_ok(arg: str, *, null_ok: bool) -> bool:
    """Whether the text after `FROM:`/`TO:` starts with a well-formed path (params follow)."""
    return _path_match(arg.lstrip(" "), null_ok=null_ok) is not None


def non_ascii_path(arg: str, *, null_ok: bool) -> bool:
    """Whether the argument's path is well-formed and holds non-ASCII (RFC 6531 §3.3)."""
    split = _split(arg, null_ok=null_ok)
    return split is not None and not split[0].isascii()


def has_parameter(arg: str, keyword: str, *, null_ok: bool) -> bool:
    """Whether the parameters after the argument's path include `keyword` (any case)."""
    split = _split(arg, null_ok=null_ok)
    return split is not None and any(
        p.partition("=")[0].upper() == keyword.upper() for p in split[1]
    )


class ParamError(Exception):
    """A DSN parameter is malformed, repeated or not allowed; `reply` is the SMTP answer."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class MailDsn:
    ret: str | None = None  # "FULL" or "HDRS"
    envid: str | None = None  # decoded


@dataclass(frozen=True, slots=True)
class RcptDsn:
    notify: tuple[str, ...] | None = None  # ("NEVER",) or some of SUCCESS/FAILURE/DELAY
    orcpt: str | None = None  # "rfc822;addr", decoded


def xtext_decode(text: str) -> str | None:
    """Decode RFC 3461 §4 xtext; None when `text` is not xtext."""
    if _XTEXT.fullmatch(text) is None:
        return None
    return _HEX.sub(lambda m: chr(int(m.group(1), 16)), text)


def _printable(text: str) -> bool:
    # RFC 3461 §4.2, §4.4: ENVID and ORCPT hold printable US-ASCII; a decoded CR, LF or
    # NUL would otherwise land in the headers of a DSN.
    return all("\x20" <= ch <= "\x7e" for ch in text)


def _split(arg: str, *, null_ok: bool) -> tuple[str, list[str]] | None:
    """The argument's path (with its leading spaces) and its parameters, or None."""
    stripped = arg.lstrip(" ")
    match = _path_match(stripped, null_ok=null_ok)
    if match is None:
        return None
    end = len(arg) - len(stripped) + match.end()
    return arg[:end].rstrip(" "), arg[end:].split()


def _take(
    arg: str, keywords: frozenset[str], *, null_ok: bool
) -> tuple[str, dict[str, str | None]]:
    """Remove the `keywords` parameters from `arg`; the rest, and keyword -> raw value."""
    split = _split(arg, null_ok=null_ok)
    if split is None:
        return arg, {}
    path, params = split
    taken: dict[str, str | None] = {}
    rest: list[str] = []
    for param in params:
        keyword = param.partition("=")[0].upper()
        if keyword not in keywords:
            rest.append(param)
            continue
        match = _PARAM.fullmatch(param)
        if match is None:
            raise ParamError(f"501 5.5.4 Invalid {keyword} parameter")
        if keyword in taken:
            raise ParamError(f"501 5.5.4 Duplicate {keyword} parameter")
        taken[keyword] = match.group(2)
    return " ".join([path, *rest]), taken


def take_mail_dsn(arg: str) -> tuple[str, MailDsn]:
    """Take RET and ENVID out of a MAIL argument (the text after `FROM:`)."""
    rest, taken = _take(arg, frozenset({"RET", "ENVID"}), null_ok=True)
    ret: str | None = None
    if "RET" in taken:
        ret = (taken["RET"] or "").upper()
        if ret not in ("FULL", "HDRS"):
            raise ParamError("501 5.5.4 Invalid RET parameter (FULL or HDRS)")
    envid: str | None = None
    if "ENVID" in taken:
        raw = taken["ENVID"] or ""
        envid = xtext_decode(raw) if len(raw) <= _MAX_ENVID else None
        if not envid or not _printable(envid):
            raise ParamError("501 5.5.4 Invalid ENVID parameter")
    return rest, MailDsn(ret=ret, envid=envid)


def take_requiretls(arg: str) -> tuple[str, bool]:
    """Take REQUIRETLS (RFC 8689 §2: a keyword without a value) out of a MAIL argument;
    the rest, and whether it was there."""
    rest, taken = _take(arg, frozenset({"REQUIRETLS"}), null_ok=True)
    if "REQUIRETLS" in taken and taken["REQUIRETLS"] is not None:
        raise ParamError("501 5.5.4 REQUIRETLS takes no value")
    return rest, "REQUIRETLS" in taken


def _notify(raw: str | None) -> tuple[str, ...]:
    words = tuple((raw or "").upper().split(","))
    if words == ("NEVER",):
        return words
    # RFC 3461 §4.1: NEVER alone, or any combination of SUCCESS, FAILURE and DELAY.
    if not words or any(w not in _NOTIFY_WORDS for w in words) or len(set(words)) != len(words):
        raise ParamError("501 5.5.4 Invalid NOTIFY parameter")
    return words


def _orcpt(raw: str | None) -> str:
    addr_type, sep, value = (raw or "").partition(";")
    decoded = xtext_decode(value) if sep and len(raw or "") <= _MAX_ORCPT else None
    if not decoded or not _ADDR_TYPE.fullmatch(addr_type) or not _printable(decoded):
        raise ParamError("501 5.5.4 Invalid ORCPT parameter")
    return f"{addr_type.lower()};{decoded}"


def take_rcpt_dsn(arg: str) -> tuple[str, RcptDsn]:
    """Take NOTIFY and ORCPT out of a RCPT argument (the text after `TO:`)."""
    rest, taken = _take(arg, frozenset({"NOTIFY", "ORCPT"}), null_ok=False)
    notify = _notify(taken["NOTIFY"]) if "NOTIFY" in taken else None
    orcpt = _orcpt(taken["ORCPT"]) if "ORCPT" in taken else None
    return rest, RcptDsn(notify=notify, orcpt=orcpt)
