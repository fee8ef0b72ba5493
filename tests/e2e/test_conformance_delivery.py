"""Conformance sweep of the delivery side, end to end: RFC-CHECKLIST.md §1.5-§1.7 (MX host
validation, certificates and TLS, applying the mode), §5 (DSN), §6 (SMTP client) and §7
(null MX), where no other test already proves the item through the relay.

`sts-relay serve` runs as a subprocess against the lab (real DNS, HTTPS policy host, STARTTLS
MX sinks on loopback); assertions read its JSON log, the DNS query log, what each MX sink
received and the DSNs that reach the sender's MX (the bounce sink). Each test starts one
relay and exercises several independent domains with it. Test names carry the checklist IDs;
the items proven elsewhere are listed in the sweep report, not repeated here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email
import email.message
import email.policy
import re
import ssl
from collections.abc import Sequence

import aiosmtplib
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import Event, RelayProcess
from tests.support.smtp import MxSink, ReceivedMessage
from tests.support.waiting import eventually
from tests.support.world import World

SENDER = "app@src.test"
RETRY_FAST = {"queue": {"retry_schedule": [1]}}


# --- helpers --------------------------------------------------------------------------


def _status_part(dsn: ReceivedMessage) -> tuple[email.message.EmailMessage, str]:
    """The DSN and its `message/delivery-status` part as text, folded lines unfolded."""
    msg = email.message_from_bytes(dsn.data, policy=email.policy.SMTP)
    assert isinstance(msg, email.message.EmailMessage)
    assert msg.get_content_type() == "multipart/report"
    parts = list(msg.iter_parts())
    assert parts[1].get_content_type() == "message/delivery-status"
    return msg, re.sub(r"\r?\n[ \t]+", " ", parts[1].as_string())


def _final_recipients(status: str) -> list[str]:
    return re.findall(r"Final-Recipient: rfc822; (\S+)", status)


def _dsns_about(world: World, *rcpts: str) -> list[ReceivedMessage]:
    """DSNs at the bounce sink that list any of `rcpts` as a Final-Recipient."""
    return [
        m
        for m in world.bounce_sink.messages
        if set(_final_recipients(_status_part(m)[1])) & set(rcpts)
    ]


async def _deferred_twice(relay: RelayProcess, rcpt: str) -> Event:
    """The second deferral of `rcpt`: a retry happened and still did not deliver."""
    return await relay.wait_for(
        lambda e: (
            e["event"] == "delivery"
            and e["rcpt"] == rcpt
            and e["status"] == "deferred"
            and e["attempt"] >= 2
        ),
        within=15,
    )


def _serve_leaf(world: World, tag: str, cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    path = world.tmp_dir / f"leaf-{tag}.pem"
    path.write_bytes(key_pem + cert_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(path))
    return ctx


def _leaf_without_intermediate(world: World, host: str) -> ssl.SSLContext:
    """A leaf issued by an intermediate of the test CA; the server does not send it."""
    leaf = world.pki.ca.create_child_ca().issue_cert(host)
    only_leaf = leaf.cert_chain_pems[0].bytes()
    return _serve_leaf(world, host, only_leaf, leaf.private_key_pem.bytes())


def _leaf_with_raw_san(world: World, san: str) -> ssl.SSLContext:
    """A test-CA leaf whose SAN is `san` verbatim (trustme refuses `mx*.` names)."""
    ca_cert = x509.load_pem_x509_certificate(world.pki.ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(world.pki.ca.private_key_pem.bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lab")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return _serve_leaf(world, "raw", cert.public_bytes(serialization.Encoding.PEM), key_pem)


async def _sink_with_context(world: World, host: str, ctx: ssl.SSLContext) -> MxSink:
    """A STARTTLS sink for `host` presenting `ctx`, published in DNS like `add_mx` does."""
    sink = MxSink(world.allocate_ip(), world.delivery_port, hostname=host, cert=ctx)
    await sink.start()
    world.dns.add(host, "A", sink.ip)
    world.sinks[host] = sink
    return sink


class ScriptedMx:
    """A hand-written SMTP server for what the aiosmtpd sinks cannot be made to do: break
    the TLS handshake after `220` to STARTTLS, inject plaintext after that `220`
    (RFC 3207 §4.2), refuse MAIL per sender, and keep DATA exactly as it came on the wire
    (still dot-stuffed). Records every command line with whether it came over TLS."""

    def __init__(
        self,
        ip: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        starttls: str = "ok",  # "ok", "abort" (close after 220), "inject"
        mail_replies: dict[str, str] | None = None,
    ) -> None:
        self.ip, self.port, self.tls, self.starttls = ip, port, tls, starttls
        self.mail_replies = mail_replies or {}
        self.sessions: list[list[tuple[bool, str]]] = []
        self.raw_data: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.ip, self.port)

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def commands(self, verb: str) -> list[tuple[bool, str]]:
        return [c for s in self.sessions for c in s if c[1].upper().startswith(verb)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        log: list[tuple[bool, str]] = []
        self.sessions.append(log)
        writer.write(b"220 scripted ESMTP\r\n")
        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
            async with asyncio.timeout(30):
                await self._converse(reader, writer, log)
        writer.close()

    async def _converse(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        log: list[tuple[bool, str]],
    ) -> None:
        secure = False
        while line := await reader.readline():
            text = line.decode("ascii", "replace").rstrip("\r\n")
            log.append((secure, text))
            verb = text.split(" ", 1)[0].upper()
            if verb == "EHLO":
                offer = b"250-STARTTLS\r\n" if self.tls is not None and not secure else b""
                writer.write(b"250-scripted\r\n" + offer + b"250 8BITMIME\r\n")
            elif verb == "STARTTLS" and self.tls is not None:
                if self.starttls == "abort":
                    writer.write(b"220 go ahead\r\n")
                    await writer.drain()
                    writer.transport.abort()
                    return
                extra = b"250-injected\r\n250 AUTH PLAIN\r\n" if self.starttls == "inject" else b""
                writer.write(b"220 go ahead\r\n" + extra)
                await writer.drain()
                await writer.start_tls(self.tls)
                secure = True
            elif verb == "MAIL":
                sender = text[text.find("<") + 1 : text.find(">")]
                writer.write(self.mail_replies.get(sender, "250 2.1.0 OK").encode() + b"\r\n")
            elif verb == "DATA":
                writer.write(b"354 go on\r\n")
                await writer.drain()
                raw = b""
                while (chunk := await reader.readline()) != b".\r\n":
                    if not chunk:
                        return
                    raw += chunk
                self.raw_data.append(raw)
                writer.write(b"250 2.0.0 OK scripted-id\r\n")
            elif verb == "QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            elif verb in ("RCPT", "RSET", "NOOP"):
                writer.write(b"250 2.0.0 OK\r\n")
            else:
                writer.write(b"502 5.5.1 not here\r\n")
            await writer.drain()


async def _scripted(
    world: World,
    domain: str,
    *,
    tls: ssl.SSLContext | None = None,
    starttls: str = "ok",
    mail_replies: dict[str, str] | None = None,
) -> ScriptedMx:
    """`MX 10 mx1.<domain>` served by a ScriptedMx on a fresh IP (stopped by the test)."""
    host = f"mx1.{domain}"
    world.mx_record(domain, (10, host))
    server = ScriptedMx(
        world.allocate_ip(),
        world.delivery_port,
        tls=tls,
        starttls=starttls,
        mail_replies=mail_replies,
    )
    await server.start()
    world.dns.add(host, "A", server.ip)
    return server


async def _submit(
    relay: RelayProcess,
    rcpts: Sequence[str],
    *,
    sender: str = SENDER,
    body: bytes = b"Subject: sweep\r\n\r\nhello\r\n",
    rcpt_options: Sequence[str] = (),
) -> None:
    client = aiosmtplib.SMTP(hostname=relay.host, port=relay.port, start_tls=False, timeout=10)
    async with client:
        await client.sendmail(sender, list(rcpts), body, rcpt_options=list(rcpt_options))


# --- §1.5 MX host validation ----------------------------------------------------------


async def test_sts_80_82_84_only_matching_hosts_are_used_in_preference_order(
    world: World, start_relay: StartRelay
) -> None:
    # STS-80: MX 10 evil (valid cert, not in the policy), MX 20 mx1 → mx1, evil untouched.
    evil = await world.add_mx("evil.sts80.test", world.allocate_ip())
    mx1 = await world.add_mx("mx1.sts80.test", world.allocate_ip())
    world.mx_record("sts80.test", (10, "evil.sts80.test"), (20, "mx1.sts80.test"))
    world.publish_policy("sts80.test")
    # STS-82: case and the root dot of the MX name are ignored.
    caps = await world.add_mx("mx1.sts82.test", world.allocate_ip())
    world.mx_record("sts82.test", (10, "MX1.STS82.Test."))
    world.publish_policy("sts82.test")
    # STS-84 B: the preferred host works, the second is never contacted.
    first = await world.add_mx("mx1.sts84.test", world.allocate_ip())
    second = await world.add_mx("mx2.sts84.test", world.allocate_ip())
    world.mx_record("sts84.test", (10, "mx1.sts84.test"), (20, "mx2.sts84.test"))
    world.publish_policy("sts84.test", mx=["mx1.sts84.test", "mx2.sts84.test"])
    relay = await start_relay()

    await relay.send(["u@sts80.test", "u@sts82.test", "u@sts84.test"])

    sent80 = await relay.delivery("u@sts80.test", "sent")
    assert (sent80["mx"], sent80["verified"], sent80["sts_mode"]) == (
        "mx1.sts80.test",
        True,
        "enforce",
    )
    assert evil.connections == 0
    assert not world.dns.queried("evil.sts80.test", "A")
    assert len(mx1.messages) == 1
    sent82 = await relay.delivery("u@sts82.test", "sent")
    assert sent82["verified"] is True
    assert caps.messages[0].sni == "mx1.sts82.test"  # STS-97: no trailing dot in SNI
    sent84 = await relay.delivery("u@sts84.test", "sent")
    assert sent84["mx"] == "mx1.sts84.test"
    assert len(first.messages) == 1
    assert second.connections == 0


async def test_sts_81_83_87_101_hosts_outside_the_policy_are_refused(
    world: World, start_relay: StartRelay
) -> None:
    # STS-81: `*.sts81.test` matches exactly one label: a.b.sts81.test (valid cert) does not.
    deep = await world.add_mx("a.b.sts81.test", world.allocate_ip())
    world.mx_record("sts81.test", (10, "a.b.sts81.test"))
    world.publish_policy("sts81.test", mx=["*.sts81.test"])
    one = await world.add_mx("mx.sts81one.test", world.allocate_ip())
    world.mx_record("sts81one.test", (10, "mx.sts81one.test"))
    world.publish_policy("sts81one.test", mx=["*.sts81one.test"])
    # STS-83: the MX name itself is matched, not the target of its CNAME.
    target = await world.add_mx("mx1.sts83.test", world.allocate_ip())
    world.dns.add("alias.sts83.test", "CNAME", "mx1.sts83.test.")
    world.mx_record("sts83.test", (10, "alias.sts83.test"))
    world.publish_policy("sts83.test")
    # STS-87: implicit MX; the domain name itself must match a pattern.
    implicit = await world.add_mx("sts87.test", world.allocate_ip())
    world.publish_policy("sts87.test", mx=["sts87.test"])
    implicit_no = await world.add_mx("sts87no.test", world.allocate_ip())
    world.publish_policy("sts87no.test")
    # STS-101: `*.sts101.test` is no host name, even with a matching pattern and SAN.
    star = await world.add_mx("*.sts101.test", world.allocate_ip())
    world.mx_record("sts101.test", (10, "*.sts101.test"))
    world.publish_policy("sts101.test", mx=["*.sts101.test"])
    relay = await start_relay()

    await relay.send(["u@sts81.test", "u@sts81one.test", "u@sts83.test"])
    await relay.send(["u@sts87.test", "u@sts87no.test", "u@sts101.test"])

    for rcpt, expected in [
        ("u@sts81.test", "validation-failure"),
        ("u@sts83.test", "validation-failure"),
        ("u@sts87no.test", "validation-failure"),
        ("u@sts101.test", "validation-failure"),
    ]:
        event = await relay.delivery(rcpt, "deferred")
        assert (event["tlsrpt_result"], event["sts_mode"]) == (expected, "enforce"), event
    assert deep.connections == 0
    assert target.connections == 0
    assert implicit_no.connections == 0
    assert star.mail_commands == 0
    assert (await relay.delivery("u@sts81one.test", "sent"))["verified"] is True
    assert len(one.messages) == 1
    sent87 = await relay.delivery("u@sts87.test", "sent")
    assert (sent87["mx"], sent87["verified"]) == ("sts87.test", True)
    assert implicit.messages[0].sni == "sts87.test"
    assert target.messages == []


async def test_sts_85_certificate_for_another_pattern_is_refused(
    world: World, start_relay: StartRelay
) -> None:
    # Literal policy `mx1`: mx2 presents a valid certificate for mx1 but matches no pattern.
    literal = await world.add_mx(
        "mx2.sts85.test", world.allocate_ip(), cert_names=["mx1.sts85.test"]
    )
    world.mx_record("sts85.test", (10, "mx2.sts85.test"))
    world.publish_policy("sts85.test")
    # Wildcard policy: mx2 matches, but its certificate names mx1, not the host dialled.
    wild = await world.add_mx(
        "mx2.sts85w.test", world.allocate_ip(), cert_names=["mx1.sts85w.test"]
    )
    world.mx_record("sts85w.test", (10, "mx2.sts85w.test"))
    world.publish_policy("sts85w.test", mx=["*.sts85w.test"])
    relay = await start_relay()

    await relay.send(["u@sts85.test", "u@sts85w.test"])

    event = await relay.delivery("u@sts85.test", "deferred")
    assert event["tlsrpt_result"] == "validation-failure"
    assert literal.connections == 0
    event = await relay.delivery("u@sts85w.test", "deferred")
    assert event["tlsrpt_result"] == "certificate-host-mismatch"
    assert event["mx"] == "mx2.sts85w.test"
    assert wild.connections >= 1
    assert wild.mail_commands == 0
    assert relay.find(event="delivery", status="sent") == []


async def test_sts_86_113_114_policy_naming_no_current_mx_only_defers(
    world: World, start_relay: StartRelay
) -> None:
    # The provider changed: the policy still lists old.sts86.test. The domain's own A
    # record (another sink) is no fallback either (STS-114, SMTP-04).
    current = await world.sts_domain("sts86.test")
    world.publish_policy("sts86.test", mx=["old.sts86.test"])
    apex = await world.add_mx("sts86.test", world.allocate_ip())
    relay = await start_relay(**RETRY_FAST)

    await relay.send(["u@sts86.test"])

    event = await _deferred_twice(relay, "u@sts86.test")
    assert event["tlsrpt_result"] == "validation-failure"
    assert current.connections == 0
    assert apex.connections == 0
    hosts = {e["mx"] for e in relay.find(event="delivery", rcpt="u@sts86.test")}
    assert hosts == {"mx1.sts86.test"}
    # STS-113: an enforce failure is no bounce; no DSN before the lifetime ends.
    assert relay.find(event="delivery", status="bounced") == []
    assert relay.find(event="bounce_queued") == []


# --- §1.6 certificate and TLS checks --------------------------------------------------


async def test_sts_91_92_93_94_95_96_98_bad_tls_defers_and_a_wildcard_san_passes(
    world: World, start_relay: StartRelay
) -> None:
    failing: dict[str, str] = {}  # domain -> expected RFC 8460 result
    sinks: list[MxSink] = []
    for domain, kind, names, result in [
        ("sts93.test", "future", None, "certificate-not-trusted"),  # not yet valid
        ("sts94.test", "good", ["other.test"], "certificate-host-mismatch"),
        ("sts95.test", "cn_only", None, "certificate-host-mismatch"),  # no SAN
        ("sts98.test", "tls11", None, "validation-failure"),  # TLS 1.1 at most
    ]:
        host = f"mx1.{domain}"
        world.mx_record(domain, (10, host))
        sinks.append(
            await world.add_mx(host, world.allocate_ip(), cert_kind=kind, cert_names=names)
        )
        world.publish_policy(domain)
        failing[domain] = result
    # STS-92 variant: the intermediate is not sent, so no chain to the trusted root.
    world.mx_record("sts92.test", (10, "mx1.sts92.test"))
    ctx = _leaf_without_intermediate(world, "mx1.sts92.test")
    sinks.append(await _sink_with_context(world, "mx1.sts92.test", ctx))
    world.publish_policy("sts92.test")
    failing["sts92.test"] = "certificate-not-trusted"
    # STS-96: a partial-label wildcard SAN `mx*.sts96.test` does not name mx1.sts96.test.
    world.mx_record("sts96.test", (10, "mx1.sts96.test"))
    sinks.append(
        await _sink_with_context(
            world, "mx1.sts96.test", _leaf_with_raw_san(world, "mx*.sts96.test")
        )
    )
    world.publish_policy("sts96.test")
    failing["sts96.test"] = "certificate-host-mismatch"
    # STS-94: a wildcard certificate `*.sts94wild.test` covers mx1.sts94wild.test ...
    wild_ok = await world.add_mx(
        "mx1.sts94wild.test", world.allocate_ip(), cert_names=["*.sts94wild.test"]
    )
    world.mx_record("sts94wild.test", (10, "mx1.sts94wild.test"))
    world.publish_policy("sts94wild.test")
    # ... but not a.b.sts94deep.test (policy `*.b.sts94deep.test`, SAN `*.sts94deep.test`).
    world.mx_record("sts94deep.test", (10, "a.b.sts94deep.test"))
    sinks.append(
        await world.add_mx(
            "a.b.sts94deep.test", world.allocate_ip(), cert_names=["*.sts94deep.test"]
        )
    )
    world.publish_policy("sts94deep.test", mx=["*.b.sts94deep.test"])
    failing["sts94deep.test"] = "certificate-host-mismatch"
    # STS-91 variant: 220 to STARTTLS, then the connection dies mid-handshake.
    aborts = await _scripted(
        world,
        "sts91.test",
        tls=world.pki.server_context(["mx1.sts91.test"]),
        starttls="abort",
    )
    world.publish_policy("sts91.test")
    relay = await start_relay()
    try:
        await relay.send([f"u@{d}" for d in [*failing, "sts91.test"]])
        await relay.send(["u@sts94wild.test"])

        for domain, result in failing.items():
            event = await relay.delivery(f"u@{domain}", "deferred")
            assert (event["tlsrpt_result"], event["verified"]) == (result, False), event
        aborted = await relay.delivery("u@sts91.test", "deferred")
        assert aborted["sts_mode"] == "enforce"
        assert aborted["tlsrpt_result"] is not None
        assert aborts.commands("STARTTLS")
        assert aborts.commands("MAIL") == []  # never in the clear after a failed STARTTLS
        for sink in sinks:
            assert sink.mail_commands == 0, sink.hostname
        sent = await relay.delivery("u@sts94wild.test", "sent")
        assert sent["verified"] is True
        assert len(wild_ok.messages) == 1
    finally:
        await aborts.stop()


async def test_sts_100_plaintext_injected_after_starttls_is_ignored(
    world: World, start_relay: StartRelay
) -> None:
    server = await _scripted(
        world,
        "sts100.test",
        tls=world.pki.server_context(["mx1.sts100.test"]),
        starttls="inject",
    )
    world.publish_policy("sts100.test")
    relay = await start_relay()
    try:
        await relay.send(["u@sts100.test"])

        event = await relay.delivery("u@sts100.test", "sent")
        # In step: the reply taken for the final dot is the server's real one.
        assert event["reason"] == "250 2.0.0 OK scripted-id"
        assert event["verified"] is True
        (session,) = server.sessions
        after_tls = [text.split(" ")[0].upper() for secure, text in session if secure]
        assert after_tls[:4] == ["EHLO", "MAIL", "RCPT", "DATA"]  # a fresh EHLO first
        assert [text for secure, text in session if not secure][-1] == "STARTTLS"
        assert len(server.raw_data) == 1
    finally:
        await server.stop()


# --- §1.7 applying the mode -----------------------------------------------------------


async def test_sts_111_112_testing_delivers_and_reports_none_delivers_silently(
    world: World, start_relay: StartRelay
) -> None:
    # STS-111 A: testing, MX not in the policy, self-signed certificate → delivered.
    evil = await world.add_mx("evil.sts111.test", world.allocate_ip(), cert_kind="self")
    world.mx_record("sts111.test", (10, "evil.sts111.test"))
    world.publish_policy("sts111.test", mode="testing")
    # STS-111 B: testing and no STARTTLS → delivered in plaintext.
    plain = await world.sts_domain("sts111plain.test", mode="testing", starttls=False)
    # STS-112: mode none with the probe → delivered, unverified, nothing reported.
    probe = await world.sts_domain("sts112.test", mode="none", cert_kind="self")
    relay = await start_relay()

    await relay.send(["u@sts111.test", "u@sts111plain.test", "u@sts112.test"])

    a = await relay.delivery("u@sts111.test", "sent")
    assert (a["sts_mode"], a["verified"], a["tlsrpt_result"]) == (
        "testing",
        False,
        "validation-failure",
    )
    assert a["tls"] is not None
    assert len(evil.messages) == 1
    b = await relay.delivery("u@sts111plain.test", "sent")
    assert (b["sts_mode"], b["tls"], b["tlsrpt_result"]) == (
        "testing",
        None,
        "starttls-not-supported",
    )
    assert plain.messages[0].tls_version is None
    c = await relay.delivery("u@sts112.test", "sent")
    assert (c["sts_mode"], c["verified"], c["tlsrpt_result"]) == ("none", False, None)
    assert c["tls"] is not None
    assert len(probe.messages) == 1
    about_none = [e for e in relay.events if "sts112" in str(e.get("domain", ""))]
    assert about_none
    assert [e for e in about_none if e["level"] != "info"] == []


# --- §5 DSN ---------------------------------------------------------------------------


async def test_dsn_10_smtp_18_null_sender_is_relayed_as_null_and_never_bounced(
    world: World, start_relay: StartRelay
) -> None:
    sink = await world.sts_domain(
        "dsn10.test", rcpt_replies={"gone@dsn10.test": "550 5.1.1 no such user"}
    )
    relay = await start_relay()

    await relay.send(["gone@dsn10.test", "u@dsn10.test"], sender="")

    bounced = await relay.delivery("gone@dsn10.test", "bounced")
    assert bounced["reason"].startswith("550 5.1.1")  # the failure is logged
    await relay.delivery("u@dsn10.test", "sent")
    (message,) = sink.messages
    assert message.mail_from == "<>"  # SMTP-18: <> stays <>
    assert relay.find(event="bounce_queued") == []
    await relay.send(["u@dsn10.test"])  # a later message: anything queued went out by then
    await eventually(lambda: len(sink.messages) == 2, message="second message")
    assert world.bounce_sink.messages == []


async def test_dsn_13_one_dsn_lists_only_the_failed_recipients(
    world: World, start_relay: StartRelay
) -> None:
    await world.sts_domain(
        "dsn13.test",
        rcpt_replies={
            "a@dsn13.test": "550 5.1.1 no such user",
            "c@dsn13.test": "553 5.1.3 bad mailbox",
        },
    )
    relay = await start_relay()

    await relay.send(["a@dsn13.test", "b@dsn13.test", "c@dsn13.test"])

    await relay.delivery("b@dsn13.test", "sent")
    await eventually(lambda: world.bounce_sink.messages, message="no DSN")
    (dsn,) = world.bounce_sink.messages
    _, status = _status_part(dsn)
    assert sorted(_final_recipients(status)) == ["a@dsn13.test", "c@dsn13.test"]
    assert status.count("Action: failed") == 2
    assert "Status: 5.1.1" in status
    assert "Status: 5.1.3" in status


async def test_dsn_13_across_domains_each_failure_is_reported_once(
    world: World, start_relay: StartRelay
) -> None:
    # Deviation documented in README: one report per domain attempt, not per message.
    # What must hold either way: each failed recipient listed once, a delivered one never.
    for domain in ("dsn13x.test", "dsn13y.test"):
        await world.sts_domain(domain, rcpt_replies={f"a@{domain}": "550 5.1.1 no such user"})
    relay = await start_relay()

    await relay.send(["a@dsn13x.test", "b@dsn13x.test", "a@dsn13y.test", "b@dsn13y.test"])

    for rcpt in ("a@dsn13x.test", "a@dsn13y.test"):
        await relay.delivery(rcpt, "bounced")
    await relay.delivery("b@dsn13x.test", "sent")
    await relay.delivery("b@dsn13y.test", "sent")
    queued = await eventually(lambda: relay.find(event="bounce_queued"), message="bounces")
    await eventually(
        lambda: len(world.bounce_sink.messages) == len(queued), message="DSNs delivered"
    )
    listed = [r for m in world.bounce_sink.messages for r in _final_recipients(_status_part(m)[1])]
    assert sorted(listed) == ["a@dsn13x.test", "a@dsn13y.test"]
    assert all(m.rcpt_tos == [SENDER] for m in world.bounce_sink.messages)


async def test_nmx_01_02_03_dsn_15_smtp_05_dead_domains_bounce_at_once(
    world: World, start_relay: StartRelay
) -> None:
    # Null MX, with an A record (a sink) that must not be used instead (NMX-02).
    world.mx_record("nmx01.test", (0, "."))
    apex = await world.add_mx("nmx01.test", world.allocate_ip(), starttls=False)
    relay = await start_relay(**RETRY_FAST)

    # NMX-03: the smarthost accepts at RCPT and reports by DSN.
    await relay.send(["u@nmx01.test"])
    await relay.send(["u@nxdomain.test"])

    event = await relay.delivery("u@nmx01.test", "bounced")
    assert event["attempt"] == 1
    assert event["mx"] is None
    assert apex.connections == 0
    assert not world.dns.queried("nmx01.test", "A")
    assert not world.dns.queried("_mta-sts.nmx01.test")  # NMX-01: no MTA-STS work either
    gone = await relay.delivery("u@nxdomain.test", "bounced")  # SMTP-05
    assert gone["attempt"] == 1
    assert not world.dns.queried("_mta-sts.nxdomain.test")
    await eventually(lambda: len(world.bounce_sink.messages) == 2, message="two DSNs")
    (null_mx,) = _dsns_about(world, "u@nmx01.test")
    _, status = _status_part(null_mx)
    assert "Action: failed" in status
    assert "Status: 5.1.10" in status
    assert "Remote-MTA" not in status  # DSN-15: no host was contacted
    (nxdomain,) = _dsns_about(world, "u@nxdomain.test")
    assert "Status: 5.1.2" in _status_part(nxdomain)[1]
    assert relay.find(event="delivery", status="deferred") == []


# --- §6 SMTP client -------------------------------------------------------------------


async def test_smtp_06_temporary_dns_failure_defers_then_delivers(
    world: World, start_relay: StartRelay
) -> None:
    sink = await world.sts_domain("smtp06.test", mode=None)
    world.dns.fail("smtp06.test", "MX", "servfail")
    relay = await start_relay(**RETRY_FAST)

    await relay.send(["u@smtp06.test"])

    deferred = await relay.delivery("u@smtp06.test", "deferred")
    assert sink.connections == 0
    assert "MX lookup" in deferred["reason"]
    world.dns.clear_failure("smtp06.test", "MX")
    sent = await relay.delivery("u@smtp06.test", "sent")
    assert sent["attempt"] >= 2
    assert len(sink.messages) == 1
    assert relay.find(event="delivery", status="bounced") == []


async def test_smtp_09_10_outcomes_per_recipient_and_per_transaction(
    world: World, start_relay: StartRelay
) -> None:
    # SMTP-09: 550 for a, 250 for b, 451 for c; c alone is retried.
    mixed = await world.sts_domain(
        "smtp09.test",
        rcpt_replies={
            "a@smtp09.test": "550 5.1.1 no such user",
            "c@smtp09.test": "451 4.2.0 mailbox busy",
        },
    )
    # SMTP-10: 554 after the final dot fails every recipient; no second try.
    rejecting = await world.sts_domain("smtp10.test", data_reply="554 5.6.0 content rejected")
    # SMTP-10: 451 after the final dot defers every recipient.
    busy = await world.sts_domain("smtp10busy.test", data_reply="451 4.3.0 try again")
    relay = await start_relay(**RETRY_FAST)

    await relay.send(["a@smtp09.test", "b@smtp09.test", "c@smtp09.test"])
    await relay.send(["u1@smtp10.test", "u2@smtp10.test"])
    await relay.send(["u1@smtp10busy.test", "u2@smtp10busy.test"])

    await relay.delivery("a@smtp09.test", "bounced")
    await relay.delivery("b@smtp09.test", "sent")
    await _deferred_twice(relay, "c@smtp09.test")
    rcpts = [c for s in mixed.sessions for c in s.commands if c.startswith("RCPT")]
    assert sum("c@smtp09.test" in c for c in rcpts) >= 2  # retried ...
    assert sum("a@smtp09.test" in c for c in rcpts) == 1  # ... alone
    assert sum("b@smtp09.test" in c for c in rcpts) == 1
    assert [m.rcpt_tos for m in mixed.messages] == [["b@smtp09.test"]]
    for rcpt in ("u1@smtp10.test", "u2@smtp10.test"):
        event = await relay.delivery(rcpt, "bounced")
        assert event["reason"] == "554 5.6.0 content rejected"
    for rcpt in ("u1@smtp10busy.test", "u2@smtp10busy.test"):
        await _deferred_twice(relay, rcpt)
    assert rejecting.mail_commands == 1
    assert busy.messages == []
    assert relay.find(event="delivery", rcpt="u1@smtp10busy.test", status="bounced") == []
    await eventually(lambda: _dsns_about(world, "u1@smtp10.test"), message="554 DSN")
    _, status = _status_part(_dsns_about(world, "u1@smtp10.test")[0])
    assert "Diagnostic-Code: smtp; 554 5.6.0 content rejected" in status


async def test_smtp_11_mail_from_refusal_is_not_cached(
    world: World, start_relay: StartRelay
) -> None:
    server = await _scripted(
        world, "smtp11.test", mail_replies={"bad@src.test": "550 5.7.1 sender refused"}
    )
    relay = await start_relay()
    try:
        await relay.send(["u@smtp11.test"], sender="bad@src.test")
        refused = await relay.delivery("u@smtp11.test", "bounced")
        assert refused["reason"] == "550 5.7.1 sender refused"

        await relay.send(["v@smtp11.test"], sender=SENDER)

        await relay.delivery("v@smtp11.test", "sent")
        senders = [c.split(">")[0] for _, c in server.commands("MAIL")]
        assert senders == ["MAIL FROM:<bad@src.test", f"MAIL FROM:<{SENDER}"]
        assert len(server.raw_data) == 1
    finally:
        await server.stop()


async def test_smtp_14_15_16_data_is_stuffed_crlf_and_gets_one_new_received_on_top(
    world: World, start_relay: StartRelay
) -> None:
    server = await _scripted(world, "smtp14.test")
    relay = await start_relay()
    body = (
        b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Received: from c by d; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Subject: dots\r\n\r\n.hidden\r\n..two\r\nlast\r\n"
    )
    try:
        await relay.send(["u@smtp14.test"], body=body)
        await relay.delivery("u@smtp14.test", "sent")

        (raw,) = server.raw_data
        assert b"\r\n..hidden\r\n...two\r\n" in raw  # SMTP-14, on the wire
        assert re.search(rb"(?<!\r)\n|\r(?!\n)", raw) is None  # SMTP-15
        received = [
            line
            for line in raw.split(b"\r\n\r\n")[0].split(b"\r\n")
            if line.startswith(b"Received:")
        ]
        assert len(received) == 3  # SMTP-16: one added ...
        assert b"relay.test" in raw.split(b"Received:")[1]  # ... on top, ours
        assert received[1:] == body.split(b"\r\n")[:2]  # the others untouched, in order
    finally:
        await server.stop()
