"""TLS reporting end to end (RFC 8460): `sts-relay serve` delivers to lab domains that
publish `_smtp._tls` records, `sts-relay tlsrpt show|send` report the day, and the
reporting mailbox receives DKIM-signed multipart/report mail whose counts equal the
sessions that happened; the report mail itself is never counted.
"""

from __future__ import annotations

import base64
import email
import email.policy
import gzip
import json
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]
import jsonschema  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import run_cli
from tests.support.smtp import MxSink
from tests.support.waiting import eventually
from tests.support.world import World

SCHEMA = json.loads((Path(__file__).parents[1] / "support" / "tlsrpt.schema.json").read_text())
RUA = "mailto:reports@rua.test"


async def _cli(config: Path, *args: str) -> tuple[int, str, str]:
    done = await run_cli(config, *args)
    return done.code, done.stdout, done.stderr


def _dkim_key(tmp_path: Path) -> tuple[Path, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "dkim.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, base64.b64encode(public)


def _reports(sink: MxSink) -> dict[str, tuple[EmailMessage, dict[str, Any], bytes]]:
    out = {}
    for received in sink.messages:
        msg = email.message_from_bytes(received.data, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        attachment = list(msg.iter_parts())[1]
        payload = attachment.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out[str(msg["TLS-Report-Domain"])] = (
            msg,
            json.loads(gzip.decompress(payload)),
            received.data,
        )
    return out


async def test_reporting_mailbox_receives_reports_whose_counts_equal_the_sessions(
    world: World, start_relay: StartRelay, tmp_path: Path
) -> None:
    # Two reporting domains: one whose MX is fine, one whose MX has a self-signed cert.
    ok_sink = await world.sts_domain("rpt-ok.test")
    await world.sts_domain("rpt-bad.test", cert_kind="self")
    for domain in ("rpt-ok.test", "rpt-bad.test"):
        world.dns.txt(f"_smtp._tls.{domain}", f"v=TLSRPTv1; rua={RUA}")
    world.mx_record("rua.test", (10, "mx1.rua.test"))
    mailbox = await world.add_mx("mx1.rua.test", world.allocate_ip())
    key_file, public_key = _dkim_key(tmp_path)
    relay = await start_relay(
        tlsrpt={
            "organization_name": "Relay Lab",
            "dkim_key_file": str(key_file),
            "dkim_selector": "lab",
        }
    )
    config = tmp_path / "relay.toml"

    for _ in range(3):
        await relay.send(["u@rpt-ok.test"])
    await relay.send(["u@rpt-bad.test"])
    await eventually(lambda: len(relay.find(event="delivery", domain="rpt-ok.test")) == 3)
    await relay.delivery("u@rpt-bad.test", "deferred")
    assert await relay.stop() == 0  # a clean stop writes the counters still in memory

    sent = len(relay.find(event="delivery", domain="rpt-ok.test", status="sent"))
    failed = relay.find(event="delivery", domain="rpt-bad.test", status="deferred")
    assert sent == 3
    assert all(e["tlsrpt_result"] == "certificate-not-trusted" for e in failed)

    code, out, err = await _cli(config, "tlsrpt", "show", "--day", "today", "--json")
    assert code == 0, err
    shown = {entry["domain"]: entry for entry in json.loads(out)}
    assert set(shown) == {"rpt-ok.test", "rpt-bad.test"}
    assert shown["rpt-ok.test"]["rua"] == [RUA]
    assert shown["rpt-ok.test"]["already_sent"] is False
    for entry in shown.values():
        jsonschema.validate(entry["report"], SCHEMA)

    code, out, err = await _cli(config, "tlsrpt", "send", "--day", "today", "--json")
    assert code == 0, err
    states = {d["uri"]: d["state"] for d in json.loads(out)["deliveries"]}
    assert states == {RUA: "queued"}

    relay = await start_relay()
    await eventually(lambda: len(mailbox.messages) == 2, timeout=20)
    reports = _reports(mailbox)
    assert set(reports) == {"rpt-ok.test", "rpt-bad.test"}

    msg, ok_report, raw = reports["rpt-ok.test"]
    jsonschema.validate(ok_report, SCHEMA)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Submitter"] == "relay.test"
    assert msg["TLS-Required"] == "No"
    assert ok_report["organization-name"] == "Relay Lab"
    (ok_policy,) = ok_report["policies"]
    assert ok_policy["policy"]["policy-type"] == "sts"
    assert ok_policy["policy"]["policy-domain"] == "rpt-ok.test"
    assert ok_policy["policy"]["mx-host"] == ["mx1.rpt-ok.test"]
    assert ok_policy["policy"]["policy-string"] == [
        "version: STSv1",
        "mode: enforce",
        "mx: mx1.rpt-ok.test",
        "max_age: 86400",
    ]
    assert ok_policy["summary"] == {
        # One session per TLS connection, however many messages a pooled one carried.
        "total-successful-session-count": ok_sink.connections,
        "total-failure-session-count": 0,
    }

    def dns_txt(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"lab._domainkey.relay.test."
        return b"v=DKIM1; k=rsa; p=" + public_key

    assert dkim.verify(raw, dnsfunc=dns_txt, tlsrpt=True)

    _, bad_report, _ = reports["rpt-bad.test"]
    jsonschema.validate(bad_report, SCHEMA)
    (bad_policy,) = bad_report["policies"]
    assert bad_policy["summary"]["total-successful-session-count"] == 0
    # Every deferral counted before the report was built (the relay was stopped then).
    assert bad_policy["summary"]["total-failure-session-count"] == len(failed)
    (detail,) = bad_policy["failure-details"]
    assert detail["result-type"] == "certificate-not-trusted"
    assert detail["receiving-mx-hostname"] == "mx1.rpt-bad.test"
    assert detail["receiving-ip"] == world.sink("mx1.rpt-bad.test").ip
    assert detail["sending-mta-ip"].startswith("127.")
    assert detail["failed-session-count"] == len(failed)

    # The report mail's own delivery is never counted (RFC 8460 §3, RPT-14).
    await relay.delivery("reports@rua.test", "sent")
    assert await relay.stop() == 0
    code, out, err = await _cli(config, "tlsrpt", "show", "--day", "today", "--json")
    assert code == 0, err
    assert "rua.test" not in {entry["domain"] for entry in json.loads(out)}
    assert {e["domain"]: e["already_sent"] for e in json.loads(out)}["rpt-ok.test"] is True


async def test_a_failed_mx_before_a_delivering_one_is_reported_as_well(
    world: World, start_relay: StartRelay, tmp_path: Path
) -> None:
    # enforce; MX 10 has a self-signed certificate, MX 20 a good one: the message goes
    # out through MX 20, and the day's report counts both sessions (RFC 8460 §4.4).
    bad = await world.add_mx("mx1.two-mx.test", world.allocate_ip(), cert_kind="self")
    good = await world.add_mx("mx2.two-mx.test", world.allocate_ip())
    world.mx_record("two-mx.test", (10, "mx1.two-mx.test"), (20, "mx2.two-mx.test"))
    world.publish_policy("two-mx.test", mx=["mx1.two-mx.test", "mx2.two-mx.test"])
    world.dns.txt("_smtp._tls.two-mx.test", f"v=TLSRPTv1; rua={RUA}")
    relay = await start_relay()

    await relay.send(["u@two-mx.test"])
    sent = await relay.delivery("u@two-mx.test", "sent")
    assert sent["mx"] == "mx2.two-mx.test"
    assert len(good.messages) == 1
    assert not bad.messages
    assert len(relay.find(event="delivery", domain="two-mx.test")) == 1  # one line per rcpt
    assert await relay.stop() == 0

    config = tmp_path / "relay.toml"
    code, out, err = await _cli(config, "tlsrpt", "show", "--day", "today", "--json")
    assert code == 0, err
    (entry,) = [e for e in json.loads(out) if e["domain"] == "two-mx.test"]
    jsonschema.validate(entry["report"], SCHEMA)
    (policy,) = entry["report"]["policies"]
    assert policy["summary"] == {
        "total-successful-session-count": 1,
        "total-failure-session-count": 1,
    }
    (detail,) = policy["failure-details"]
    assert detail["result-type"] == "certificate-not-trusted"
    assert detail["receiving-mx-hostname"] == "mx1.two-mx.test"
    assert detail["receiving-ip"] == bad.ip
    assert detail["failed-session-count"] == 1
