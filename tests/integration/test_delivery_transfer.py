"""The DATA transfer over real sockets: what the receiving MX gets, byte for byte.

A raw receiver records the mail data exactly as it crossed the wire (before any
un-stuffing); the lab's STARTTLS sink checks that a large message crossing many chunk
boundaries arrives intact over TLS. IDs refer to /work/shared/RFC-CHECKLIST.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.nameserver
import pytest

from policy.model import Mode, Policy, PolicyLookup
from policy.webpki import client_context, unverified_context
from relay.delivery.attempt import AttemptSettings, attempt_domain
from relay.delivery.decision import decide_tls
from relay.delivery.envelope import Envelope
from relay.delivery.outcome import Bounced, Delivered, Outcome
from relay.delivery.transfer import CHUNK, encode_data
from tests.support.world import World


@dataclass
class RawReceiver:
    """A scripted plain-SMTP receiver keeping each DATA section as raw wire bytes."""

    early_reply: bytes | None = None  # sent right after the first data bytes arrive
    raw: list[bytes] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw.test ESMTP\r\n")
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-raw.test\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await self._data(reader, writer)
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 OK\r\n")
                await writer.drain()
        writer.close()

    async def _data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.early_reply is not None:
            await reader.read(1)
            writer.write(self.early_reply)
            await writer.drain()
        raw = await reader.readuntil(b"\r\n.\r\n")
        self.raw.append(raw if self.early_reply is None else b"?" + raw)
        if self.early_reply is None:
            writer.write(b"250 2.0.0 stored\r\n")


@pytest.fixture
async def raw_mx(world: World) -> AsyncIterator[tuple[str, RawReceiver]]:
    """`raw.test MX 10 mx.raw.test` served by a RawReceiver; yields (domain, receiver)."""
    domain, ip, receiver = "raw.test", world.allocate_ip(), RawReceiver()
    world.mx_record(domain, (10, f"mx.{domain}"))
    world.dns.add(f"mx.{domain}", "A", ip)
    server = await asyncio.start_server(receiver.serve, ip, world.delivery_port, limit=1 << 24)
    try:
        yield domain, receiver
    finally:
        server.close()
        await server.wait_closed()


async def _send(world: World, domain: str, data: bytes, lookup: PolicyLookup) -> Outcome:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", world.dns.port)]
    settings = AttemptSettings(
        port=world.delivery_port,
        helo="relay.test",
        verified_ctx=client_context(str(world.pki.ca_file)),
        unverified_ctx=unverified_context(),
        connect_timeout=5.0,
        command_timeout=5.0,
        dns_timeout=2.0,
        allow_loopback_mx=True,
    )
    outcomes = await attempt_domain(
        domain,
        Envelope("app@src.test", [f"u@{domain}"], data),
        decision=decide_tls(lookup, None, tls_required_no=False),
        settings=settings,
        resolver=resolver,
        rng=random.Random(1),
    )
    (outcome,) = outcomes.values()
    return outcome


def _no_policy(domain: str) -> PolicyLookup:
    return PolicyLookup(domain=domain, policy=None, policy_id=None, source="none")


def _boundary_message(chunks: int) -> bytes:
    """A CRLF message with short lines; at chunk boundaries (encoder input positions) a
    dot line starts just before, at or just after the boundary, so that a boundary falls
    between a CR and its LF, and right before a leading dot."""
    out = bytearray(b"Subject: boundaries\r\n\r\n.first\r\n")
    targets = [CHUNK * n + (n % 3) - 1 for n in range(1, chunks)]
    for n, target in enumerate(targets):
        while (left := target - len(out)) > 0:
            size = 78 if left >= 158 else (left // 2 if left >= 4 else left)
            out += b"x" * (size - 2) + b"\r\n"
        out += b".\r\n" if n % 2 else b"..dots\r\n"
    return bytes(out) + b"last\r\n"


async def test_wire_bytes_are_dot_stuffed_crlf_across_chunks(
    world: World, raw_mx: tuple[str, RawReceiver]
) -> None:
    # SMTP-14, SMTP-15, SMUG-06 over the wire, with chunk boundaries inside the message.
    domain, receiver = raw_mx
    data = _boundary_message(4)
    outcome = await _send(world, domain, data, _no_policy(domain))
    assert isinstance(outcome, Delivered), outcome
    (wire,) = receiver.raw
    assert wire == encode_data(data)
    assert b"\r\n..first\r\n" in wire
    assert wire.count(b"\r") == wire.count(b"\r\n") == wire.count(b"\n")
    # Un-stuffing what crossed the wire gives the stored message back, byte for byte.
    lines = wire[: -len(b".\r\n")].split(b"\r\n")
    assert b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines) == data


async def test_bare_line_ends_in_stored_data_leave_as_crlf(
    world: World, raw_mx: tuple[str, RawReceiver]
) -> None:
    # SMUG-06: normalise first, then stuff: a hidden "\n.\n" becomes "\r\n..\r\n".
    domain, receiver = raw_mx
    outcome = await _send(world, domain, b"Subject: x\r\n\r\na\n.\nb\rc", _no_policy(domain))
    assert isinstance(outcome, Delivered), outcome
    assert receiver.raw == [b"Subject: x\r\n\r\na\r\n..\r\nb\r\nc\r\n.\r\n"]


async def test_reply_before_the_end_of_data_decides(
    world: World, raw_mx: tuple[str, RawReceiver]
) -> None:
    # A server may refuse while the data is still coming (RFC 5321 §4.2.5 permits an
    # early reply only in error; some do): the reply must not be lost.
    domain, receiver = raw_mx
    receiver.early_reply = b"552 5.3.4 message too big for us\r\n"
    data = b"Subject: big\r\n\r\n" + (b"y" * 76 + b"\r\n") * ((8 << 20) // 78)  # fills buffers
    outcome = await _send(world, domain, data, _no_policy(domain))
    assert isinstance(outcome, Bounced), outcome
    assert outcome.reason.status == "5.3.4"
    assert receiver.raw
    assert receiver.raw[0].endswith(b"\r\n.\r\n")


async def test_large_message_arrives_intact_over_verified_tls(world: World) -> None:
    # Flow control over TLS: many chunks, the sink un-stuffs, the message is unchanged.
    domain = "large-tls.test"
    sink = await world.sts_domain(domain, mode=None)
    data = _boundary_message(40)
    policy = Policy(mode=Mode.ENFORCE, mx=(f"mx1.{domain}",), max_age=86400, text="")
    lookup = PolicyLookup(domain=domain, policy=policy, policy_id="1", source="cached")
    outcome = await _send(world, domain, data, lookup)
    assert isinstance(outcome, Delivered), outcome
    assert outcome.reason.hop is not None
    assert outcome.reason.hop.verified
    (received,) = sink.messages
    assert received.data == data
