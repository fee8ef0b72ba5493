"""Hostile policy hosts and DNS servers, through the running relay (issue 5 items 7 and 8).

Each broken domain's MX presents an untrusted certificate: had a policy been applied, the
mail would have been deferred, so "sent" proves it went out as without a policy, and the
log line carries the RFC 8460 result type. A domain with broken DNS never crashes the worker
and never holds up a healthy domain in the same message.
"""

from __future__ import annotations

from tests.e2e.conftest import StartRelay
from tests.support.world import World, policy_body

# domain -> the tlsrpt_result its delivery line must carry
POLICY_FAILURES = {
    "policy-redirect.test": "sts-policy-fetch-error",
    "policy-oversize.test": "sts-policy-fetch-error",
    "policy-drip.test": "sts-policy-fetch-error",
    "policy-status-404.test": "sts-policy-fetch-error",
    "policy-status-500.test": "sts-policy-fetch-error",
    "policy-html.test": "sts-policy-fetch-error",
    "policy-wrong-name.test": "sts-webpki-invalid",
    "policy-garbage.test": "sts-policy-invalid",
}


async def test_every_policy_fetch_failure_delivers_as_without_policy(
    world: World, start_relay: StartRelay
) -> None:
    server = world.policy_server
    for domain in POLICY_FAILURES:
        await world.sts_domain(domain, cert_kind="self")
    server.misbehave("policy-redirect.test", "redirect")
    server.misbehave("policy-oversize.test", "oversize")
    server.misbehave("policy-drip.test", "drip")
    server.drip_interval = 0.2
    for status in (404, 500):
        domain = f"policy-status-{status}.test"
        server.serve(domain, policy_body("enforce", [f"mx1.{domain}"], 86400), status=status)
    server.serve(
        "policy-html.test",
        policy_body("enforce", ["mx1.policy-html.test"], 86400),
        content_type="text/html",
    )
    server.cert_names("mta-sts.policy-wrong-name.test", ["other.test"])
    world.publish_policy("policy-garbage.test", body="this is not a policy\r\n")
    relay = await start_relay(policy={"fetch_deadline": 1.5})

    await relay.send([f"u@{d}" for d in POLICY_FAILURES])

    for domain, result in POLICY_FAILURES.items():
        event = await relay.delivery(f"u@{domain}", "sent", within=30)
        assert event["sts_mode"] is None, domain
        assert event["verified"] is False, domain
        assert event["tlsrpt_result"] == result, domain
        assert len(world.sink(f"mx1.{domain}").messages) == 1, domain
        [failed] = relay.find(event="policy_fetch_failed", domain=domain)
        assert failed["result"] == result, domain
    # Redirects were not followed; the drip was cut off by the deadline.
    paths = [r.path for r in server.requests_for("policy-redirect.test")]
    assert set(paths) == {"/.well-known/mta-sts.txt"}
    assert (
        "deadline"
        in relay.find(event="policy_fetch_failed", domain="policy-drip.test")[0]["reason"]
    )
    assert relay.find(event="worker_error") == []


async def test_broken_dns_for_one_domain_never_stalls_another(
    world: World, start_relay: StartRelay
) -> None:
    healthy = await world.sts_domain("healthy.test")
    broken: dict[str, str] = {}
    for mode in ("garbage", "truncate", "timeout"):
        # The MTA-STS TXT lookup fails: delivered as without a policy (no cached one).
        txt_domain = f"txt-{mode}.test"
        await world.sts_domain(txt_domain, cert_kind="self")
        world.dns.fail(f"_mta-sts.{txt_domain}", "TXT", mode)
        broken[txt_domain] = "sent"
        # The MX lookup fails: deferred, never bounced, never a crash.
        mx_domain = f"mx-{mode}.test"
        world.dns.fail(mx_domain, None, mode)
        broken[mx_domain] = "deferred"
    # A huge TXT answer (over UDP's 512 bytes, so truncated and retried over TCP) with
    # junk beside the one STS record.
    await world.sts_domain("txt-huge.test")
    world.dns.txt("_mta-sts.txt-huge.test", *(("x" * 250,) * 40))
    broken["txt-huge.test"] = "sent"
    relay = await start_relay(dns={"timeout": 3})

    # One message to all of them, the healthy domain last.
    await relay.send([*(f"u@{d}" for d in broken), "u@healthy.test"])

    sent = await relay.delivery("u@healthy.test", "sent", within=30)
    assert sent["verified"] is True
    assert len(healthy.messages) == 1
    outcomes = {
        d: await relay.delivery(f"u@{d}", status, within=30) for d, status in broken.items()
    }
    # The healthy domain did not wait for the lookups that time out.
    order = [e for e in relay.events if e["event"] == "delivery"]
    assert order.index(sent) < order.index(outcomes["mx-timeout.test"])
    assert order.index(sent) < order.index(outcomes["txt-timeout.test"])
    for domain in ("txt-garbage.test", "txt-truncate.test", "txt-timeout.test"):
        assert outcomes[domain]["sts_mode"] is None
        assert len(world.sink(f"mx1.{domain}").messages) == 1
    assert outcomes["txt-huge.test"]["sts_mode"] == "enforce"
    assert relay.find(event="worker_error") == []
    assert relay.find(event="delivery", status="bounced") == []
