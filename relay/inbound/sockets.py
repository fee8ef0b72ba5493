"""The listening sockets, bound before anything serves on them.

Binding is separate from serving so that `serve` with several processes binds once, in the
supervisor (a port in use is one clear error before any process starts), and every process
accepts from the same sockets (relay/processes/): the kernel hands each connection to one
of them, and a process that dies leaves no connection queued behind it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from relay.config import ListenConfig, format_hostport, parse_hostport

# Connections the kernel queues before a process accepts them (asyncio's default is 100:
# too few for bursts of one-connection-per-message clients shared by several processes).
BACKLOG = 1024


@dataclass(frozen=True, slots=True)
class ListeningSocket:
    sock: socket.socket
    implicit_tls: bool  # listen.tls_addresses (port 465 style) rather than listen.addresses

    @property
    def address(self) -> str:
        """The bound "host:port" (the real port when 0 was configured)."""
        name = self.sock.getsockname()
        return format_hostport(str(name[0]), int(name[1]))


def bind_listening(config: ListenConfig) -> list[ListeningSocket]:
    """Bind every `listen.addresses` entry, then every `listen.tls_addresses` one; OSError
    (a port in use, an address not on this host) after closing what was bound."""
    bound: list[ListeningSocket] = []
    try:
        for address in config.addresses:
            bound += [ListeningSocket(s, False) for s in _bind(address)]
        for address in config.tls_addresses:
            bound += [ListeningSocket(s, True) for s in _bind(address)]
    except BaseException:
        for entry in bound:
            entry.sock.close()
        raise
    return bound


def _bind(address: str) -> list[socket.socket]:
    """One socket per address the host part resolves to (as asyncio's create_server)."""
    host, port = parse_hostport(address)
    infos = socket.getaddrinfo(
        host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _name, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
