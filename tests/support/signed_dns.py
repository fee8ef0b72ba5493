"""The lab DNS server with DNSSEC: zones signed on the fly, for DANE tests (RFC 7672).

Owns signing: one ECDSA P-256 key per signed apex (a combined KSK/ZSK, flags 257), its
DNSKEY at the apex with an SOA, and for every query with the DO bit under a signed apex:
an RRSIG beside each answer RRset; for a negative answer the apex SOA and an NSEC proving
NODATA ("black lies", as Cloudflare serves: a name that does not exist is answered as
NODATA with an NSEC whose next name is `\\000.<qname>`), all signed. Names outside the
signed apexes stay unsigned (an insecure answer, since the validating resolver has no trust
anchor for them). `bogus(name, type)` signs that RRset with a corrupted signature, so a
validating resolver answers SERVFAIL. Knows nothing of TLSA semantics or SMTP.
"""

from __future__ import annotations

import datetime

import dns.dnssec
import dns.dnssectypes
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from cryptography.hazmat.primitives.asymmetric import ec
from dns.rdtypes.ANY.NSEC import NSEC, Bitmap
from dns.rdtypes.ANY.RRSIG import RRSIG

from tests.support.dns import DnsServer, _norm

_ALGORITHM = dns.dnssectypes.Algorithm.ECDSAP256SHA256


class _Apex:
    def __init__(self, name: str) -> None:
        self.name = dns.name.from_text(_norm(name))
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.dnskey = dns.dnssec.make_dnskey(self.key.public_key(), _ALGORITHM, flags=257)

    @property
    def trust_anchor(self) -> str:
        """The anchor as unbound's `trust-anchor:` takes it (a DNSKEY record)."""
        return f"{self.name.to_text()} DNSKEY {self.dnskey.to_text()}"


class SignedDnsServer(DnsServer):
    """`DnsServer` plus `sign(apex)`: answers under a signed apex carry DNSSEC records."""

    def __init__(self, host: str = "127.0.0.1", *, default_ttl: int = 0) -> None:
        super().__init__(host, default_ttl=default_ttl)
        self._apexes: list[_Apex] = []
        self._bogus: set[tuple[str, str]] = set()
        self._do = False

    def sign(self, apex: str) -> str:
        """Sign everything at and below `apex` from now on; returns its trust anchor."""
        zone = _Apex(apex)
        self._apexes.append(zone)
        origin = zone.name.to_text()
        self.add(origin, "SOA", f"ns.{origin} hostmaster.{origin} 1 3600 600 86400 0")
        self._put(origin, "DNSKEY", zone.dnskey, self.default_ttl)
        return zone.trust_anchor

    @property
    def trust_anchors(self) -> list[str]:
        return [z.trust_anchor for z in self._apexes]

    def bogus(self, name: str, rtype: str) -> None:
        """Serve (name, rtype) with a signature that does not verify (RFC 4035 §5.5)."""
        self._bogus.add((_norm(name), rtype.upper()))

    # -- answering -------------------------------------------------------------------------

    def answer(self, wire: bytes, *, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
            self._do = query.edns >= 0 and bool(query.ednsflags & dns.flags.DO)
        except dns.exception.DNSException:
            self._do = False
        return super().answer(wire, tcp=tcp)

    def _fill(self, response: dns.message.Message, qname: str, qtype: str) -> None:
        super()._fill(response, qname, qtype)
        zone = self._apex_of(qname)
        if zone is None:
            return
        if self._do:
            response.ednsflags |= dns.flags.DO
        negative = response.rcode() == dns.rcode.NXDOMAIN or not any(
            rrset.name == dns.name.from_text(qname) for rrset in response.answer
        )
        if negative:
            response.set_rcode(dns.rcode.NOERROR)  # black lie: NODATA with an NSEC proof
            response.answer = []
            response.authority = [self._soa(zone), self._nsec(qname)]
        if not self._do:
            return
        response.answer = self._with_signatures(response.answer, zone)
        response.authority = self._with_signatures(response.authority, zone)

    def _apex_of(self, qname: str) -> _Apex | None:
        name = dns.name.from_text(qname)
        for zone in self._apexes:
            if name.is_subdomain(zone.name):
                return zone
        return None

    def _soa(self, zone: _Apex) -> dns.rrset.RRset:
        # RFC 2308 §5: the negative TTL is min(SOA TTL, SOA minimum): the server's default
        # TTL (0 in tests, which change records mid-run; 300 in benchmarks).
        _ttl, rdatas = self._zone[zone.name.to_text().lower()]["SOA"]
        soa = [rd.replace(minimum=self.default_ttl) for rd in rdatas]
        return dns.rrset.from_rdata_list(zone.name, self.default_ttl, soa)

    def _nsec(self, qname: str) -> dns.rrset.RRset:
        name = dns.name.from_text(qname)
        node = self._zone.get(qname, {})
        types = {dns.rdatatype.from_text(t) for t in node} | {
            dns.rdatatype.NSEC,
            dns.rdatatype.RRSIG,
        }
        types.discard(dns.rdatatype.CNAME)
        windows = Bitmap.from_rdtypes(sorted(types))
        following = dns.name.Name((b"\x00", *name.labels))
        rdata = NSEC(dns.rdataclass.IN, dns.rdatatype.NSEC, following, windows)  # type: ignore[no-untyped-call]
        return dns.rrset.from_rdata_list(name, self.default_ttl, [rdata])

    def _with_signatures(self, rrsets: list[dns.rrset.RRset], zone: _Apex) -> list[dns.rrset.RRset]:
        out: list[dns.rrset.RRset] = []
        for rrset in rrsets:
            out.append(rrset)
            if rrset.rdtype == dns.rdatatype.RRSIG or not rrset.name.is_subdomain(zone.name):
                continue
            out.append(self._signature(rrset, zone))
        return out

    def _signature(self, rrset: dns.rrset.RRset, zone: _Apex) -> dns.rrset.RRset:
        now = datetime.datetime.now(datetime.UTC)
        rrsig = dns.dnssec.sign(
            rrset,
            zone.key,
            zone.name,
            zone.dnskey,
            inception=now - datetime.timedelta(hours=1),
            expiration=now + datetime.timedelta(days=1),
        )
        key = (rrset.name.to_text().lower(), dns.rdatatype.to_text(rrset.rdtype))
        served: dns.rdata.Rdata = rrsig
        if key in self._bogus:
            served = rrsig.replace(signature=bytes(b ^ 0x5A for b in rrsig.signature))
        assert isinstance(served, RRSIG)
        return dns.rrset.from_rdata_list(rrset.name, rrset.ttl, [served])
