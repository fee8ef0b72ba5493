"""One process of a multi-process relay, from the fork to its exit code.

A whole relay (relay/app.py `running` and `work`) on the sockets the supervisor bound,
with its share of the limits and its own lease owner; it answers the supervisor on its
channel (figures, readiness, stop) and stops gracefully on `stop`, on SIGTERM, or when the
channel closes (the supervisor died). SIGINT is the supervisor's: a terminal's Ctrl-C
reaches the whole process group, and the supervisor stops the set in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Sequence

from mailqueue.ids import use_id_slot
from relay.app import ConfigLoader, ProcessRole, Relay, readiness, running, work
from relay.config import Config
from relay.event_loop import run_loop
from relay.events import EventLog
from relay.inbound.sockets import ListeningSocket
from relay.processes.channel import METRICS, READYZ, STOP, frame

# How long the answer to `stop` may take to go out once the process has drained.
_ANSWER_GRACE_S = 5.0


def child_main(
    cfg: Config,
    role: ProcessRole,
    sockets: Sequence[ListeningSocket],
    channel: socket.socket,
    load: ConfigLoader | None,
) -> int:
    """The process's whole life after the fork; its exit status."""
    # The supervisor's event loop is still in this process's memory, not running: its
    # signal wake-up descriptor and handlers must not fire here.
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    use_id_slot(role.id_slot)  # queue ids drawn at the same moment by siblings never meet
    events = EventLog(sys.stdout, fmt=cfg.log.format, level=cfg.log.level)
    try:
        run_loop(_serve(cfg, events, role, sockets, channel, load), cfg.serve.event_loop)
    except Exception as exc:  # noqa: BLE001 - said in the log; the supervisor starts another
        events.store_error(error=f"process {role.index} stopped by an error: {exc!r}")
        return 1
    return 0


async def _serve(
    cfg: Config,
    events: EventLog,
    role: ProcessRole,
    sockets: Sequence[ListeningSocket],
    channel: socket.socket,
    load: ConfigLoader | None,
) -> None:
    loop = asyncio.get_running_loop()
    stop, hangup = asyncio.Event(), asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hangup.set)
    reader, writer = await asyncio.open_connection(sock=channel)
    async with running(cfg, events, role=role, sockets=sockets) as relay:
        events.process_started(index=role.index, pid=os.getpid())
        drained: asyncio.Future[int] = loop.create_future()
        answering = asyncio.create_task(_answer(reader, writer, relay, role, stop, drained))
        try:
            abandoned = await work(relay, cfg, events, stop, role=role, hangup=hangup, load=load)
            drained.set_result(abandoned)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_ANSWER_GRACE_S):
                    await asyncio.shield(answering)
        finally:
            answering.cancel()
            writer.close()


async def _answer(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    relay: Relay,
    role: ProcessRole,
    stop: asyncio.Event,
    drained: asyncio.Future[int],
) -> None:
    """Answer the supervisor until it says `stop` (answered once drained) or is gone."""
    counts = relay.store.counts if role.primary else _no_counts
    while True:
        try:
            line = await reader.readline()
        except OSError:
            line = b""
        command = line.strip().decode("ascii", "replace")
        if not line.endswith(b"\n"):  # the supervisor is gone
            stop.set()
            return
        if command == METRICS:
            payload = await relay.metrics.render(counts)
        elif command == READYZ:
            payload = (await readiness(relay) or "").encode()
        elif command == STOP:
            stop.set()
            payload = str(await drained).encode()
        else:
            payload = b""
        try:
            writer.write(frame(payload))
            await writer.drain()
        except OSError:
            stop.set()
            return
        if command == STOP:
            return


async def _no_counts() -> dict[str, int]:
    """The queue gauges come from the primary alone (one store: adding them would double)."""
    return {}
