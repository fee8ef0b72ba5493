"""What happened to one recipient: Delivered, Deferred or Bounced, each with its Reason.

Outcomes are values. Library exceptions stop at the adapter that calls the library
(session.py, mx.py, the policy resolver) and become these; the worker consumes them
with a `match` and never sees an exception from the network.
"""

from __future__ import annotations

from dataclasses import dataclass

from policy.model import TlsRptResult


@dataclass(frozen=True, slots=True)
class Hop:
    """The MX host a result came from, and how the connection to it was secured."""

    mx: str
    ip: str | None = None
    tls: str | None = None  # negotiated TLS version ("TLSv1.3"), None when in the clear
    verified: bool = False  # certificate chained to a trusted root and named `mx`, or DANE
    dsn: bool = False  # the MX advertised DSN: RFC 3461 parameters were passed on to it
    dane: str | None = None  # the TLSA record the certificate matched ("3 1 1 <hex>"), if DANE
    # The TLS handshake resumed an earlier session of this MX name (policy/webpki.py): as
    # strictly checked as a full one, whose verification it carries.
    tls_resumed: bool = False


@dataclass(frozen=True, slots=True)
class Reason:
    """Why a recipient ended where it did.

    `text` is one safe line for logs and DSNs; `status` the RFC 3463 enhanced status
    code ("5.1.1"); `reply` the remote SMTP reply when there was one; `tlsrpt` the
    RFC 8460 result type when TLS or MTA-STS was the cause (or, under `testing`,
    what enforce would have refused). `unreachable`: no SMTP reply came back, the
    connection was refused, timed out or found no route; on the outcome of an attempt,
    every MX address it tried failed that way (relay/delivery/holds.py then holds the
    destination).
    """

    text: str
    status: str
    reply: str | None = None
    hop: Hop | None = None
    tlsrpt: TlsRptResult | None = None
    unreachable: bool = False


@dataclass(frozen=True, slots=True)
class Delivered:
    reason: Reason


@dataclass(frozen=True, slots=True)
class Deferred:
    reason: Reason


@dataclass(frozen=True, slots=True)
class Bounced:
    reason: Reason


Outcome = Delivered | Deferred | Bounced
