"""Opportunistic means "any encryption beats none" (issue 11, item 9), on a serving relay.

An MX that speaks only TLS 1.0: without a policy the mail goes out over TLS 1.0 (logged
with that version), not in plaintext; under `testing` too, with the failure reported. When
something is verified (an `enforce` policy, a `require-verified` override) the floor stays
TLS 1.2: nothing is sent, the mail waits.
"""

from __future__ import annotations

import ssl
import warnings

from tests.e2e.conftest import StartRelay
from tests.support.smtp import MxSink
from tests.support.world import World


async def tls10_only_mx(world: World, domain: str) -> MxSink:
    """`domain MX 10 mx1.<domain>`: a sink with a good certificate that speaks TLS 1.0 only."""
    host = f"mx1.{domain}"
    ctx = world.pki.server_context([host])
    with warnings.catch_warnings():  # the constants are deprecated: that is the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 allows TLS 1.0 only at level 0
    sink = MxSink(world.allocate_ip(), world.delivery_port, hostname=host, cert=ctx)
    await sink.start()
    world.sinks[host] = sink  # stopped with the world
    world.dns.add(host, "A", sink.ip)
    world.mx_record(domain, (10, host))
    return sink


async def test_a_tls10_only_mx_gets_tls_when_opportunistic_and_nothing_when_verified(
    start_relay: StartRelay, world: World
) -> None:
    assert world.delivery_port  # the lab's bounce sink fixed the MX port
    none = await tls10_only_mx(world, "nopolicy-tls10.test")
    testing = await tls10_only_mx(world, "testing-tls10.test")
    world.publish_policy("testing-tls10.test", mode="testing")
    enforce = await tls10_only_mx(world, "enforce-tls10.test")
    world.publish_policy("enforce-tls10.test", mode="enforce")
    override = await tls10_only_mx(world, "override-tls10.test")
    relay = await start_relay(
        tls={"overrides": ["override-tls10.test=require-verified match=mx1.override-tls10.test"]}
    )

    await relay.send(["u@nopolicy-tls10.test"])
    await relay.send(["u@testing-tls10.test"])
    await relay.send(["u@enforce-tls10.test"])
    await relay.send(["u@override-tls10.test"])

    sent = await relay.delivery("u@nopolicy-tls10.test", "sent")
    assert (sent["tls"], sent["verified"], sent["tlsrpt_result"]) == ("TLSv1", False, None)
    assert [m.tls_version for m in none.messages] == ["TLSv1"]

    reported = await relay.delivery("u@testing-tls10.test", "sent")
    assert (reported["tls"], reported["tlsrpt_result"]) == ("TLSv1", "validation-failure")
    assert [m.tls_version for m in testing.messages] == ["TLSv1"]

    for domain, sink in (("enforce-tls10.test", enforce), ("override-tls10.test", override)):
        deferred = await relay.delivery(f"u@{domain}", "deferred")
        assert deferred["tlsrpt_result"] == "validation-failure"
        assert "TLS handshake failed" in deferred["reason"]
        assert sink.messages == []
        assert sink.mail_commands == 0  # not a word of the envelope, in the clear or not
