"""Where mail for a domain goes: MX lookup (RFC 5321 §5.1, RFC 7505) and MX host addresses.

Owns the DNS side of delivery and turns every dnspython exception into a value
(`MxList | NullMx | NoSuchDomain | DnsTempFail`, `list[str] | NoAddresses | DnsTempFail`).
It knows nothing about MTA-STS, TLS or SMTP.

Choices:
- A null MX (`0 .`) mixed with other MX records is a publisher error (RFC 7505 §3). We
  never try to reach `.` and use the remaining records (NMX-04).
- A domain with neither MX nor A/AAAA records is a permanent failure (5.4.4, like Postfix's
  "Host found but no data record"), NXDOMAIN is 5.1.2; SERVFAIL, timeouts and garbage are
  temporary (RFC 5321 §5.1: a temporary DNS error means queue and retry).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import socket
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.rdatatype
import dns.resolver


@dataclass(frozen=True, slots=True)
class MxList:
    """MX host names in the order to try them (lower-case, no trailing dot)."""

    hosts: tuple[str, ...]
    implicit: bool = False  # no MX records: the domain itself (RFC 5321 §5.1)
    # The MX answer (or its denial, for an implicit MX) carried the AD bit; None: not known.
    # Trusted only where dns.dnssec trusts the resolver (relay/delivery/dane.py).
    authenticated: bool | None = None


@dataclass(frozen=True, slots=True)
class NullMx:
    """RFC 7505: the domain accepts no mail."""


@dataclass(frozen=True, slots=True)
class NoSuchDomain:
    """A permanent DNS answer: the domain cannot receive mail. `status` is RFC 3463."""

    detail: str
    status: str = "5.1.2"


@dataclass(frozen=True, slots=True)
class DnsTempFail:
    """SERVFAIL, timeout, unreachable or garbled DNS: try again later."""

    detail: str


@dataclass(frozen=True, slots=True)
class NoAddresses:
    """The MX host has no usable address (none published, or only refused ones)."""

    detail: str


# Errors a DNS query may end with. dnspython raises DNSException subclasses; sockets may
# leak OSError; malformed names raise ValueError subclasses in places.
_DNS_ERRORS = (dns.exception.DNSException, OSError, ValueError, TimeoutError)


def normalize_host(name: str) -> str:
    """Lower-case, without the trailing root dot."""
    return name.rstrip(".").lower()


def order_mx(
    records: Iterable[tuple[int, str]], rng: random.Random, authenticated: bool | None = None
) -> MxList | NullMx:
    """Sort (preference, exchange) by preference, shuffling equal preferences (RFC 5321 §5.1).

    An exchange of `.` (the root) is a null MX (RFC 7505); alone it means "no mail",
    mixed with real hosts it is skipped. A host listed twice is kept at its best preference.
    """
    groups = _preference_groups(records)
    return _ordered(groups, rng, authenticated) if groups else NullMx()


def _preference_groups(records: Iterable[tuple[int, str]]) -> tuple[tuple[str, ...], ...]:
    """The host names by preference, best first; each group sorted (so that the shuffle
    alone decides their order); empty for a null MX."""
    by_pref: dict[int, list[str]] = {}
    for pref, exchange in records:
        host = normalize_host(exchange)
        if host:
            by_pref.setdefault(pref, []).append(host)
    return tuple(tuple(sorted(set(by_pref[pref]))) for pref in sorted(by_pref))


def _ordered(
    groups: tuple[tuple[str, ...], ...], rng: random.Random, authenticated: bool | None
) -> MxList:
    ordered: list[str] = []
    for hosts in groups:
        group = list(hosts)
        rng.shuffle(group)
        ordered.extend(h for h in group if h not in ordered)
    return MxList(hosts=tuple(ordered), authenticated=authenticated)


class _ParsedMx:
    """What an MX answer says, parsed once: dnspython's cache hands out the same Answer
    for as long as its TTL allows (relay/delivery/dns_cache.py), and a busy domain is
    looked up for every attempt."""

    __slots__ = ("authenticated", "fixed", "groups")

    def __init__(self, answer: dns.resolver.Answer) -> None:
        response = answer.response
        self.authenticated = response is not None and bool(response.flags & dns.flags.AD)
        records = [
            (int(rd.preference), rd.exchange.to_text())
            for rd in answer.rrset or ()
            if rd.rdtype == dns.rdatatype.MX
        ]
        self.groups = _preference_groups(records)
        # The answer when it is the same every time: a null MX, or one host per preference
        # (nothing to shuffle). None: shuffled per call, or no MX records (the domain
        # itself, whose addresses are looked up each time).
        self.fixed: MxList | NullMx | None = None
        if records and not self.groups:
            self.fixed = NullMx()
        elif self.groups and all(len(group) == 1 for group in self.groups):
            hosts = tuple(dict.fromkeys(group[0] for group in self.groups))
            self.fixed = MxList(hosts=hosts, authenticated=self.authenticated)


_PARSED: weakref.WeakKeyDictionary[dns.resolver.Answer, _ParsedMx] = weakref.WeakKeyDictionary()


def _parsed(answer: dns.resolver.Answer) -> _ParsedMx:
    parsed = _PARSED.get(answer)
    if parsed is None:
        parsed = _PARSED[answer] = _ParsedMx(answer)
    return parsed


@functools.lru_cache(maxsize=4096)
def _absolute(name: str) -> dns.name.Name:
    # Memoised: the same few domains and MX hosts are parsed for every message.
    return dns.name.from_text(normalize_host(name) + ".")


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


async def _query(
    resolver: dns.asyncresolver.Resolver, name: dns.name.Name, rdtype: str, lifetime: float
) -> dns.resolver.Answer:
    """One bounded query; NODATA comes back as an Answer whose rrset is None."""
    # dnspython's lifetime bounds its retries; asyncio.timeout bounds everything else.
    async with asyncio.timeout(lifetime + 1.0):
        return await resolver.resolve(
            name, rdtype, raise_on_no_answer=False, lifetime=lifetime, search=False
        )


async def resolve_mx(
    domain: str,
    resolver: dns.asyncresolver.Resolver,
    *,
    timeout: float,  # noqa: ASYNC109 - part of the API; also dnspython's lifetime
    rng: random.Random,
) -> MxList | NullMx | NoSuchDomain | DnsTempFail:
    """The MX hosts of `domain` in the order to try them, or why there are none."""
    try:
        name = _absolute(domain)
    except _DNS_ERRORS as exc:
        return NoSuchDomain(f"invalid domain name: {_describe(exc)}")
    try:
        answer = await _query(resolver, name, "MX", timeout)
    except dns.resolver.NXDOMAIN:
        return NoSuchDomain(f"{normalize_host(domain)}: no such domain (NXDOMAIN)")
    except _DNS_ERRORS as exc:
        return DnsTempFail(f"MX lookup for {normalize_host(domain)} failed: {_describe(exc)}")
    parsed = _parsed(answer)
    if parsed.fixed is not None:
        return parsed.fixed
    if parsed.groups:
        return _ordered(parsed.groups, rng, parsed.authenticated)
    return await _implicit_mx(domain, resolver, timeout, parsed.authenticated)


async def _implicit_mx(
    domain: str,
    resolver: dns.asyncresolver.Resolver,
    lifetime: float,
    authenticated: bool | None,
) -> MxList | NoSuchDomain | DnsTempFail:
    # RFC 5321 §5.1: no MX records → the domain itself is the only host, preference 0.
    host = normalize_host(domain)
    addresses = await resolve_addresses(host, resolver, timeout=lifetime, allow_loopback=True)
    match addresses:
        case DnsTempFail():
            return addresses
        case NoAddresses():
            return NoSuchDomain(f"{host}: no MX and no A/AAAA records", status="5.4.4")
        case _:
            return MxList(hosts=(host,), implicit=True, authenticated=authenticated)


def is_local_address(address: str) -> bool:
    """Does this address belong to this machine? (A socket can be bound to it.)"""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((address, 0))
    except OSError:
        return False
    return True


def usable_address(address: str, allow_loopback: bool, own: frozenset[str] = frozenset()) -> bool:
    """False for loopback, unspecified and this machine's own addresses (the listen
    addresses in `own`, and any local interface address) unless `allow_loopback`: an MX
    pointing back at the relay would make it deliver to itself (a mail loop)."""
    if allow_loopback:
        return True
    ip = ipaddress.ip_address(address)
    if ip.is_loopback or ip.is_unspecified or address in own or str(ip) in own:
        return False
    return not is_local_address(address)


async def resolve_addresses(
    host: str,
    resolver: dns.asyncresolver.Resolver,
    *,
    timeout: float,  # noqa: ASYNC109 - part of the API; also dnspython's lifetime (per query)
    allow_loopback: bool,
    own: frozenset[str] = frozenset(),
) -> list[str] | DnsTempFail | NoAddresses:
    """IPv6 then IPv4 addresses of `host`; loopback, unspecified and this machine's own
    addresses (`usable_address`) refused unless `allow_loopback`.

    One family failing temporarily while the other answers still yields the answer.
    `timeout` bounds each of the two queries.
    """
    try:
        name = _absolute(host)
    except _DNS_ERRORS as exc:
        return NoAddresses(f"invalid host name {host!r}: {_describe(exc)}")
    found: list[str] = []
    temp_errors: list[str] = []
    for rdtype in ("AAAA", "A"):
        try:
            answer = await _query(resolver, name, rdtype, timeout)
        except dns.resolver.NXDOMAIN:
            return NoAddresses(f"{normalize_host(host)}: no such host (NXDOMAIN)")
        except _DNS_ERRORS as exc:
            temp_errors.append(f"{rdtype}: {_describe(exc)}")
            continue
        if answer.rrset is not None:
            found.extend(rd.to_text() for rd in answer.rrset if rd.rdtype == answer.rdtype)
    if not found and temp_errors:
        return DnsTempFail(f"address lookup for {host} failed: {'; '.join(temp_errors)}")
    usable = [a for a in found if usable_address(a, allow_loopback, own)]
    if not found:
        return NoAddresses(f"{normalize_host(host)}: no A/AAAA records")
    if not usable:
        detail = "only loopback or this relay's own addresses (refused)"
        return NoAddresses(f"{normalize_host(host)}: {detail}")
    return usable
