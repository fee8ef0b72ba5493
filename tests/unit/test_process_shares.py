"""Each process's part of the relay's limits (relay/processes/shares.py)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from relay.config import Config
from relay.processes.shares import process_count, process_share


def test_zero_means_one_per_cpu_and_a_number_is_kept() -> None:
    assert process_count(0, cpus=6) == 6
    assert process_count(0, cpus=0) == 1
    assert process_count(3, cpus=6) == 3


def test_one_process_keeps_the_configuration_as_it_is() -> None:
    cfg = Config()
    assert process_share(cfg, 1) is cfg


@given(
    count=st.integers(2, 64),
    sessions=st.integers(1, 5000),
    concurrency=st.integers(1, 500),
    per_host=st.integers(1, 50),
    failures=st.integers(1, 50),
)
def test_capacities_split_rounded_up_and_never_below_configured(
    count: int, sessions: int, concurrency: int, per_host: int, failures: int
) -> None:
    base = Config()
    cfg = replace(
        base,
        listen=replace(base.listen, max_sessions=sessions),
        delivery=replace(base.delivery, concurrency=concurrency, max_connections_per_host=per_host),
        auth=replace(base.auth, max_failures=failures),
    )
    share = process_share(cfg, count)
    for total, part in (
        (sessions, share.listen.max_sessions),
        (concurrency, share.delivery.concurrency),
        (per_host, share.delivery.max_connections_per_host),
        (failures, share.auth.max_failures),
    ):
        assert part >= 1
        assert part * count >= total  # the relay offers at least what was configured
        assert (part - 1) * count < total or part == 1  # and at most one per process more
    # One client's connections are not spread evenly by the kernel: that limit stays whole.
    assert share.listen.max_sessions_per_client == cfg.listen.max_sessions_per_client
    # Each process can still take one message of the largest size.
    assert share.listen.max_data_in_flight >= cfg.listen.max_message_size
