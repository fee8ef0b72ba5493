"""The per-transaction deadline grows with the message size (issue 11, item 10).

`client.transact` bounds one transaction by its command timeouts; a large message to a slow
MX also needs time on the wire. Here every step is well within `delivery.command_timeout`
(each chunk drains, the final reply comes soon after the last byte), but the whole transfer
takes longer than the seven command timeouts a one-recipient transaction used to get.

The relay's side of the connection gets a small send buffer, as a far MX would impose
through its window: on loopback the kernel would otherwise take the whole message at once
and the pace would show only as a long wait for the final reply.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest

from policy.webpki import client_context, unverified_context
from relay.delivery.client import Connection, Dialer, connect, transact
from relay.delivery.envelope import Envelope
from relay.delivery.tls import TlsRequirement
from tests.support.slow_mx import SlowMx
from tests.support.world import World

COMMAND_TIMEOUT = 1.0  # one recipient: 7 s for the transaction without the size allowance
SIZE = 3 * 1024 * 1024  # at 400 KiB/s: about 7.7 s on the wire


@pytest.fixture
async def slow_mx(world: World) -> AsyncIterator[SlowMx]:
    mx = SlowMx(world.allocate_ip(), world.delivery_port, rate=400 * 1024)
    await mx.start()
    yield mx
    await mx.stop()


async def test_a_transfer_longer_than_the_command_timeouts_allow_still_completes(
    world: World, slow_mx: SlowMx
) -> None:
    dialer = Dialer(
        port=world.delivery_port,
        helo="relay.test",
        verified_ctx=client_context(None),
        unverified_ctx=unverified_context(),
        connect_timeout=5.0,
        command_timeout=COMMAND_TIMEOUT,
    )
    conn = await connect(slow_mx.ip, "mx.slow.test", TlsRequirement.OPPORTUNISTIC, dialer)
    assert isinstance(conn, Connection), conn
    sock = conn.smtp.extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
    body = b"Subject: large\r\n\r\n" + (b"z" * 78 + b"\r\n") * (SIZE // 80)
    try:
        result = await transact(
            conn,
            Envelope("app@src.test", ["u@slow.test"], body),
            command_timeout=COMMAND_TIMEOUT,
            reused=False,
        )
    finally:
        conn.close()

    assert result.error is None, result.error
    assert result.data_reply == (250, "2.0.0 taken, slowly")
    (transfer,) = slow_mx.transfers
    assert transfer.complete
