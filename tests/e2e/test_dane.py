"""DANE (RFC 7672) end to end: `sts-relay serve`, `policy check` and `config check` as the
operator runs them, against the signed lab zone behind a real unbound.

The relay learns nothing test-specific: its `dns.nameservers` is unbound on loopback, so
`dns.dnssec = "auto"` believes its AD bit, exactly as behind the compose file's resolver.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import run_cli
from tests.support.dane_lab import DaneWorld, self_signed, tlsa
from tests.support.world import to_toml

WRONG = "3 1 1 " + "00" * 32


@pytest.fixture
async def world(dane_world: DaneWorld) -> DaneWorld:
    """`start_relay` builds on `world`: here, the DANE lab."""
    return dane_world


def _config(world: DaneWorld, tmp_path: Path, **overrides: dict[str, Any]) -> Path:
    path = tmp_path / "cli.toml"
    path.write_text(to_toml(world.relay_config(tmp_path / "state", **overrides)))
    return path


async def test_dane_delivery_is_logged_with_the_record_that_matched(
    world: DaneWorld, start_relay: StartRelay
) -> None:
    domain = "e2e-ee.dane.test"
    cert = self_signed([f"mx1.{domain}"], world.certs_dir())
    record = tlsa(cert.leaf)
    sink = await world.dane_mx(domain, cert, [WRONG, record])
    relay = await start_relay()
    started = await relay.wait_for(lambda e: e["event"] == "started")
    assert started["dnssec"].startswith("auto: DANE on")
    await relay.send([f"u@{domain}"])
    sent = await relay.delivery(f"u@{domain}", "sent")
    assert sent["tls_policy"] == "dane"
    assert sent["dane_record"] == record
    assert sent["verified"] is True
    assert sent["sts_mode"] is None
    assert len(sink.messages) == 1


async def test_mta_sts_success_never_rescues_a_dane_failure(
    world: DaneWorld, start_relay: StartRelay
) -> None:
    # STS-120: the enforce policy accepts C-good; the TLSA record rejects it.
    domain = "e2e-sts.dane.test"
    host = f"mx1.{domain}"
    sink = await world.dane_mx(domain, world.pki.server_context([host], "good"), [WRONG])
    world.publish_policy(domain, mx=[host])
    relay = await start_relay()
    await relay.send([f"u@{domain}"])
    deferred = await relay.delivery(f"u@{domain}", "deferred")
    assert deferred["tls_policy"] == "dane"
    assert deferred["tlsrpt_result"] == "tlsa-invalid"
    assert deferred["sts_mode"] == "enforce"
    assert deferred["dane_record"] is None
    assert sink.messages == []


async def test_dnssec_off_means_no_dane(world: DaneWorld, start_relay: StartRelay) -> None:
    domain = "e2e-off.dane.test"
    cert = self_signed([f"mx1.{domain}"], world.certs_dir())
    sink = await world.dane_mx(domain, cert, [WRONG])
    relay = await start_relay(dns={"dnssec": "off"})
    started = await relay.wait_for(lambda e: e["event"] == "started")
    assert started["dnssec"].startswith("off: DANE off")
    await relay.send([f"u@{domain}"])
    sent = await relay.delivery(f"u@{domain}", "sent")
    assert sent["tls_policy"] == "none"
    assert sent["verified"] is False
    assert len(sink.messages) == 1


async def test_policy_check_shows_dnssec_tlsa_and_the_live_match(
    world: DaneWorld, tmp_path: Path
) -> None:
    domain = "e2e-check.dane.test"
    cert = self_signed([f"mx1.{domain}"], world.certs_dir())
    record = tlsa(cert.leaf)
    await world.dane_mx(domain, cert, [record, "1 1 1 " + "33" * 32])
    done = await run_cli(_config(world, tmp_path), "policy", "check", domain, "--json")
    assert done.code == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["dnssec"].startswith("auto: DANE on")
    assert report["secure"] is True
    (host,) = report["mx"]["hosts"]
    assert host["tls_policy"] == "dane"
    assert host["dane"]["state"] == "usable"
    assert host["dane"]["dnssec"] == {"mx": "secure", "addresses": "secure", "tlsa": "secure"}
    shown = {r["record"]: r["usable"] for r in host["dane"]["records"]}  # RRset: no order
    assert shown == {record: True, "1 1 1 " + "33" * 32: False}
    assert host["probes"][0]["dane"]["matched"] == record
    assert host["usable"] is True


async def test_policy_check_shows_a_mismatch(world: DaneWorld, tmp_path: Path) -> None:
    domain = "e2e-mismatch.dane.test"
    cert = self_signed([f"mx1.{domain}"], world.certs_dir())
    await world.dane_mx(domain, cert, [WRONG])
    done = await run_cli(_config(world, tmp_path), "policy", "check", domain, "--json")
    assert done.code == 1
    (host,) = json.loads(done.stdout)["mx"]["hosts"]
    assert host["probes"][0]["dane"]["result"] == "tlsa-invalid"
    assert host["usable"] is False


async def test_config_check_says_which_dnssec_setting_is_in_force(
    world: DaneWorld, tmp_path: Path
) -> None:
    local = await run_cli(_config(world, tmp_path), "config", "check", "--json")
    assert json.loads(local.stdout)["dnssec"].startswith("auto: DANE on")
    remote = _config(world, tmp_path, dns={"nameservers": ["192.0.2.1"], "dnssec": "on"})
    shown = await run_cli(remote, "config", "check")
    assert shown.code == 0
    assert "dnssec in force: on: DANE on" in shown.stderr
    assert "warning: dns.dnssec = on with nameserver 192.0.2.1:53" in shown.stderr
    auto = _config(world, tmp_path, dns={"nameservers": ["192.0.2.1"]})
    done = await run_cli(auto, "config", "check", "--json")
    assert json.loads(done.stdout)["dnssec"].startswith("auto: DANE off")
