"""A small authoritative-and-recursive-looking DNS server for the lab (dnspython wire format).

Owns one in-memory zone served over UDP and TCP on the same loopback port, with failure
injection per (name, type). Answers like a recursive resolver would: CNAME chains inside the
zone are followed, NXDOMAIN and NODATA are told apart (RFC 8020: a name with children exists).
Knows nothing about MTA-STS or SMTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from typing import Final, Literal, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.TXT import TXT

FailureMode = Literal["servfail", "timeout", "garbage", "truncate", "nxdomain"]
FAILURE_MODES: Final = frozenset({"servfail", "timeout", "garbage", "truncate", "nxdomain"})
_MAX_CHAIN: Final = 8
_UDP_SIZE: Final = 512


def _norm(name: str) -> str:
    """Lower-case absolute form with trailing dot: the zone's key."""
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


class DnsServer:
    """DNS on 127.0.0.1 (UDP + TCP, one ephemeral port) serving an editable zone."""

    def __init__(
        self, host: str = "127.0.0.1", *, default_ttl: int = 0, udp_delay: float = 0.0
    ) -> None:
        self.host = host
        # TTL 0 by default: tests change records mid-run and expect the relay's DNS cache
        # to see the change at once; benchmarks publish realistic TTLs (300).
        self.default_ttl = default_ttl
        # Seconds each UDP answer is sent after its query came (a slow server: queries
        # from several callers then overlap).
        self.udp_delay = udp_delay
        self.port = 0
        # name -> rtype -> (ttl, rdatas)
        self._zone: dict[str, dict[str, tuple[int, list[dns.rdata.Rdata]]]] = {}
        # (name, rtype or "*") -> mode
        self._failures: dict[tuple[str, str], FailureMode] = {}
        self.queries: list[tuple[str, str]] = []
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            transport, _proto = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self.host, 0)
            )
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError:
                transport.close()
                continue
            self._udp, self.port = transport, port
            return
        raise RuntimeError("could not bind UDP and TCP on one port")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for task in list(self._tcp_tasks):
                task.cancel()
            await asyncio.gather(*self._tcp_tasks, return_exceptions=True)
            await self._tcp.wait_closed()
            self._tcp = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    # -- zone editing --------------------------------------------------------------------

    def add(self, name: str, rtype: str, value: str, ttl: int | None = None) -> None:
        """Add one record; value in zone-file form ("10 mx1.d.test." for MX).

        Relative names in values are taken as absolute. A TXT value is one string
        (split in 255-byte pieces if longer); use `txt()` for explicit multi-string records.
        """
        rtype = rtype.upper()
        if rtype == "TXT":
            self.txt(name, value, ttl=ttl)
            return
        rdata = dns.rdata.from_text(
            dns.rdataclass.IN,
            dns.rdatatype.from_text(rtype),
            value,
            origin=dns.name.root,
            relativize=False,
        )
        self._put(name, rtype, rdata, self.default_ttl if ttl is None else ttl)

    def txt(self, name: str, *records: str | tuple[str, ...], ttl: int | None = None) -> None:
        """Add TXT records; each is a str or a tuple of strings (one multi-string record)."""
        for record in records:
            parts = (record,) if isinstance(record, str) else record
            strings: list[bytes] = []
            for part in parts:
                raw = part.encode()
                chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
                strings.extend(chunks)
            rdata = TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)
            self._put(name, "TXT", rdata, self.default_ttl if ttl is None else ttl)

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Remove all records of `rtype` at `name`, or the whole name when rtype is None."""
        key = _norm(name)
        if rtype is None:
            self._zone.pop(key, None)
            return
        node = self._zone.get(key)
        if node is not None:
            node.pop(rtype.upper(), None)
            if not node:
                del self._zone[key]

    def fail(self, name: str, rtype: str | None, mode: FailureMode) -> None:
        """Make queries for (name, rtype) fail; rtype None means every type at that name."""
        if mode not in FAILURE_MODES:
            raise ValueError(f"unknown failure mode {mode!r}")
        self._failures[(_norm(name), (rtype or "*").upper())] = mode

    def clear_failure(self, name: str, rtype: str | None) -> None:
        self._failures.pop((_norm(name), (rtype or "*").upper()), None)

    def queried(self, name: str, rtype: str | None = None) -> bool:
        """Whether a query for name (and rtype, if given) arrived."""
        want = _norm(name).rstrip(".")
        return any(n == want and (rtype is None or t == rtype.upper()) for n, t in self.queries)

    def _put(self, name: str, rtype: str, rdata: dns.rdata.Rdata, ttl: int) -> None:
        node = self._zone.setdefault(_norm(name), {})
        _, rdatas = node.get(rtype, (ttl, []))
        if rdata not in rdatas:
            rdatas.append(rdata)
        node[rtype] = (ttl, rdatas)

    # -- answering -----------------------------------------------------------------------

    def answer(self, wire: bytes, *, tcp: bool) -> bytes | None:
        """The reply to one query in wire form, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None
        question = query.question[0]
        qname = question.name.to_text().lower()
        qtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((qname.rstrip("."), qtype))
        mode = self._failure_for(qname, qtype)
        if mode == "timeout":
            return None
        if mode == "garbage" or (mode == "truncate" and tcp):
            return os.urandom(23)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        if mode == "truncate":
            response.flags |= dns.flags.TC
            return response.to_wire()
        if mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        if mode == "nxdomain":
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()
        self._fill(response, qname, qtype)
        return self._encode(response, query, tcp=tcp)

    def _failure_for(self, qname: str, qtype: str) -> FailureMode | None:
        return self._failures.get((qname, qtype)) or self._failures.get((qname, "*"))

    def _fill(self, response: dns.message.Message, qname: str, qtype: str) -> None:
        current = qname
        for _ in range(_MAX_CHAIN):
            node = self._zone.get(current)
            if node is None:
                if not self._has_children(current):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                return
            if qtype in node:
                response.answer.append(self._rrset(current, qtype, node[qtype]))
                return
            if "CNAME" not in node or qtype == "CNAME":
                return  # NODATA: the name exists with other types
            response.answer.append(self._rrset(current, "CNAME", node["CNAME"]))
            target = node["CNAME"][1][0]
            current = target.target.to_text().lower()  # type: ignore[attr-defined]

    def _has_children(self, name: str) -> bool:
        return any(key.endswith("." + name) for key in self._zone)

    @staticmethod
    def _rrset(name: str, rtype: str, entry: tuple[int, list[dns.rdata.Rdata]]) -> dns.rrset.RRset:
        ttl, rdatas = entry
        return dns.rrset.from_rdata_list(dns.name.from_text(name), ttl, rdatas)

    @staticmethod
    def _encode(response: dns.message.Message, query: dns.message.Message, *, tcp: bool) -> bytes:
        if tcp:
            return response.to_wire()
        limit = max(_UDP_SIZE, query.payload if query.edns >= 0 else _UDP_SIZE)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            # RFC 1035 §4.2.1: too big for UDP -> empty answer with TC, client retries on TCP.
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC | dns.flags.RA
            return truncated.to_wire()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tcp_tasks.add(task)
        try:
            while True:
                header = await reader.readexactly(2)
                wire = await reader.readexactly(struct.unpack("!H", header)[0])
                reply = self.answer(wire, tcp=True)
                if reply is None:
                    continue  # "timeout": keep the connection open and silent
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # 3.11's selector datagram transport does not subclass DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self._server.answer(data, tcp=False)
        if reply is None or self._transport is None:
            return
        if self._server.udp_delay > 0:
            loop = asyncio.get_running_loop()
            loop.call_later(self._server.udp_delay, self._transport.sendto, reply, addr)
        else:
            self._transport.sendto(reply, addr)
