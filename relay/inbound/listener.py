"""The SMTP listener: accepts mail from applications and hands it to the queue.

Owns the handler side of receiving SMTP on top of aiosmtpd (relay/inbound/session.py has the
protocol, and relay/inbound/data.py reads DATA, bare CR/LF refusal included): who may relay
(trusted networks or SMTP AUTH), which recipients are refused outright (address literals,
a domainless postmaster), loop detection (RFC 5321 §6.3), trace and missing headers
(spliced into the one buffer DATA was read into), the RFC 3461 parameters and RFC 8689's
REQUIRETLS (offered in TLS sessions only) kept with the message, the rule that 250 is sent
only once the store has the
message, and the listening sockets (plain with STARTTLS, and implicit TLS). Knows nothing
of delivery, MTA-STS or how the store keeps messages: it calls `put()` and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from aiosmtpd.smtp import Session

from mailqueue import new_queue_id
from mailqueue.model import NewMessage
from mailqueue.store import StoreUnavailable
from relay.config import Config, users_file_path
from relay.events import EventLog
from relay.inbound.auth import AuthService, PasswordChecks
from relay.inbound.data import MessageBuffer
from relay.inbound.envelope import RelayEnvelope
from relay.inbound.esmtp import path_ok
from relay.inbound.headers import count_received_fields, missing_headers, received_header
from relay.inbound.lifetime import write_transport
from relay.inbound.replies import REPLY_BARE_CRLF, REPLY_RELAY_DENIED, peer_ip, report_error
from relay.inbound.session import RelaySMTP
from relay.inbound.settings import SessionSettings
from relay.inbound.slots import DataBudget, SessionTable
from relay.inbound.sockets import BACKLOG, ListeningSocket, bind_listening
from relay.inbound.tls import ServerTls
from relay.users import FailureLimiter, UsersFile

__all__ = ["REPLY_BARE_CRLF", "Listener", "MessageStore", "path_ok"]

# RFC 5321 §6.3: a loop is assumed past this many Received fields (the RFC's floor is 100).
MAX_RECEIVED = 100
_TRUST_CACHE_SIZE = 4096  # client addresses whose trust is remembered
_STOP_GRACE_S = 10.0

REPLY_LOOP = "554 5.4.6 Too many Received headers (mail loop?)"
REPLY_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
REPLY_ADDRESS_LITERAL = "550 5.1.2 Address literals are not accepted as recipients"
# RFC 5321 §4.5.1 wants "RCPT TO:<Postmaster>" accepted by a system that delivers mail; this
# relay has no local mailboxes, and guessing a domain for it could send it anywhere.
REPLY_POSTMASTER = (
    "550 5.1.1 No local mailboxes here: this relay only forwards mail, write to postmaster@<domain>"
)
REPLY_STORE_FAILED = "451 4.3.0 Temporary storage failure, try again later"
REPLY_SHUTDOWN = "421 4.3.2 Service shutting down, try again later"


class MessageStore(Protocol):
    """What the listener needs of the queue (mailqueue.store.QueueStore has it)."""

    async def put(self, msg: NewMessage) -> str: ...


class _Handler:
    """aiosmtpd hooks: relay permission, recipient limit, and the hand-over to the store."""

    def __init__(
        self,
        *,
        config: Config,
        store: MessageStore,
        events: EventLog,
        on_queued: Callable[[], None],
        sessions: SessionTable,
    ) -> None:
        self.events = events
        self._listen = config.listen
        self._store = store
        self._on_queued = on_queued
        self._sessions = sessions
        self._networks = [ipaddress.ip_network(n) for n in config.listen.trusted_networks]
        # Answers per address: parsing it costs more than the rest of a RCPT (every
        # connection and every RCPT asks, mostly for the same few application hosts).
        self._trusted: dict[str, bool] = {}

    def is_trusted(self, ip: str) -> bool:
        known = self._trusted.get(ip)
        if known is None:
            if len(self._trusted) >= _TRUST_CACHE_SIZE:
                self._trusted.clear()  # many clients: start again rather than grow
            known = self._trusted[ip] = self._is_trusted(ip)
        return known

    def _is_trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip.partition("%")[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._networks)

    async def handle_EHLO(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: RelayEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # this hook's duty (aiosmtpd's new-style EHLO hook)
        extra = ["250-DSN"]  # RFC 3461 §4
        if server.tls_version() is not None:
            # RFC 8689 §2: REQUIRETLS only inside TLS (after STARTTLS, or implicit TLS).
            extra.append("250-REQUIRETLS")
        return [*responses[:-1], *extra, responses[-1]]

    async def handle_RCPT(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: RelayEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        # Authenticated clients may relay from anywhere (RFC 6409 §4.1), others only from
        # the trusted networks; the same refusal for every address trick.
        if not (session.authenticated or self.is_trusted(peer_ip(session))):
            server.reject("rcpt", REPLY_RELAY_DENIED, "relay access denied", rcpt=address)
            return REPLY_RELAY_DENIED
        if "@" not in address:  # <postmaster>: the session lets no other domainless path in
            server.reject("rcpt", REPLY_POSTMASTER, "postmaster without a domain", rcpt=address)
            return REPLY_POSTMASTER
        if address.rpartition("@")[2].startswith("["):
            # A literal destination has no MX and no MTA-STS policy (RFC 8461 §3.4): it
            # could only go out unprotected, to any address a client names. Refused.
            server.reject("rcpt", REPLY_ADDRESS_LITERAL, "address literal", rcpt=address)
            return REPLY_ADDRESS_LITERAL
        if len(envelope.rcpt_tos) >= self._listen.max_recipients:
            server.reject("rcpt", REPLY_TOO_MANY_RCPTS, "too many recipients", rcpt=address)
            return REPLY_TOO_MANY_RCPTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(
        self, server: RelaySMTP, session: Session, envelope: RelayEnvelope
    ) -> str:
        data = envelope.message
        if data is None:  # RelaySMTP always sets it once DATA ended well
            raise RuntimeError("DATA ended without content")
        headers = data.peek(0, data.header_end)
        if count_received_fields(headers) > MAX_RECEIVED:
            server.reject("data", REPLY_LOOP, "too many Received headers")
            return REPLY_LOOP
        client = peer_ip(session)
        sender = "" if envelope.mail_from == "<>" else str(envelope.mail_from)
        rcpts = tuple(map(str, envelope.rcpt_tos))
        queue_id = new_queue_id()  # chosen now: the Received id and the queue id agree
        message, message_id = self._stamp(
            data, headers, session, client, rcpts, queue_id, server.tls_version()
        )
        try:
            queue_id = await self._put(
                NewMessage(
                    sender,
                    rcpts,
                    message,
                    client,
                    dsn=envelope.dsn_request(),
                    queue_id=queue_id,
                    requiretls=envelope.requiretls,
                )
            )
        except StoreUnavailable as exc:
            self.events.store_error(error=str(exc))
            return REPLY_STORE_FAILED
        except Exception as exc:  # noqa: BLE001 - any storage failure is temporary for the client
            self.events.store_error(error=repr(exc))
            return REPLY_STORE_FAILED
        # The message is stored: from here on nothing may turn the reply into an error, or
        # the client would send it again (a duplicate).
        try:
            self.events.received(
                queue_id=queue_id,
                message_id=message_id,
                sender=sender,
                rcpts=list(rcpts),
                size=len(message),
                client=client,
            )
            self._on_queued()
        except Exception as exc:  # noqa: BLE001 - reported; the 250 stands
            report_error(self.events, client, f"after queueing {queue_id}: {exc!r}")
        server.transaction_done()
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def _stamp(
        self,
        data: MessageBuffer,
        headers: bytes,
        session: Session,
        client: str,
        rcpts: Sequence[str],
        queue_id: str,
        tls: str | None,
    ) -> tuple[bytes, str | None]:
        """Prepend Received (RFC 5321 §4.4); add Date and Message-ID if missing. Spliced
        into the DATA buffer: the result shares it, no copy of the content is made."""
        now = datetime.now(UTC)
        received = received_header(
            client_ip=client,
            helo=session.host_name,
            by_host=self._listen.hostname,
            queue_id=queue_id,
            tls=tls,
            when=now,
            # Only a single recipient is named: listing several would disclose them all.
            for_rcpt=rcpts[0] if len(rcpts) == 1 else None,
        )
        end = data.header_end
        added, message_id = missing_headers(
            headers,
            data.peek(end, end + 2),
            hostname=self._listen.hostname,
            now=now,
            queue_id=queue_id,
        )
        return data.finish([(0, received), (end, added)]), message_id

    async def _put(self, msg: NewMessage) -> str:
        # Counted so that stop() lets a store in progress finish and answer its client.
        self._sessions.storing += 1
        self._sessions.quiet.clear()
        try:
            return await self._store.put(msg)
        finally:
            self._sessions.storing -= 1
            if self._sessions.storing == 0:
                self._sessions.quiet.set()


class Listener:
    """Binds every `listen.addresses` (plain, STARTTLS when a certificate is configured) and
    `listen.tls_addresses` (implicit TLS) entry and serves SMTP on them until stopped."""

    def __init__(
        self,
        config: Config,
        *,
        store: MessageStore,
        events: EventLog,
        on_queued: Callable[[], None],
    ) -> None:
        self._config = config.listen
        self._tls_files = (config.tls.cert_file, config.tls.key_file)
        self._tls: ServerTls | None = None
        self._sessions = SessionTable(
            config.listen.max_sessions,
            config.listen.max_sessions_per_client,
            reserved=config.listen.reserved_sessions,
            data=DataBudget(config.listen.max_data_in_flight),
        )
        self._handler = _Handler(
            config=config,
            store=store,
            events=events,
            on_queued=on_queued,
            sessions=self._sessions,
        )
        auth = config.auth
        self._checks = PasswordChecks(
            UsersFile(users_file_path(config)), threads=auth.hash_threads, queue=auth.hash_queue
        )
        self._auth = AuthService(
            checks=self._checks,
            per_client=FailureLimiter(auth.max_failures, auth.failure_window, time.monotonic),
            per_user=FailureLimiter(
                auth.max_failures_per_user, auth.failure_window, time.monotonic
            ),
        )
        self._auth_required = config.auth.required
        self._session_settings = {tls: self._settings(implicit_tls=tls) for tls in (False, True)}
        self._servers: list[asyncio.Server] = []
        self._bound: list[str] = []

    @property
    def bound_addresses(self) -> list[str]:
        """The "host:port" of every listening socket (real ports when 0 was configured),
        the `listen.addresses` ones first, then the implicit-TLS ones."""
        return list(self._bound)

    def reload_tls(self) -> None:
        """Load the certificate and key files again (SIGHUP). New connections use them;
        on error (relay.inbound.tls.ServerTlsError, an OSError) the old ones stay."""
        if self._tls is not None:
            self._tls.reload()

    def _settings(self, *, implicit_tls: bool) -> SessionSettings:
        cfg = self._config
        return SessionSettings(
            data_timeout=cfg.data_timeout,
            max_errors=cfg.max_errors,
            auth_required=self._auth_required,
            auth=self._auth,
            untrusted_timeout=cfg.untrusted_session_timeout,
            max_session_time=cfg.max_session_time,
            implicit_tls=implicit_tls,
        )

    def _protocol(self, *, implicit_tls: bool) -> RelaySMTP:
        cfg = self._config
        settings = self._session_settings[implicit_tls]  # frozen: one each, made once
        starttls = self._tls.front if self._tls is not None and not implicit_tls else None
        return RelaySMTP(
            self._handler,
            sessions=self._sessions,
            settings=settings,
            data_size_limit=cfg.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=cfg.hostname or None,
            ident="ESMTP sts-relay",
            timeout=cfg.command_timeout,
            tls_context=starttls,
            loop=asyncio.get_running_loop(),
        )

    async def _serve_on(self, listening: ListeningSocket) -> None:
        loop = asyncio.get_running_loop()
        implicit_tls = listening.implicit_tls
        server = await loop.create_server(
            lambda: self._protocol(implicit_tls=implicit_tls),
            sock=listening.sock,
            ssl=self._tls.front if implicit_tls and self._tls is not None else None,
            backlog=BACKLOG,
        )
        self._servers.append(server)
        self._bound.append(listening.address)

    async def start(self, sockets: Sequence[ListeningSocket] | None = None) -> None:
        """Serve on `sockets` (bound by a supervisor, shared with other processes), or on
        sockets bound here from `listen.addresses` and `listen.tls_addresses`."""
        cert_file, key_file = self._tls_files
        if cert_file is not None and key_file is not None:
            self._tls = ServerTls(cert_file, key_file)
        try:
            for listening in bind_listening(self._config) if sockets is None else sockets:
                await self._serve_on(listening)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop accepting; let stores in progress answer; then close every session."""
        servers, self._servers = self._servers, []
        self._bound = []
        for server in servers:
            server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_STOP_GRACE_S):
                await self._sessions.quiet.wait()
        for session in list(self._sessions.live):
            transport = write_transport(session.transport)
            if transport is not None and not transport.is_closing():
                # A TLS transport whose connection just went away raises on write.
                with contextlib.suppress(Exception):
                    transport.write(REPLY_SHUTDOWN.encode() + b"\r\n")
                transport.close()
        for server in servers:
            await server.wait_closed()
        self._checks.close()
