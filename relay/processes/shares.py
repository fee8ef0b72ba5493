"""How many processes serve, and each one's share of the limits the operator set.

Limits in the configuration are the relay's, whatever `serve.processes` is: a process gets
its part, rounded up (never below one). Capacities (sessions, deliveries at once,
connections to one MX, DATA held in memory) are then never smaller than configured, and at
most one per process larger. AUTH failure thresholds are split the same way, so a guesser
whose connections the kernel spreads over the processes gets at most one try per process
more than configured, while a user's typo (a client that tries PLAIN then LOGIN counts two)
is not punished harder than with one process.

`listen.max_sessions_per_client` is the exception: every process applies it whole. The
kernel does not spread one client's connections evenly (the first process to wake takes
the next connection), so a split limit would refuse a client well below the configured
number; whole, a client may hold up to that many sessions in each process.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

from relay.config import Config


def process_count(configured: int, cpus: int | None = None) -> int:
    """`serve.processes`, 0 meaning one per CPU this process may run on."""
    if configured > 0:
        return configured
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cpus or 1)


def _up(total: int, count: int) -> int:
    return max(1, math.ceil(total / count))


def process_share(cfg: Config, count: int) -> Config:
    """The configuration one of `count` processes runs with."""
    if count == 1:
        return cfg
    listen, delivery, auth = cfg.listen, cfg.delivery, cfg.auth
    return replace(
        cfg,
        listen=replace(
            listen,
            max_sessions=_up(listen.max_sessions, count),
            reserved_sessions=math.ceil(listen.reserved_sessions / count),
            # Each process must still hold one message of the largest size.
            max_data_in_flight=max(
                listen.max_message_size,
                _up(listen.max_data_in_flight or 4 * listen.max_message_size, count),
            ),
        ),
        delivery=replace(
            delivery,
            concurrency=_up(delivery.concurrency, count),
            max_connections_per_host=_up(delivery.max_connections_per_host, count),
        ),
        auth=replace(
            auth,
            max_failures=_up(auth.max_failures, count),
            max_failures_per_user=_up(auth.max_failures_per_user, count),
        ),
    )
