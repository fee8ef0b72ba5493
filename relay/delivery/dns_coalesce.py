"""One query for many askers: identical DNS questions in flight at the same time share it.

Owns which calls may share a query and the lifetime of each caller around it. Like
Unbound's and BIND's handling of identical outstanding queries, a question asked while the
same question is already on its way to the nameserver waits for that query's outcome
instead of sending its own: many deliveries to one domain ask for its MX, its hosts' A and
AAAA, and `_mta-sts` TXT within the same milliseconds. This keeps nothing: a caller only
joins a query that is still in flight, so the answer is as fresh for it as for the caller
that started it (RFC 1035 §3.2.1: a TTL-0 answer is "used for the transaction in
progress"). Keeping answers for their TTL stays relay/delivery/dns_cache.py's job, and the
cache is consulted first. Knows nothing of MX, MTA-STS or DANE.

- Shared: questions with the same absolute name, type, class, transport, source address
  and the resolver's query settings at call time (flags, EDNS and DO, TSIG, nameservers).
  Names left to the search list are never shared (dnspython decides which names are asked).
- A cache flush (policy/discover.py `forget_record`, the check for a newer policy before a
  bounce, RFC 8461 §5.1) stops later calls from joining a query that started before it.
- Every caller gets the query's outcome: the same Answer (callers must not change it, as
  with cached ones) or the same exception. `raise_on_no_answer` is applied per caller, as
  dnspython applies it to a cached answer.
- Lifetimes: a caller joins only a query allowed at least as long as its own `lifetime`;
  a caller with a shorter one gets LifetimeTimeout when its own runs out, and the query
  goes on for the others. A caller that leaves (timeout or cancellation) never cancels a
  query others wait for; the last one to leave cancels it.
"""

from __future__ import annotations

import asyncio
import functools
import os
from typing import TYPE_CHECKING, TextIO

import dns.asyncresolver
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from relay.delivery.dns_cache import TtlCache

if TYPE_CHECKING:  # dns.asyncbackend re-exports it, but not to mypy's strict eyes
    from dns._asyncbackend import Backend

_Key = tuple[object, ...]


class _Flight:
    """One query under way and the number of callers waiting for it."""

    __slots__ = ("key", "lifetime", "task", "waiters")

    def __init__(self, key: _Key, task: asyncio.Task[dns.resolver.Answer], lifetime: float):
        self.key = key
        self.task = task
        self.lifetime = lifetime
        self.waiters = 0


class CoalescingResolver(dns.asyncresolver.Resolver):
    """A dnspython async resolver whose identical queries in flight are sent once (see the
    module doc). `queries` counts queries started, `coalesced` calls that joined one."""

    def __init__(
        self,
        filename: str | os.PathLike[str] | TextIO = "/etc/resolv.conf",
        configure: bool = True,
    ) -> None:
        super().__init__(filename, configure)
        self._flights: dict[_Key, _Flight] = {}
        self.queries = 0
        self.coalesced = 0

    async def resolve(
        self,
        qname: dns.name.Name | str,
        rdtype: dns.rdatatype.RdataType | str = dns.rdatatype.A,
        rdclass: dns.rdataclass.RdataClass | str = dns.rdataclass.IN,
        tcp: bool = False,
        source: str | None = None,
        raise_on_no_answer: bool = True,
        source_port: int = 0,
        lifetime: float | None = None,
        search: bool | None = None,
        backend: Backend | None = None,
    ) -> dns.resolver.Answer:
        name = dns.name.from_text(qname, None) if isinstance(qname, str) else qname
        if not name.is_absolute():
            if self.use_search_by_default if search is None else search:
                return await super().resolve(
                    qname,
                    rdtype,
                    rdclass,
                    tcp,
                    source,
                    raise_on_no_answer,
                    source_port,
                    lifetime,
                    search,
                    backend,
                )
            name = name.concatenate(dns.name.root)
        rdtype = dns.rdatatype.RdataType.make(rdtype)
        rdclass = dns.rdataclass.RdataClass.make(rdclass)
        own = self.lifetime if lifetime is None else lifetime
        # Lower-cased labels rather than the Name: dnspython hashes a Name in Python.
        labels = tuple(label.lower() for label in name.labels)
        key = (labels, rdtype, rdclass, tcp, source, source_port, backend, *self._settings())
        flight = self._flights.get(key)
        timer: float | None = None
        if flight is None or flight.task.done() or own > flight.lifetime:
            cached = self.cache.get((name, rdtype, rdclass)) if self.cache is not None else None
            if cached is not None:
                answer: dns.resolver.Answer = cached
                return _handled(answer, raise_on_no_answer)
            flight = self._start(key, name, rdtype, rdclass, tcp, source, source_port, own, backend)
        else:
            self.coalesced += 1
            if own < flight.lifetime:
                timer = own
        return _handled(await self._wait(flight, timer), raise_on_no_answer)

    def _settings(self) -> tuple[object, ...]:
        """What else makes a query differ: the resolver's settings as the query starts."""
        options = self.ednsoptions
        edns_options = tuple((o.otype, o.to_wire()) for o in options) if options else ()
        tsig = (
            (self.keyname, id(self.keyring), self.keyalgorithm)
            if self.keyname is not None
            else None
        )
        cache = self.cache
        flushes = cache.flushes if isinstance(cache, TtlCache) else 0
        servers = (tuple(self.nameservers), self.port, tuple(self.nameserver_ports.items()))
        handling = (self.retry_servfail, self.rotate, flushes)
        return (
            self.flags,
            self.edns,
            self.ednsflags,
            self.payload,
            edns_options,
            tsig,
            servers,
            handling,
        )

    def _start(
        self,
        key: _Key,
        name: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        rdclass: dns.rdataclass.RdataClass,
        tcp: bool,
        source: str | None,
        source_port: int,
        lifetime: float,
        backend: Backend | None,
    ) -> _Flight:
        # A task of its own, so that no caller's cancellation reaches it. NODATA comes back
        # as an Answer; each caller decides whether that raises NoAnswer (_handled).
        query = super().resolve(
            name, rdtype, rdclass, tcp, source, False, source_port, lifetime, False, backend
        )
        flight = _Flight(key, asyncio.create_task(query), lifetime)
        self._flights[key] = flight
        flight.task.add_done_callback(functools.partial(self._landed, flight))
        self.queries += 1
        return flight

    def _landed(self, flight: _Flight, task: asyncio.Task[dns.resolver.Answer]) -> None:
        self._forget(flight)
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have left before it ended

    def _forget(self, flight: _Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    async def _wait(self, flight: _Flight, timer: float | None) -> dns.resolver.Answer:
        """The flight's outcome, or LifetimeTimeout after `timer` seconds (None: the
        flight's own lifetime bounds the wait)."""
        flight.waiters += 1
        try:
            # asyncio.wait, unlike awaiting the task, never cancels it.
            done, _ = await asyncio.wait((flight.task,), timeout=timer)
        finally:
            flight.waiters -= 1
            if not flight.waiters and not flight.task.done():
                self._forget(flight)  # no later call may join a cancelled query
                flight.task.cancel()
        if not done:
            raise dns.resolver.LifetimeTimeout(timeout=timer, errors=[])  # type: ignore[no-untyped-call]
        return flight.task.result()


def _handled(answer: dns.resolver.Answer, raise_on_no_answer: bool) -> dns.resolver.Answer:
    # As dnspython treats a cached answer (resolver.py, _Resolution.next_request).
    if answer.rrset is None and raise_on_no_answer:
        raise dns.resolver.NoAnswer(response=answer.response)  # type: ignore[no-untyped-call]
    return answer
