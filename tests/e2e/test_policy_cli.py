"""`sts-relay policy check|show|forget` as a subprocess against the lab."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import run_cli
from tests.support.waiting import read_events
from tests.support.world import World, to_toml


def write_config(world: World, tmp_path: Path, **overrides: dict[str, Any]) -> Path:
    path = tmp_path / "cli.toml"
    config = world.relay_config(tmp_path / "state", **overrides)
    path.write_text(to_toml(config), encoding="utf-8")
    return path


async def check(config: Path, domain: str) -> tuple[int, dict[str, Any]]:
    done = await run_cli(config, "policy", "check", domain, "--json")
    return done.code, json.loads(done.stdout)


async def test_check_enforce_domain_with_valid_tls_says_secure(
    world: World, tmp_path: Path
) -> None:
    sink = await world.sts_domain("enforce-ok.test")
    code, report = await check(write_config(world, tmp_path), "Enforce-OK.test.")

    assert code == 0
    assert report["domain"] == "enforce-ok.test"
    assert report["txt"] == {"status": "found", "id": "1"}
    assert report["policy"]["mode"] == "enforce"
    assert report["requirement"] == "verified"
    (host,) = report["mx"]["hosts"]
    assert host["host"] == "mx1.enforce-ok.test"
    assert host["allowed"] is True
    assert host["addresses"] == [sink.ip]
    (probe,) = host["probes"]
    assert probe["connect"] == "ok"
    assert probe["starttls"] is True
    assert probe["verified"] is True
    assert probe["certificate"] == "valid"
    assert probe["chain"] == "trusted"
    assert probe["name"] == "matches"
    assert probe["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert report["deliverable"] is True
    assert report["secure"] is True
    assert report["verdict"].startswith("yes, securely")
    assert sink.mail_commands == 0  # a diagnosis never sends mail
    assert sink.messages == []


@pytest.mark.parametrize(
    ("domain", "mx_options", "certificate", "chain", "name"),
    [
        (
            "enforce-wrong-name.test",
            {"cert_names": ["other.test"]},
            "certificate-host-mismatch",
            "trusted",
            "does not match",
        ),
        (
            "enforce-untrusted.test",
            {"cert_kind": "self"},
            "certificate-not-trusted",
            "not trusted",
            "unknown",
        ),
        (
            "enforce-expired.test",
            {"cert_kind": "expired"},
            "certificate-expired",
            "trusted",
            "matches",
        ),
    ],
)
async def test_check_names_the_certificate_problem_and_says_mail_would_wait(
    world: World,
    tmp_path: Path,
    domain: str,
    mx_options: dict[str, Any],
    certificate: str,
    chain: str,
    name: str,
) -> None:
    await world.sts_domain(domain, **mx_options)
    code, report = await check(write_config(world, tmp_path), domain)

    assert code == 1
    (probe,) = report["mx"]["hosts"][0]["probes"]
    assert probe["certificate"] == certificate
    assert probe["chain"] == chain
    assert probe["name"] == name
    assert probe["verified"] is False
    assert probe["tls_version"] in ("TLSv1.2", "TLSv1.3")  # TLS itself works, unverified
    assert report["deliverable"] is False
    assert report["secure"] is False
    assert "wait in the queue" in report["verdict"]


async def test_check_mx_outside_the_policy_is_never_contacted(world: World, tmp_path: Path) -> None:
    domain = "enforce-wrong-mx.test"
    sink = await world.sts_domain(domain)
    world.publish_policy(domain, mx=["mx.elsewhere.test"])
    code, report = await check(write_config(world, tmp_path), domain)

    assert code == 1
    (host,) = report["mx"]["hosts"]
    assert host["allowed"] is False
    assert host["probes"] == []
    assert sink.connections == 0


async def test_check_without_starttls_or_policy_reports_plaintext(
    world: World, tmp_path: Path
) -> None:
    await world.sts_domain("no-policy.test", mode=None, starttls=False)
    code, report = await check(write_config(world, tmp_path), "no-policy.test")

    assert code == 0
    assert report["txt"] == {"status": "not-found"}
    assert report["requirement"] == "opportunistic"
    (probe,) = report["mx"]["hosts"][0]["probes"]
    assert probe["starttls"] is False
    assert probe["tls_version"] is None
    assert report["mx"]["hosts"][0]["verdict"] == "plaintext"
    assert report["secure"] is False
    assert report["verdict"].startswith("yes, without authenticated TLS")


async def test_check_applies_tls_overrides(world: World, tmp_path: Path) -> None:
    await world.sts_domain("enforce-untrusted.test", cert_kind="self")
    await world.sts_domain("plain-ok.test", mode=None)
    overrides = [
        "enforce-untrusted.test=opportunistic",
        "plain-ok.test=require-verified match=mx1.plain-ok.test",
    ]
    config = write_config(world, tmp_path, tls={"overrides": overrides})

    code, report = await check(config, "enforce-untrusted.test")
    assert code == 0
    assert report["override"] == "opportunistic"
    assert report["requirement"] == "opportunistic"
    assert report["deliverable"] is True
    assert report["secure"] is False

    code, report = await check(config, "plain-ok.test")
    assert code == 0
    assert report["override"] == "require-verified"
    assert report["override_match"] == ["mx1.plain-ok.test"]
    assert report["requirement"] == "verified"
    assert report["secure"] is True


async def test_check_text_output_reads_as_a_diagnosis(world: World, tmp_path: Path) -> None:
    await world.sts_domain("enforce-untrusted.test", cert_kind="self")
    done = await run_cli(write_config(world, tmp_path), "policy", "check", "enforce-untrusted.test")

    assert done.code == 1
    lines = done.stdout.splitlines()
    assert lines[0] == "domain:   enforce-untrusted.test"
    assert "policy:   mode=enforce max_age=86400" in lines
    assert any(
        "connect ok, STARTTLS offered" in line and "chain not trusted" in line for line in lines
    )
    assert lines[-1].startswith("verdict:  no: MTA-STS policy mode enforce")


async def test_show_and_forget_the_cached_policy(
    world: World, start_relay: StartRelay, tmp_path: Path
) -> None:
    await world.sts_domain("enforce-ok.test")
    relay = await start_relay()
    await relay.send(["u@enforce-ok.test"])
    await relay.delivery("u@enforce-ok.test", "sent")
    assert await relay.stop() == 0
    config = relay.config_path

    shown = await run_cli(config, "policy", "show", "enforce-ok.test", "--json")
    assert shown.code == 0
    cached = json.loads(shown.stdout)
    assert cached["policy_id"] == "1"
    assert cached["mode"] == "enforce"
    assert cached["mx"] == ["mx1.enforce-ok.test"]

    text = await run_cli(config, "policy", "show", "enforce-ok.test")
    assert "policy_id:    1" in text.stdout.splitlines()

    forgot = await run_cli(config, "policy", "forget", "enforce-ok.test")
    assert forgot.code == 0
    (event,) = read_events(forgot.stderr.splitlines())
    assert event["event"] == "policy_forgotten"
    assert event["domain"] == "enforce-ok.test"
    assert event["policy_id"] == "1"

    gone = await run_cli(config, "policy", "show", "enforce-ok.test")
    assert gone.code == 1
    assert "no cached policy" in gone.stderr
    again = await run_cli(config, "policy", "forget", "enforce-ok.test")
    assert again.code == 1


async def test_overrides_from_the_environment_are_validated_and_applied(
    world: World, tmp_path: Path
) -> None:
    await world.sts_domain("enforce-untrusted.test", cert_kind="self")
    config = write_config(world, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STS_RELAY_")}

    bad = {**env, "STS_RELAY_TLS_OVERRIDES": "x.test=never"}
    refused = await run_cli(config, "config", "check", env=bad)
    assert refused.code == 2
    assert "tls.overrides (from STS_RELAY_TLS_OVERRIDES)" in refused.stderr

    good = {
        **env,
        "STS_RELAY_TLS_OVERRIDES": (
            "Enforce-Untrusted.test=opportunistic, b.test=require-verified match=MX.b.test:*.c.test"
        ),
    }
    shown = await run_cli(config, "config", "check", "--json", env=good)
    assert json.loads(shown.stdout)["settings"]["tls"]["overrides"] == [
        "enforce-untrusted.test=opportunistic",
        "b.test=require-verified match=mx.b.test:*.c.test",
    ]
    done = await run_cli(config, "policy", "check", "enforce-untrusted.test", "--json", env=good)
    assert json.loads(done.stdout)["requirement"] == "opportunistic"
