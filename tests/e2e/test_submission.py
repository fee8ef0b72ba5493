"""Submission through `sts-relay serve`: STARTTLS with the configured certificate, SMTP AUTH
from an untrusted address, delivery to the lab MX, and the certificate reloaded on SIGHUP
(issue 5 items 1 and 2)."""

from __future__ import annotations

import os
import signal
import ssl
from pathlib import Path

import aiosmtplib
import pytest

from relay.users import hash_password, write_users
from tests.e2e.conftest import StartRelay
from tests.support.world import World


def _issue(world: World, cert: Path, key: Path, *names: str) -> None:
    leaf = world.pki.ca.issue_cert(*names)
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())


async def _names_offered(host: str, port: int, ctx: ssl.SSLContext) -> list[str]:
    client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)
    async with client:
        await client.starttls(tls_context=ctx, server_hostname="relay.test")
        transport = client.transport
        assert transport is not None
        cert = transport.get_extra_info("ssl_object").getpeercert()
    return [value for kind, value in cert["subjectAltName"] if kind == "DNS"]


async def test_authenticated_submission_and_certificate_reload(
    world: World, start_relay: StartRelay, tmp_path: Path
) -> None:
    sink = await world.sts_domain("submit.test")
    cert, key, users = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "users"
    _issue(world, cert, key, "relay.test")
    write_users(users, {"app1": hash_password("s3cret", log2_n=10)})
    relay = await start_relay(
        listen={"trusted_networks": ["10.0.0.0/8"]},
        tls={"cert_file": str(cert), "key_file": str(key)},
        auth={"users_file": str(users)},
    )
    ctx = world.pki.client_context()

    # Without AUTH the loopback client is untrusted here: refused, nothing queued.
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await relay.send(["u@submit.test"])

    client = aiosmtplib.SMTP(hostname=relay.host, port=relay.port, start_tls=False, timeout=10)
    async with client:
        await client.starttls(tls_context=ctx, server_hostname="relay.test")
        await client.ehlo()
        assert "auth" in client.esmtp_extensions
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await client.login("app1", "wrong")
        await client.login("app1", "s3cret")
        await client.sendmail("app@src.test", ["u@submit.test"], b"Subject: s\r\n\r\nhi\r\n")

    event = await relay.delivery("u@submit.test", "sent")
    assert event["verified"] is True
    [message] = sink.messages
    assert b"with ESMTPS" in message.data.split(b"\r\n\r\n")[0]
    assert len(relay.find(event="received")) == 1
    assert relay.find(event="authenticated")[0]["user"] == "app1"
    assert relay.find(event="auth_failed")[0]["reason"] == "bad credentials"

    assert await _names_offered(relay.host, relay.port, ctx) == ["relay.test"]
    _issue(world, cert, key, "relay.test", "smtp.relay.test")
    os.kill(relay.pid, signal.SIGHUP)
    reloaded = await relay.wait_for(lambda e: e["event"] == "reloaded")
    assert "certificates" in reloaded["parts"]
    assert await _names_offered(relay.host, relay.port, ctx) == ["relay.test", "smtp.relay.test"]
