"""The SMTP listener: accepts mail from trusted applications and hands it to the queue.

Owns the receiving side of SMTP on top of aiosmtpd: who may relay (trusted networks),
limits (size, recipients, sessions, timeouts), envelope syntax, SMTP smuggling defences
(RFC 5321 §2.3.8), loop detection (§6.3), trace and missing headers, and the rule that
250 is sent only once the store has the message. Knows nothing of delivery, MTA-STS or
how the store keeps messages: it calls `put()` and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, AnyStr, Protocol, cast

from aiosmtpd.smtp import SMTP, Envelope, Session

from mailqueue.model import NewMessage
from mailqueue.store import StoreUnavailable
from relay.config import Config, format_hostport, parse_hostport
from relay.events import EventLog
from relay.headers import add_missing_headers, count_received, has_bare_cr_or_lf, received_header

# RFC 5321 §6.3: a loop is assumed past this many Received fields (the RFC's floor is 100).
MAX_RECEIVED = 100
_STOP_GRACE_S = 10.0

REPLY_RELAY_DENIED = "554 5.7.1 Relay access denied"
REPLY_BARE_CRLF = "550 5.5.2 Message contains bare CR or LF"
REPLY_LOOP = "554 5.4.6 Too many Received headers (mail loop?)"
REPLY_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
REPLY_TOO_MANY_SESSIONS = "421 4.7.0 Too many connections, try again later"
REPLY_STORE_FAILED = "451 4.3.0 Temporary storage failure, try again later"
REPLY_INTERNAL = "451 4.3.0 Internal error, try again later"
REPLY_BAD_ADDRESS = "501 5.1.3 Bad address syntax"
REPLY_BARE_LF_COMMAND = "500 5.5.2 Syntax error: command lines must end with CRLF"
REPLY_SHUTDOWN = "421 4.3.2 Service shutting down, try again later"
REPLY_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"

# aiosmtpd's stock replies that lack an RFC 3463 status, and ours in their place.
# (DSN and REQUIRETLS are not advertised, so NOTIFY/RET/ENVID/ORCPT/REQUIRETLS land in the
# "parameters not recognized" replies: RFC 3461 §4, RFC 8689 §2.)
_STOCK_REPLIES: dict[str, tuple[str, str | None]] = {
    "555 MAIL FROM parameters not recognized or not implemented": (
        "555 5.5.4 MAIL FROM parameters not recognized or not implemented",
        "mail",
    ),
    "555 RCPT TO parameters not recognized or not implemented": (
        "555 5.5.4 RCPT TO parameters not recognized or not implemented",
        "rcpt",
    ),
    "552 Error: message size exceeds fixed maximum message size": (REPLY_TOO_BIG, "mail"),
    "552 Error: Too much mail data": (REPLY_TOO_BIG, "data"),
    "553 5.1.3 Error: malformed address": (REPLY_BAD_ADDRESS, None),
}

# Envelope paths (RFC 5321 §4.1.2), checked on the raw argument: aiosmtpd's parser drops
# CR and NUL and "repairs" garbage (`<a b@c>` becomes `"a b"@c`); CR, LF and NUL must never
# reach the outbound client (aiosmtplib GHSA-v3q9-hj7j-63hq). UTF-8 allowed (RFC 6531).
_U8 = "\u0080-\ud7ff\ue000-\U0010ffff"
_ATOM = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_U8}]+"
_QUOTED = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_U8}]|\\[\x20-\x7e])*"'
_LABEL = rf"[A-Za-z0-9{_U8}](?:[A-Za-z0-9\-{_U8}]*[A-Za-z0-9{_U8}])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_MAILBOX = rf"(?:{_ATOM}(?:\.{_ATOM})*|{_QUOTED})@(?:{_DOMAIN}|\[[A-Za-z0-9.:]+\])"
_PATH = re.compile(rf"(?:<(?:@{_DOMAIN}(?:,@{_DOMAIN})*:)?({_MAILBOX})>|({_MAILBOX}))(?: |$)")
_NULL_PATH = re.compile(r"<>(?: |$)")


def path_ok(arg: str, *, null_ok: bool) -> bool:
    """Whether the text after `FROM:`/`TO:` starts with a well-formed path (params follow)."""
    arg = arg.lstrip(" ")
    if null_ok and _NULL_PATH.match(arg):
        return True
    match = _PATH.match(arg)
    if match is None:
        return False
    domain = (match.group(1) or match.group(2)).rpartition("@")[2]
    if domain.startswith("["):
        literal = domain[1:-1]
        if literal[:5].lower() == "ipv6:":
            literal = literal[5:]
        elif ":" in literal:
            return False
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            return False
    return True


def _peer_ip(session: Any) -> str:
    peer = getattr(session, "peer", None)
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


def _report_error(events: EventLog, client: str, error: str) -> None:
    # Must not raise: aiosmtpd would answer an exception raised here with its text.
    with contextlib.suppress(Exception):
        events.session_error(client=client, error=error)


class MessageStore(Protocol):
    """What the listener needs of the queue (mailqueue.store.QueueStore has it)."""

    async def put(self, msg: NewMessage) -> str: ...


class _BareLfCommand(Exception):
    """A command line ended with LF alone (RFC 5321 §2.3.8: only CRLF ends a line)."""


class _CrlfReader:
    """Wraps the session's StreamReader: refuses bare-LF command lines, and restarts the
    data timeout on every DATA line (aiosmtpd reads commands up to LF, DATA up to CRLF)."""

    def __init__(self, reader: Any, on_data_line: Callable[[], None]) -> None:
        object.__setattr__(self, "_reader", reader)
        object.__setattr__(self, "_on_data_line", on_data_line)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        line: bytes = await self._reader.readuntil(separator)
        if separator == b"\n":
            if not line.endswith(b"\r\n"):
                raise _BareLfCommand
        else:
            self._on_data_line()
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._reader, name, value)


class _Sessions:
    """The live sessions, for the concurrency limit and for shutdown."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.live: set[RelaySMTP] = set()
        self.storing = 0
        self.quiet = asyncio.Event()
        self.quiet.set()


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with our limits, syntax checks, replies and error handling."""

    def __init__(
        self, handler: _Handler, *, sessions: _Sessions, data_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self._sessions = sessions
        self._data_timeout = data_timeout
        self._events = handler.events
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None and len(self._sessions.live) >= self._sessions.limit:
            self._refused = True
            peer = transport.get_extra_info("peername")
            ip = str(peer[0]) if isinstance(peer, tuple) else ""
            self._events.rejected(
                client=ip, stage="connect", code="421 4.7.0", reason="too many sessions"
            )
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(REPLY_TOO_MANY_SESSIONS.encode() + b"\r\n")
            transport.close()
            return
        self._sessions.live.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self._sessions.live.discard(self)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        result: bool | None = super().eof_received()
        return result

    def _cb_client_connected(self, reader: Any, writer: Any) -> None:
        wrapped = _CrlfReader(reader, self._restart_data_timer)
        super()._cb_client_connected(cast(asyncio.StreamReader, wrapped), writer)

    def _restart_data_timer(self) -> None:
        self._reset_timeout(self._data_timeout)

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str) and status in _STOCK_REPLIES:
            status, stage = _STOCK_REPLIES[status]
            if stage is not None:
                self.reject(stage, status, "message too big" if "5.3.4" in status else status)
        await super().push(status)

    def reject(self, stage: str, reply: str, reason: str, rcpt: str | None = None) -> None:
        """Log a refusal as a `rejected` event (`reply` starts "554 5.7.1 ...")."""
        sender = self.envelope.mail_from if self.envelope is not None else None
        self._events.rejected(
            client=_peer_ip(self.session),
            stage=stage,
            code=reply[:9],
            reason=reason,
            sender=None if sender is None else ("" if sender == "<>" else sender),
            rcpt=rcpt,
        )

    async def smtp_MAIL(self, arg: str | None) -> None:
        rest = arg[5:] if arg is not None and arg[:5].upper() == "FROM:" else None
        if rest is not None and not path_ok(rest, null_ok=True):
            self.reject("mail", REPLY_BAD_ADDRESS, "bad sender address syntax")
            await super().push(REPLY_BAD_ADDRESS)
            return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        rest = arg[3:] if arg is not None and arg[:3].upper() == "TO:" else None
        if rest is not None and not path_ok(rest, null_ok=False):
            self.reject("rcpt", REPLY_BAD_ADDRESS, "bad recipient address syntax")
            await super().push(REPLY_BAD_ADDRESS)
            return
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str | None) -> None:
        await super().smtp_DATA(arg)
        if self.transport is not None:
            self._reset_timeout()  # back to the command timeout

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default answers 500 with the exception's text: never show internals.
        if isinstance(error, _BareLfCommand):
            return REPLY_BARE_LF_COMMAND
        _report_error(self._events, _peer_ip(self.session), repr(error))
        self.envelope = self._create_envelope()  # a half-done transaction is void
        return REPLY_INTERNAL


class _Handler:
    """aiosmtpd hooks: relay permission, recipient limit, and the hand-over to the store."""

    def __init__(
        self,
        *,
        config: Config,
        store: MessageStore,
        events: EventLog,
        on_queued: Callable[[], None],
        sessions: _Sessions,
    ) -> None:
        self.events = events
        self._listen = config.listen
        self._store = store
        self._on_queued = on_queued
        self._sessions = sessions
        self._networks = [ipaddress.ip_network(n) for n in config.listen.trusted_networks]

    def is_trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip.partition("%")[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._networks)

    async def handle_RCPT(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        if not self.is_trusted(_peer_ip(session)):
            server.reject("rcpt", REPLY_RELAY_DENIED, "relay access denied", rcpt=address)
            return REPLY_RELAY_DENIED
        if len(envelope.rcpt_tos) >= self._listen.max_recipients:
            server.reject("rcpt", REPLY_TOO_MANY_RCPTS, "too many recipients", rcpt=address)
            return REPLY_TOO_MANY_RCPTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        data: bytes = envelope.original_content or b""
        # RFC 5321 §2.3.8 and the 2023 smuggling attacks: refuse, never forward.
        if has_bare_cr_or_lf(data):
            server.reject("data", REPLY_BARE_CRLF, "bare CR or LF in message")
            return REPLY_BARE_CRLF
        if count_received(data) > MAX_RECEIVED:
            server.reject("data", REPLY_LOOP, "too many Received headers")
            return REPLY_LOOP
        client = _peer_ip(session)
        sender = "" if envelope.mail_from == "<>" else str(envelope.mail_from)
        rcpts = tuple(str(r) for r in envelope.rcpt_tos)
        message, message_id = self._stamp(data, session, client, rcpts)
        try:
            queue_id = await self._put(NewMessage(sender, rcpts, message, client))
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
            _report_error(self.events, client, f"after queueing {queue_id}: {exc!r}")
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def _stamp(
        self, data: bytes, session: Session, client: str, rcpts: Sequence[str]
    ) -> tuple[bytes, str | None]:
        """Prepend Received (RFC 5321 §4.4); add Date and Message-ID if missing."""
        now = datetime.now(UTC)
        trace_id = secrets.token_hex(8).upper()
        received = received_header(
            client_ip=client,
            helo=session.host_name,
            by_host=self._listen.hostname,
            queue_id=trace_id,
            tls=None,
            when=now,
            # Only a single recipient is named: listing several would disclose them all.
            for_rcpt=rcpts[0] if len(rcpts) == 1 else None,
        )
        return add_missing_headers(
            data, hostname=self._listen.hostname, now=now, queue_id=trace_id, received=received
        )

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
    """Binds every `listen.addresses` entry and serves SMTP on it until stopped."""

    def __init__(
        self,
        config: Config,
        *,
        store: MessageStore,
        events: EventLog,
        on_queued: Callable[[], None],
    ) -> None:
        self._config = config.listen
        self._sessions = _Sessions(config.listen.max_sessions)
        self._handler = _Handler(
            config=config,
            store=store,
            events=events,
            on_queued=on_queued,
            sessions=self._sessions,
        )
        self._servers: list[asyncio.Server] = []
        self._bound: list[str] = []

    @property
    def bound_addresses(self) -> list[str]:
        """The "host:port" of every listening socket (real ports when 0 was configured)."""
        return list(self._bound)

    def _protocol(self) -> RelaySMTP:
        cfg = self._config
        return RelaySMTP(
            self._handler,
            sessions=self._sessions,
            data_timeout=cfg.data_timeout,
            data_size_limit=cfg.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=cfg.hostname or None,
            ident="ESMTP sts-relay",
            timeout=cfg.command_timeout,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for address in self._config.addresses:
                host, port = parse_hostport(address)
                server = await loop.create_server(self._protocol, host, port)
                self._servers.append(server)
                for sock in server.sockets:
                    name = sock.getsockname()
                    self._bound.append(format_hostport(str(name[0]), int(name[1])))
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
            transport = session.transport
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(REPLY_SHUTDOWN.encode() + b"\r\n")
                transport.close()
        for server in servers:
            await server.wait_closed()
