"""A plaintext MX that reads mail data at a set pace, as a far or overloaded receiver does.

Owns one small SMTP server (greeting, EHLO, MAIL, RCPT, DATA, QUIT; no STARTTLS) whose
listening socket has a small receive buffer, so that the pace shows on the sender's side
of the connection. Records each transaction: its MAIL command, the bytes of data read and
whether the final "." arrived. Knows nothing about the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass

_END = b"\r\n.\r\n"


@dataclass
class Transfer:
    """One DATA phase as this MX saw it."""

    started: float  # loop time of the 354
    received: int = 0  # bytes of data read, the final "." included
    complete: bool = False  # the final "." arrived (and 250 was sent)


class SlowMx:
    """SMTP on (ip, port) reading DATA at `rate` bytes per second."""

    def __init__(self, ip: str, port: int, *, rate: int, hostname: str = "slow.test") -> None:
        self.ip, self.port, self.rate, self.hostname = ip, port, rate, hostname
        self.sessions = 0
        self.transfers: list[Transfer] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Set before listen(): accepted sockets inherit it, and the window stays small.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.bind((self.ip, self.port))
        sock.listen()
        self._server = await asyncio.start_server(self._serve, sock=sock, limit=16 * 1024)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()  # the session reads EOF and ends
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.sessions += 1
        try:
            writer.write(f"220 {self.hostname} ESMTP\r\n".encode())
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(f"250-{self.hostname}\r\n250 8BITMIME\r\n".encode())
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    if not await self._data(reader):
                        return
                    writer.write(b"250 2.0.0 taken, slowly\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                else:  # MAIL, RCPT, RSET, NOOP
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _data(self, reader: asyncio.StreamReader) -> bool:
        """Read the data at the set pace; True once the final "." arrived."""
        loop = asyncio.get_running_loop()
        transfer = Transfer(started=loop.time())
        self.transfers.append(transfer)
        tail = b""
        step = max(self.rate // 20, 1)  # twenty reads a second
        while True:
            piece = await reader.read(step)
            if not piece:
                return False  # the sender gave up mid-body
            transfer.received += len(piece)
            tail = (tail + piece)[-len(_END) :]
            if tail == _END:
                transfer.complete = True
                return True
            await asyncio.sleep(len(piece) / self.rate)
