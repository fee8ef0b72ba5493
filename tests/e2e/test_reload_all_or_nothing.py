"""Reload is all or nothing (issue 11, item 11), on a serving relay.

SIGHUP with a valid change of `tls.overrides` and a broken listener certificate: neither is
applied (`reload_failed`); the old override still decides and the old certificate is still
served. Once the certificate is fixed, the next SIGHUP applies both together.
"""

from __future__ import annotations

import os
import signal
import ssl
from pathlib import Path
from typing import Any

import aiosmtplib

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import RelayProcess
from tests.support.world import World, to_toml

DOMAIN = "reload-broken-tls.test"  # enforce policy, MX certificate from an untrusted CA


def write_listener_certificate(world: World, directory: Path) -> tuple[Path, Path, bytes]:
    """A fresh certificate for relay.test (chain, key) written to files; its DER."""
    leaf = world.pki.ca.issue_cert("relay.test")
    cert_file, key_file = directory / "listener.pem", directory / "listener.key"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key_file.write_bytes(leaf.private_key_pem.bytes())
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    return cert_file, key_file, der


async def served_certificate(relay: RelayProcess) -> bytes:
    """The certificate the listener presents after STARTTLS (DER)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    client = aiosmtplib.SMTP(hostname=relay.host, port=relay.port, start_tls=False, timeout=10)
    async with client:
        await client.starttls(tls_context=ctx)
        der = client.get_transport_info("ssl_object").getpeercert(binary_form=True)
    assert isinstance(der, bytes)
    return der


async def hang_up(relay: RelayProcess, event: str) -> dict[str, Any]:
    seen = len(relay.find(event=event))
    os.kill(relay.pid, signal.SIGHUP)
    return await relay.wait_for(
        lambda e: e["event"] == event and len(relay.find(event=event)) > seen
    )


async def test_a_broken_certificate_keeps_the_old_overrides_and_certificate(
    start_relay: StartRelay, world: World, tmp_path: Path
) -> None:
    await world.sts_domain(DOMAIN, cert_kind="self")
    cert_file, key_file, old_der = write_listener_certificate(world, tmp_path)
    tls = {
        "cert_file": str(cert_file),
        "key_file": str(key_file),
        "overrides": [f"{DOMAIN}=opportunistic"],
    }
    relay = await start_relay(tls=tls)
    assert await served_certificate(relay) == old_der
    await relay.send([f"a@{DOMAIN}"])
    assert (await relay.delivery(f"a@{DOMAIN}", "sent"))["tls_policy"] == "override"

    # A valid change (the override is dropped) and a broken certificate, in one reload.
    config = world.relay_config(tmp_path / "state", tls={**tls, "overrides": []})
    config["listen"]["addresses"] = [f"{relay.host}:{relay.port}"]
    relay.config_path.write_text(to_toml(config), encoding="utf-8")
    cert_file.write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")

    failed = await hang_up(relay, "reload_failed")
    assert str(cert_file) in failed["error"]
    assert relay.find(event="reloaded") == []
    assert await served_certificate(relay) == old_der
    await relay.send([f"b@{DOMAIN}"])
    kept = await relay.wait_for(lambda e: e["event"] == "delivery" and e["rcpt"] == f"b@{DOMAIN}")
    # The old override still decides.
    assert (kept["status"], kept["tls_policy"], kept["verified"]) == ("sent", "override", False)

    # The certificate fixed: the next reload applies both.
    _, _, new_der = write_listener_certificate(world, tmp_path)
    reloaded = await hang_up(relay, "reloaded")
    assert sorted(reloaded["parts"]) == ["certificates", "tls_overrides"]
    assert await served_certificate(relay) == new_der != old_der
    await relay.send([f"c@{DOMAIN}"])
    deferred = await relay.delivery(f"c@{DOMAIN}", "deferred")
    assert (deferred["tls_policy"], deferred["tlsrpt_result"]) == (
        "sts",
        "certificate-not-trusted",
    )
