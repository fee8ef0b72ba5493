"""DNSSEC status of DNS answers, as a validating resolver the relay trusts reports it.

Owns two things: which resolver's word the relay takes (`dns.dnssec`: off / auto / on,
resolved once at start into a `DnssecSetting`), and, for one query, whether its answer is
secure, insecure or bogus (`lookup`). Knows nothing of TLSA, MX semantics or SMTP.

Why the AD bit and not validation in process (RFC 7672 §2.1, RFC 6840 §5.7): like
Postfix, the relay delegates validation to a local validating resolver (unbound, in the
compose file) and reads the AD ("authentic data") bit of its answers. The bit is only as
trustworthy as the path to the resolver, so by default (`auto`) it is believed only when
every configured nameserver is on loopback. `on` believes a remote resolver too (a warning
at start: anyone on that path can set the bit); `off` never believes it, and DANE is off.
Validating in process would mean a second DNSSEC implementation (chain of trust, NSEC3
denial proofs, algorithm policy, trust-anchor rollover) beside the resolver every operator
already runs; we take the RFC's other allowed road.

Status of one answer:
- secure: the resolver is trusted and set AD (positive or negative answer).
- insecure: NOERROR / NXDOMAIN without AD (an unsigned zone, or below an insecure cut).
- bogus: a validating resolver answers SERVFAIL when validation fails (RFC 4035 §5.5);
  it is told apart from other SERVFAILs only by an Extended DNS Error (RFC 8914, codes
  1-12 are DNSSEC ones) when the resolver sends one (unbound with `ede: yes`). Every
  SERVFAIL and timeout is a failure either way: RFC 7672 §2.2 defers on both.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import dns.asyncresolver
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.resolver

from relay.config import parse_hostport

# The EDNS payload advertised with DO (DNS flag day 2020: 1232 avoids fragmentation).
EDNS_PAYLOAD = 1232
# RFC 8914 §4: the DNSSEC-related Extended DNS Error codes (1 unsupported algorithm ...
# 12 NSEC missing).
_DNSSEC_EDE = frozenset(range(1, 13))


class DnssecMode(StrEnum):
    """`dns.dnssec`: whose AD bit the relay believes."""

    OFF = "off"
    AUTO = "auto"  # only from resolvers on loopback
    ON = "on"  # from any configured resolver (warned at start when one is remote)


@dataclass(frozen=True, slots=True)
class DnssecSetting:
    """What is in force: whether AD bits are believed (and DANE is on), and why."""

    mode: DnssecMode
    trusted: bool
    nameservers: tuple[str, ...]
    reason: str
    warning: str | None = None

    @property
    def summary(self) -> str:
        """One line for `config check` and the `started` event."""
        state = "DANE on" if self.trusted else "DANE off"
        return f"{self.mode.value}: {state} ({self.reason})"


def _is_loopback(server: str) -> bool:
    try:
        host, _ = parse_hostport(server, default_port=53)
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def system_nameservers() -> tuple[str, ...]:
    """The system resolver's nameservers (/etc/resolv.conf), as dnspython reads them."""
    try:
        return tuple(str(ns) for ns in dns.resolver.Resolver().nameservers)
    except dns.exception.DNSException:
        return ()


def dnssec_setting(mode: str, nameservers: Sequence[str]) -> DnssecSetting:
    """The setting in force for `dns.dnssec` = `mode` and the nameservers actually used
    (the configured ones, else the system's). Pure."""
    chosen = DnssecMode(mode)
    servers = tuple(nameservers)
    shown = ", ".join(servers) or "none"
    remote = [s for s in servers if not _is_loopback(s)]
    if chosen is DnssecMode.OFF:
        return DnssecSetting(chosen, False, servers, "dns.dnssec = off: no DNSSEC, no DANE")
    if not servers:
        return DnssecSetting(chosen, False, servers, "no nameserver configured")
    if chosen is DnssecMode.AUTO:
        if remote:
            why = f"nameserver {remote[0]} is not on loopback; its AD bit is not believed"
            return DnssecSetting(chosen, False, servers, why)
        why = f"AD bit of the validating resolver on loopback ({shown})"
        return DnssecSetting(chosen, True, servers, why)
    if remote:
        warning = (
            f"dns.dnssec = on with nameserver {remote[0]} off this host: anyone on the path"
            " to it can forge the AD bit and with it DANE; run a validating resolver on"
            " loopback instead"
        )
        why = f"AD bit believed from {shown}, not all on loopback"
        return DnssecSetting(chosen, True, servers, why, warning)
    return DnssecSetting(chosen, True, servers, f"AD bit of the resolver on loopback ({shown})")


def dnssec_in_force(mode: str, configured: Sequence[str]) -> DnssecSetting:
    """The setting for `dns.dnssec` = `mode` over the configured nameservers, or the
    system's when none are configured (what `make_resolver` will use)."""
    return dnssec_setting(mode, tuple(configured) or system_nameservers())


def request_dnssec(resolver: dns.asyncresolver.Resolver) -> None:
    """Ask for DNSSEC on every query of `resolver` (EDNS0 with the DO bit, RFC 3225), so
    that the resolver reports validation with AD. Every query, not only TLSA: the answer
    cache is keyed by name and type, so an MX answer cached without DO would later read
    as insecure."""
    resolver.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)


class Security(StrEnum):
    """RFC 4033 §5 / RFC 7672 §2.1: what validation says of one answer."""

    SECURE = "secure"
    INSECURE = "insecure"
    BOGUS = "bogus"  # validation failed, or any SERVFAIL or timeout: no usable answer


@dataclass(frozen=True, slots=True)
class Answer:
    """A usable answer: `records` empty for NODATA or NXDOMAIN (`exists` False)."""

    records: tuple[dns.rdata.Rdata, ...]
    security: Security
    exists: bool = True
    ttl: int = 0  # of the RRset; 0 for NODATA/NXDOMAIN (not worth remembering)


@dataclass(frozen=True, slots=True)
class Failed:
    """No usable answer: SERVFAIL (bogus when an EDE says so), timeout, garbage."""

    detail: str
    bogus: bool = False  # the resolver said validation failed (EDE)

    @property
    def security(self) -> Security:
        return Security.BOGUS


def _ad(response: dns.message.Message | None, trusted: bool) -> Security:
    if trusted and response is not None and response.flags & dns.flags.AD:
        return Security.SECURE
    return Security.INSECURE


def _servfail_detail(exc: dns.resolver.NoNameservers) -> tuple[str, bool]:
    """The resolver's own words on a SERVFAIL: its EDE code and text when it sent one."""
    for error in exc.kwargs.get("errors", []):
        response = error[4] if len(error) > 4 else None
        if not isinstance(response, dns.message.Message):
            continue
        for ede in response.extended_errors():
            text = f"EDE {int(ede.code)}" + (f": {ede.text}" if ede.text else "")
            return text, int(ede.code) in _DNSSEC_EDE
        return dns.rcode.to_text(response.rcode()), False
    return "no answer from the nameservers", False


async def lookup(
    resolver: dns.asyncresolver.Resolver,
    name: str,
    rdtype: str,
    *,
    timeout: float,  # noqa: ASYNC109 - also dnspython's lifetime
    trusted: bool,
) -> Answer | Failed:
    """One bounded query and the DNSSEC status of its answer (cached answers included:
    the cache keeps the whole response, AD bit and all)."""
    try:
        qname = dns.name.from_text(name.rstrip(".") + ".")
    except (dns.exception.DNSException, ValueError) as exc:
        return Failed(f"bad name {name!r}: {exc}")
    try:
        async with asyncio.timeout(timeout + 1.0):
            answer = await resolver.resolve(
                qname, rdtype, raise_on_no_answer=False, lifetime=timeout, search=False
            )
    except dns.resolver.NXDOMAIN as exc:
        try:
            response: dns.message.Message | None = exc.response(qname)  # type: ignore[no-untyped-call]
        except (KeyError, IndexError):
            response = None
        return Answer((), _ad(response, trusted), exists=False)
    except dns.resolver.NoNameservers as exc:
        detail, bogus = _servfail_detail(exc)
        return Failed(f"{rdtype} {qname.to_text()}: SERVFAIL ({detail})", bogus)
    except (dns.exception.DNSException, OSError, TimeoutError, ValueError) as exc:
        what = " ".join(str(exc).split())[:160] or type(exc).__name__
        return Failed(f"{rdtype} {qname.to_text()}: {type(exc).__name__}: {what}")
    rrset = answer.rrset
    records = tuple(rrset) if rrset is not None else ()
    return Answer(records, _ad(answer.response, trusted), ttl=rrset.ttl if rrset else 0)
