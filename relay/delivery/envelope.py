"""What one SMTP transaction carries, and how its ESMTP parameters are spelled on the wire.

Owns the `Envelope` value and the MAIL/RCPT parameter encoding: SIZE (RFC 1870),
BODY=8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), REQUIRETLS (RFC 8689) and the DSN
parameters RET, ENVID, NOTIFY, ORCPT (RFC 3461 §4, xtext). Pure: it reads the server's
advertised extensions through a callable and never touches a socket.

Choices (documented in the README):
- 8-bit body, server without 8BITMIME: sent as is, without BODY= (what Postfix does with
  `smtp_never_send_ehlo` off and no MIME conversion); most servers accept it.
- Non-ASCII envelope address, server without SMTPUTF8: the address cannot be sent
  (RFC 6531 §3.2); the caller bounces it with 5.6.7.
- DSN parameters are passed on only when the next hop advertises DSN (RFC 3461 §5.2).
- REQUIRETLS is always passed on for a REQUIRETLS message (RFC 8689 §4.2.1); the client
  never starts such a transaction with a server that did not offer it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mailqueue.model import DsnRequest

Supports = Callable[[str], bool]
"""`supports("dsn")`: did the server advertise this EHLO keyword?"""


@dataclass(frozen=True, slots=True)
class Envelope:
    sender: str  # "" for the null reverse-path
    recipients: Sequence[str]
    data: bytes
    dsn: DsnRequest = field(default_factory=DsnRequest)
    requiretls: bool = False  # submitted with REQUIRETLS (RFC 8689)

    @property
    def needs_utf8(self) -> bool:
        return not all(a.isascii() for a in (self.sender, *self.recipients))


def xtext(value: str) -> bytes:
    """RFC 3461 §4: "+" , "=" and anything outside "!".."~" become +XX (of UTF-8 bytes)."""
    out = bytearray()
    for byte in value.encode("utf-8"):
        if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D):
            out.append(byte)
        else:
            out += b"+%02X" % byte
    return bytes(out)


def path(address: str, utf8: bool) -> bytes | None:
    """`<address>` as bytes, or None if it cannot be sent (CR/LF/NUL, or 8-bit without
    SMTPUTF8: RFC 6531 §3.2). aiosmtplib's own quoting would re-parse and alter it."""
    if any(c in address for c in "\r\n\0"):
        return None
    if not address.isascii() and not utf8:
        return None
    return b"<" + address.encode("utf-8") + b">"


def mail_params(envelope: Envelope, supports: Supports, utf8: bool) -> list[bytes]:
    data = envelope.data
    params: list[bytes] = []
    if supports("size"):
        params.append(b"SIZE=%d" % len(data))
    if supports("8bitmime") and not data.isascii():
        params.append(b"BODY=8BITMIME")
    if utf8:
        params.append(b"SMTPUTF8")
    if envelope.requiretls:
        params.append(b"REQUIRETLS")
    if supports("dsn"):
        if envelope.dsn.ret in ("FULL", "HDRS"):
            params.append(b"RET=" + envelope.dsn.ret.encode())
        if envelope.dsn.envid:
            params.append(b"ENVID=" + xtext(envelope.dsn.envid))
    return params


def rcpt_params(envelope: Envelope, rcpt: str, supports: Supports) -> list[bytes]:
    if not supports("dsn"):
        return []
    params: list[bytes] = []
    notify = envelope.dsn.notify.get(rcpt)
    if notify:
        params.append(b"NOTIFY=" + ",".join(notify).encode("ascii", "replace"))
    orcpt = envelope.dsn.orcpt.get(rcpt)
    if orcpt:
        addr_type, sep, address = orcpt.partition(";")
        # RFC 3461 §4.2: "addr-type ; xtext"; a non-ASCII address type is not passed on.
        if sep and addr_type.strip().isascii() and addr_type.strip():
            params.append(b"ORCPT=" + addr_type.strip().encode() + b";" + xtext(address))
    return params
