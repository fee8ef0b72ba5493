"""RFC 8461 discovery, fetch, syntax and cache rules through the running relay
(RFC-CHECKLIST.md §1.1-§1.4, the items not already proven elsewhere; see the test names).

`sts-relay serve` runs as a subprocess against the lab. Most tests use the checklist's
probe: the MX presents a self-signed certificate, so an applied enforce policy shows as a
deferral with `certificate-not-trusted` and no applied policy as a delivery without
verification. Independent domains share one relay start. Time-based items use small
`max_age` values, `policy.failure_backoff` and `policy.refresh_interval`, and poll with
deadlines; the only time comparisons are lower bounds the rules guarantee.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiosmtplib
import pytest

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import Event, RelayProcess, run_cli
from tests.support.smtp import MxSink
from tests.support.waiting import eventually
from tests.support.world import World, policy_body

RETRY_EVERY_SECOND = {"retry_schedule": [1]}


async def probe_domain(
    world: World,
    domain: str,
    *,
    mode: str | None = "enforce",
    max_age: int = 86400,
    body: str | None = None,
) -> MxSink:
    """MX 10 mx1.<domain> presenting a self-signed certificate (the probe), plus a policy
    (TXT id 1, `mx: mx1.<domain>` unless `body` says otherwise) unless mode is None."""
    sink = await world.sts_domain(domain, mode=None, cert_kind="self")
    if mode is not None:
        world.publish_policy(domain, mode=mode, max_age=max_age, body=body)
    return sink


async def attempt(relay: RelayProcess, rcpt: str, number: int, within: float = 15.0) -> Event:
    """The delivery event of attempt `number` for `rcpt`."""
    return await relay.wait_for(
        lambda e: e["event"] == "delivery" and e["rcpt"] == rcpt and e["attempt"] == number,
        within,
    )


def policy_applied(event: Event, policy_id: str = "1") -> None:
    """The probe says an enforce policy was applied."""
    assert event["status"] == "deferred", event
    assert event["sts_mode"] == "enforce", event
    assert event["policy_id"] == policy_id, event
    assert event["tlsrpt_result"] == "certificate-not-trusted", event


def no_policy_applied(event: Event, sink: MxSink) -> None:
    """The probe says the mail went out as without MTA-STS."""
    assert event["status"] == "sent", event
    assert event["sts_mode"] is None, event
    assert event["verified"] is False, event
    assert event["tls"] is not None, event
    assert any(m.rcpt_tos == [event["rcpt"]] for m in sink.messages)


# --- 1.1 discovery ----------------------------------------------------------------------


async def test_sts_12_13_txt_servfail_or_parent_policy_delivers_as_without_mta_sts(
    world: World, start_relay: StartRelay
) -> None:
    # STS-12: README documents the fail-open choice for a TXT SERVFAIL with nothing cached.
    servfail = await probe_domain(world, "txt-servfail.test")
    world.dns.fail("_mta-sts.txt-servfail.test", "TXT", "servfail")
    # STS-13: an enforce policy at the parent does not cover sub.parent.test.
    parent = await probe_domain(world, "parent.test")
    world.mx_record("sub.parent.test", (10, "mx1.parent.test"))
    relay = await start_relay()

    await relay.send(["u@txt-servfail.test", "u@sub.parent.test"])

    no_policy_applied(await relay.delivery("u@txt-servfail.test", "sent"), servfail)
    assert relay.find(event="delivery", status="bounced") == []
    assert world.policy_server.requests_for("txt-servfail.test") == []
    no_policy_applied(await relay.delivery("u@sub.parent.test", "sent"), parent)
    assert world.dns.queried("_mta-sts.sub.parent.test", "TXT")
    assert not world.dns.queried("_mta-sts.parent.test")
    assert world.policy_server.requests_for("parent.test") == []
    assert world.policy_server.requests_for("sub.parent.test") == []


async def test_sts_14_address_literal_has_no_policy_lookup(
    world: World, start_relay: StartRelay
) -> None:
    # §3.4: a literal has no policy; the relay refuses literal recipients outright (README),
    # so nothing is queued and no MTA-STS work happens.
    relay = await start_relay()

    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await relay.send(["u@[127.0.0.11]"])

    (error,) = refused.value.recipients
    assert error.code == 550
    assert "5.1.2" in error.message
    await relay.wait_for(lambda e: e["event"] == "rejected" and e["rcpt"] == "u@[127.0.0.11]")
    assert relay.find(event="received") == []
    assert not any(name.startswith("_mta-sts") for name, _ in world.dns.queries)
    assert world.policy_server.requests == []
    assert world.policy_server.connections == 0


# --- 1.2 fetch --------------------------------------------------------------------------


async def test_sts_26_61_http_cache_headers_do_not_decide_how_long_a_policy_is_cached(
    world: World, start_relay: StartRelay
) -> None:
    domain = "no-http-cache.test"
    sink = await world.sts_domain(domain, mode=None)
    world.publish_policy(domain)
    world.policy_server.serve(
        domain,
        policy_body("enforce", [f"mx1.{domain}"], 86400),
        headers={
            "Cache-Control": "no-store, no-cache, max-age=0",
            "Expires": "Thu, 01 Jan 1970 00:00:00 GMT",
            "ETag": '"v1"',
        },
    )
    relay = await start_relay()

    for n in range(3):
        await relay.send([f"u{n}@{domain}"])
        sent = await relay.delivery(f"u{n}@{domain}", "sent")
        assert sent["verified"] is True
        assert sent["sts_mode"] == "enforce"

    assert len(sink.messages) == 3
    # STS-61: one fetch for three messages; STS-26 (c): max_age decides, not HTTP caching.
    assert len(world.policy_server.requests_for(domain)) == 1
    show = await run_cli(relay.config_path, "policy", "show", domain, "--json")
    assert show.code == 0
    assert json.loads(show.stdout)["max_age"] == 86400


async def test_sts_29_hanging_policy_host_holds_up_only_its_own_domain(
    world: World, start_relay: StartRelay
) -> None:
    slow = await probe_domain(world, "policy-hangs.test")
    world.policy_server.misbehave("policy-hangs.test", "hang")
    fast = await world.sts_domain("policy-fast.test")
    relay = await start_relay(policy={"fetch_deadline": 3})

    await relay.send(["u@policy-hangs.test", "u@policy-fast.test"])

    sent_fast = await relay.delivery("u@policy-fast.test", "sent")
    assert sent_fast["verified"] is True
    assert len(fast.messages) == 1
    # One overall deadline ends the fetch; the mail goes out as without a policy (STS-30).
    sent_slow = await relay.delivery("u@policy-hangs.test", "sent")
    deliveries = relay.find(event="delivery")
    assert deliveries.index(sent_fast) < deliveries.index(sent_slow)
    no_policy_applied(sent_slow, slow)
    assert sent_slow["tlsrpt_result"] == "sts-policy-fetch-error"
    (failed,) = relay.find(event="policy_fetch_failed", domain="policy-hangs.test")
    assert "deadline" in failed["reason"]


async def test_sts_32_failed_fetch_of_one_id_waits_for_the_backoff(
    world: World, start_relay: StartRelay
) -> None:
    domain = "policy-500.test"
    backoff = 4.0
    sink = await probe_domain(world, domain)
    world.policy_server.serve(domain, policy_body("enforce", [f"mx1.{domain}"], 86400), status=500)
    relay = await start_relay(policy={"failure_backoff": backoff})

    def fetches() -> int:
        return len(world.policy_server.requests_for(domain))

    for n in range(3):
        await relay.send([f"a{n}@{domain}"])
        event = await relay.delivery(f"a{n}@{domain}", "sent")
        no_policy_applied(event, sink)
        assert event["tlsrpt_result"] == "sts-policy-fetch-error"
    assert fetches() == 1  # three messages inside the back-off: one request (id 1)

    # A new id is fetched at once, whatever the back-off of the old one.
    world.publish_policy(domain, policy_id="2")
    world.policy_server.serve(domain, "", status=500)
    id2_sent_at = time.monotonic()  # no later than the failed fetch of id 2
    await relay.send([f"b@{domain}"])
    no_policy_applied(await relay.delivery(f"b@{domain}", "sent"), sink)
    assert fetches() == 2

    # Once the back-off of id 2 has run out, the next message fetches again.
    for n in range(int(backoff + 10) * 2):
        await relay.send([f"c{n}@{domain}"])
        no_policy_applied(await relay.delivery(f"c{n}@{domain}", "sent"), sink)
        if fetches() > 2:
            break
        await asyncio.sleep(0.5)
    assert fetches() == 3
    assert time.monotonic() - id2_sent_at >= backoff
    failed = relay.find(event="policy_fetch_failed", domain=domain)
    assert [f["policy_id"] for f in failed] == ["1", "2", "2"]


# --- 1.3 syntax driving behaviour -------------------------------------------------------


async def test_sts_47_48_52_parsed_fields_drive_delivery(
    world: World, start_relay: StartRelay
) -> None:
    # STS-52: a none policy is the clean opt-out: no TLS requirement, no failure logged.
    none = await probe_domain(world, "mode-none.test", mode="none")
    # STS-47: of two mode lines the first counts (testing), so the probe still delivers.
    dup = await probe_domain(
        world,
        "dup-mode.test",
        body="version: STSv1\nmode: testing\nmode: enforce\nmx: mx1.dup-mode.test\nmax_age: 1\n",
    )
    # STS-48: every mx line is used; the MX is the second pattern.
    domain = "multi-mx.test"
    good = await world.add_mx(f"mxb.{domain}", world.allocate_ip())
    world.mx_record(domain, (10, f"mxb.{domain}"))
    world.publish_policy(domain, mx=[f"mxa.{domain}", f"mxb.{domain}", f"*.c.{domain}"])
    relay = await start_relay()

    await relay.send(["u@mode-none.test", "u@dup-mode.test", f"u@{domain}"])

    event = await relay.delivery("u@mode-none.test", "sent")
    assert event["sts_mode"] == "none"
    assert event["tlsrpt_result"] is None
    assert event["verified"] is False
    assert len(none.messages) == 1
    event = await relay.delivery("u@dup-mode.test", "sent")
    assert event["sts_mode"] == "testing"
    assert event["tlsrpt_result"] == "certificate-not-trusted"
    assert len(dup.messages) == 1
    event = await relay.delivery(f"u@{domain}", "sent")
    assert (event["sts_mode"], event["verified"], event["mx"]) == ("enforce", True, f"mxb.{domain}")
    assert len(good.messages) == 1
    assert relay.find(event="policy_fetch_failed") == []


# --- 1.4 cache, refresh, §5.1 -----------------------------------------------------------


async def test_sts_63_64_65_66_73_cached_policy_outlives_txt_and_fetch_failures(
    world: World, start_relay: StartRelay
) -> None:
    domains = {
        "new-id-500.test": "STS-63",
        "txt-gone.test": "STS-64",
        "txt-servfail-later.test": "STS-65",
        "txt-two-later.test": "STS-66",
        "new-id-garbage.test": "STS-73",
    }
    sinks = {d: await probe_domain(world, d) for d in domains}
    relay = await start_relay(queue=RETRY_EVERY_SECOND)
    await relay.send([f"u@{d}" for d in domains])
    for domain in domains:  # attempt 1 fetched P1 (id 1) and cached it
        policy_applied(await attempt(relay, f"u@{domain}", 1))

    world.publish_policy("new-id-500.test", policy_id="2")
    world.policy_server.serve("new-id-500.test", "", status=500)
    world.dns.remove("_mta-sts.txt-gone.test", "TXT")
    world.dns.fail("_mta-sts.txt-servfail-later.test", "TXT", "servfail")
    world.dns.txt("_mta-sts.txt-two-later.test", "v=STSv1; id=9")
    world.publish_policy("new-id-garbage.test", policy_id="2", body="garbage\r\n")

    for domain, item in domains.items():
        policy_applied(await attempt(relay, f"u@{domain}", 2))
        assert sinks[domain].messages == [], item
    results = {
        d: [
            (f["policy_id"], f["result"], f["cached_mode"], f["level"])
            for f in relay.find(event="policy_fetch_failed", domain=d)
        ]
        for d in ("new-id-500.test", "new-id-garbage.test")
    }
    assert results == {
        "new-id-500.test": [("2", "sts-policy-fetch-error", "enforce", "warning")],
        "new-id-garbage.test": [("2", "sts-policy-invalid", "enforce", "warning")],
    }
    for domain in ("txt-gone.test", "txt-servfail-later.test", "txt-two-later.test"):
        assert len(world.policy_server.requests_for(domain)) == 1, domains[domain]
    assert relay.find(event="delivery", status="sent") == []


async def test_sts_67_expired_policy_with_nothing_live_delivers_as_without_mta_sts(
    world: World, start_relay: StartRelay
) -> None:
    domain = "short-lived.test"
    max_age = 3
    sink = await probe_domain(world, domain, max_age=max_age)
    relay = await start_relay(queue=RETRY_EVERY_SECOND)
    sent_at = time.monotonic()  # no earlier than the fetch
    await relay.send([f"u@{domain}"])
    policy_applied(await attempt(relay, f"u@{domain}", 1))

    world.dns.remove(f"_mta-sts.{domain}", "TXT")
    world.policy_server.misbehave(domain, "refuse")

    event = await relay.delivery(f"u@{domain}", "sent", within=max_age + 10)
    no_policy_applied(event, sink)
    assert event["attempt"] >= 2
    # Retries before the end of max_age kept the policy (STS-64); only expiry released it.
    assert time.monotonic() - sent_at >= max_age
    deferred = relay.find(event="delivery", rcpt=f"u@{domain}", status="deferred")
    assert all(e["sts_mode"] == "enforce" for e in deferred)


async def test_sts_68_max_age_zero_applies_to_each_attempt_and_is_never_cached(
    world: World, start_relay: StartRelay
) -> None:
    domain = "max-age-zero.test"
    sink = await probe_domain(world, domain, max_age=0)
    relay = await start_relay(queue=RETRY_EVERY_SECOND)
    await relay.send([f"u@{domain}"])

    policy_applied(await attempt(relay, f"u@{domain}", 1))
    policy_applied(await attempt(relay, f"u@{domain}", 2))
    assert len(world.policy_server.requests_for(domain)) >= 2  # fetched again, not cached
    show = await run_cli(relay.config_path, "policy", "show", domain)
    assert (show.code, "no cached policy" in show.stderr) == (1, True)

    world.policy_server.misbehave(domain, "refuse")
    event = await relay.delivery(f"u@{domain}", "sent")
    no_policy_applied(event, sink)
    assert event["tlsrpt_result"] == "sts-policy-fetch-error"


async def test_sts_70_72_proactive_refresh_restarts_the_policy_lifetime(
    world: World, start_relay: StartRelay
) -> None:
    domain = "refreshed.test"
    max_age = 5
    await world.sts_domain(domain, mode=None)
    probe = await world.add_mx(f"probe.{domain}", world.allocate_ip(), cert_kind="self")
    world.publish_policy(domain, mx=[f"mx1.{domain}", f"probe.{domain}"], max_age=max_age)
    relay = await start_relay(policy={"refresh_interval": 0.2})
    await relay.send([f"u@{domain}"])
    assert (await relay.delivery(f"u@{domain}", "sent"))["verified"] is True
    fetched_by = time.time()  # the first fetch happened before this

    # STS-70: with no more mail, the policy is fetched again before it expires.
    await eventually(
        lambda: len(relay.find(event="policy_fetched", domain=domain)) >= 2,
        timeout=max_age + 5,
        message="no proactive refresh",
    )
    world.policy_server.misbehave(domain, "refuse")
    world.mx_record(domain, (10, f"probe.{domain}"))

    # STS-72: after the first fetch's max_age, the refreshed policy still applies.
    await asyncio.sleep(max(0.0, fetched_by + max_age + 0.2 - time.time()))
    await relay.send([f"v@{domain}"])
    policy_applied(await relay.delivery(f"v@{domain}", "deferred"))
    assert probe.messages == []


async def test_sts_71_failed_refresh_warns_unless_the_cached_mode_is_none(
    world: World, start_relay: StartRelay
) -> None:
    max_age = 2
    for domain, mode in (("refresh-enforce.test", "enforce"), ("refresh-none.test", "none")):
        await world.sts_domain(domain, mode=None)
        world.publish_policy(domain, mode=mode, max_age=max_age)
    relay = await start_relay(policy={"refresh_interval": 0.2})
    await relay.send(["u@refresh-enforce.test", "u@refresh-none.test"])
    for domain in ("refresh-enforce.test", "refresh-none.test"):
        await relay.delivery(f"u@{domain}", "sent")
        world.policy_server.misbehave(domain, "refuse")

    def refresh_failures() -> dict[str, tuple[str, str]]:
        return {
            e["domain"]: (e["level"], e["cached_mode"])
            for e in relay.find(event="policy_fetch_failed")
        }

    await eventually(lambda: len(refresh_failures()) == 2, timeout=max_age + 5)
    assert refresh_failures() == {
        "refresh-enforce.test": ("warning", "enforce"),
        "refresh-none.test": ("info", "none"),
    }
    # Only the refresh saw the failure: no mail was sent after the first delivery.
    assert len(relay.find(event="delivery")) == 2


async def test_sts_76_each_retry_uses_the_state_of_the_moment(
    world: World, start_relay: StartRelay
) -> None:
    domain = "fixed-later.test"
    probe = await probe_domain(world, domain)
    relay = await start_relay(queue=RETRY_EVERY_SECOND)
    await relay.send([f"u@{domain}"])
    policy_applied(await attempt(relay, f"u@{domain}", 1))
    policy_applied(await attempt(relay, f"u@{domain}", 2))  # STS-75: transient, retried
    assert relay.find(event="bounce_queued") == []

    ip = probe.ip
    await world.remove_mx(f"mx1.{domain}")
    fixed = await world.add_mx(f"mx1.{domain}", ip)

    event = await relay.delivery(f"u@{domain}", "sent")
    assert (event["verified"], event["sts_mode"], event["attempt"] >= 3) == (True, "enforce", True)
    assert len(fixed.messages) == 1
    assert probe.messages == []
    assert world.bounce_sink.messages == []


async def test_sts_77_domains_sharing_an_mx_each_get_their_own_policy(
    world: World, start_relay: StartRelay
) -> None:
    shared = await probe_domain(world, "d1.test")  # enforce, mx: mx1.d1.test
    world.mx_record("d2.test", (10, "mx1.d1.test"))  # no policy
    relay = await start_relay(queue=RETRY_EVERY_SECOND)

    await relay.send(["u@d1.test", "u@d2.test"])

    no_policy_applied(await relay.delivery("u@d2.test", "sent"), shared)
    policy_applied(await attempt(relay, "u@d1.test", 1))
    # The retry finds d2's unverified connection idle in the pool and must not use it.
    policy_applied(await attempt(relay, "u@d1.test", 2))
    assert [m.rcpt_tos for m in shared.messages] == [["u@d2.test"]]
    assert world.policy_server.requests_for("d2.test") == []
