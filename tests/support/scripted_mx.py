"""Scripted plain-SMTP servers for the delivery client's tests, and the Dialer to reach them.

Owns the lifetime of one `asyncio.start_server` on 127.0.0.1 (an ephemeral port) serving a
test's own handler, and a Dialer for it (no TLS, short timeouts). On leaving, the server
and the handler's connections are closed and its tasks awaited. Knows nothing of what the
handler says.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from policy.webpki import client_context, unverified_context
from relay.delivery.client import Dialer

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]


@asynccontextmanager
async def serving(
    handler: Handler,
    writers: list[asyncio.StreamWriter],
    *,
    tasks: set[asyncio.Task[None]] | None = None,
    command_timeout: float = 5.0,
    limit: int = 1 << 16,
) -> AsyncIterator[Dialer]:
    """`handler` served until the block ends; `writers` (and `tasks`) are the handler's
    connections (and their tasks), closed (and awaited) then."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0, limit=limit)
    try:
        yield Dialer(
            port=server.sockets[0].getsockname()[1],
            helo="relay.test",
            verified_ctx=client_context(None),
            unverified_ctx=unverified_context(),
            connect_timeout=5.0,
            command_timeout=command_timeout,
        )
    finally:
        server.close()
        for writer in writers:
            writer.close()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        await server.wait_closed()
