"""`sts-relay health` (the image's HEALTHCHECK): reads the configuration as `serve` does and
asks the relay it describes, through /readyz or, with metrics off, the SMTP greeting."""

from __future__ import annotations

from tests.e2e.conftest import StartRelay
from tests.e2e.relay_process import run_cli
from tests.support.world import free_port


async def test_health_asks_readyz_where_the_toml_file_puts_metrics(
    start_relay: StartRelay,
) -> None:
    address = f"127.0.0.1:{free_port()}"
    relay = await start_relay(metrics={"address": address})
    healthy = await run_cli(relay.config_path, "health")
    assert healthy.code == 0, healthy.stderr
    assert healthy.stdout.startswith(f"healthy: {address} /readyz 200")

    assert await relay.stop() == 0
    down = await run_cli(relay.config_path, "health")
    assert down.code == 1
    assert down.stderr.startswith(f"sts-relay: unhealthy: {address}")


async def test_with_metrics_off_health_checks_the_smtp_greeting(start_relay: StartRelay) -> None:
    relay = await start_relay(metrics={"address": ""})
    healthy = await run_cli(relay.config_path, "health")
    assert healthy.code == 0, healthy.stderr
    assert f"healthy: {relay.host}:{relay.port} SMTP greeting '220 " in healthy.stdout

    assert await relay.stop() == 0
    down = await run_cli(relay.config_path, "health")
    assert down.code == 1
    assert "unhealthy" in down.stderr


async def test_health_needs_a_fixed_port(start_relay: StartRelay) -> None:
    relay = await start_relay()  # the lab's metrics.address is 127.0.0.1:0
    done = await run_cli(relay.config_path, "health")
    assert done.code == 2
    assert "port 0" in done.stderr
    assert "Traceback" not in done.stderr
