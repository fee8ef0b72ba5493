"""MX sinks for the lab: aiosmtpd servers that record what a receiving MX would see.

Owns the receiving side of delivery tests: one aiosmtpd SMTP protocol per connection, served
with `loop.create_server` on (ip, port), optional STARTTLS with a lab certificate, scripted
replies. Records connections, commands, TLS version and SNI, and each accepted message's raw
bytes. Knows nothing about DNS, MTA-STS or the relay.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

# SNI by TLS object: the callback sees the SSLObject before the SMTP session does.
_SNI: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()


def record_sni(ssl_obj: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
    """sni_callback that remembers the name the client asked for on this TLS object."""
    _SNI[ssl_obj] = server_name


def sni_of(ssl_obj: Any) -> str | None:
    return _SNI.get(ssl_obj)


@dataclass
class ReceivedMessage:
    """One message accepted with 250 after DATA."""

    mail_from: str  # "<>" for the null sender (aiosmtpd's spelling)
    rcpt_tos: list[str]
    data: bytes  # DATA as received, dot-unstuffed, without the final CRLF.CRLF
    tls_version: str | None  # e.g. "TLSv1.3"; None in cleartext
    sni: str | None
    ehlo: str
    peer: tuple[str, int]
    mail_options: list[str] = field(default_factory=list)
    rcpt_options: list[str] = field(default_factory=list)


@dataclass
class SessionLog:
    """One TCP connection: its peer, every command line in order, and TLS once negotiated."""

    peer: tuple[str, int]
    commands: list[str] = field(default_factory=list)
    tls_version: str | None = None
    sni: str | None = None


class _Handler:
    def __init__(self, sink: MxSink) -> None:
        self._sink = sink

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self._sink.rcpt_replies.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """The EHLO keywords, as the sink's options ask (DSN on, 8BITMIME off, REQUIRETLS
        on: offered inside TLS only, RFC 8689 §2)."""
        session.host_name = hostname
        keep = [r for r in responses if self._sink.eightbitmime or r[4:] != "8BITMIME"]
        if self._sink.dsn:
            keep.insert(len(keep) - 1, "250-DSN")
        if self._sink.requiretls and session.ssl:
            keep.insert(len(keep) - 1, "250-REQUIRETLS")
        return keep

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self._sink.drop_after_data:
            # The whole message arrived; the connection dies before any reply.
            assert isinstance(server.transport, asyncio.Transport)
            server.transport.abort()
            return "250 2.0.0 never sent"
        if self._sink.data_reply is not None:
            return self._sink.data_reply
        ssl_obj = session.ssl.get("ssl_object") if session.ssl else None
        self._sink.messages.append(
            ReceivedMessage(
                mail_from=str(envelope.mail_from),
                rcpt_tos=list(envelope.rcpt_tos),
                data=bytes(envelope.original_content or b""),
                tls_version=ssl_obj.version() if ssl_obj is not None else None,
                sni=sni_of(ssl_obj) if ssl_obj is not None else None,
                ehlo=str(session.host_name),
                peer=tuple(session.peer),  # type: ignore[arg-type]
                mail_options=list(envelope.mail_options),
                rcpt_options=list(envelope.rcpt_options),
            )
        )
        return "250 2.0.0 OK queued"

    async def handle_exception(self, error: Exception) -> str:
        self._sink.errors.append(error)
        return "451 4.3.0 sink error"


class _SinkSMTP(SMTP):
    """aiosmtpd's protocol plus per-connection bookkeeping and a scripted STARTTLS reply."""

    def __init__(self, sink: MxSink, **kwargs: Any) -> None:
        super().__init__(_Handler(sink), **kwargs)
        self._sink = sink
        self._log: SessionLog | None = None
        # Log every command line before aiosmtpd dispatches it (a test-only wrapper).
        self._smtp_methods = {
            verb: self._logged(verb, method) for verb, method in self._smtp_methods.items()
        }

    def _logged(
        self, verb: str, method: Callable[[str], Awaitable[None]]
    ) -> Callable[[str], Awaitable[None]]:
        async def run(arg: str) -> None:
            if self._log is not None:
                self._log.commands.append(f"{verb} {arg}".rstrip() if arg else verb)
            if verb == "MAIL":
                self._sink.mail_commands += 1
            if verb in self._sink.drop_on and isinstance(self.transport, asyncio.Transport):
                self.transport.abort()  # no reply: the connection just dies
                return
            await method(arg)

        return run

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._log is None
        super().connection_made(transport)
        session = self.session
        assert session is not None
        if first:
            self._log = SessionLog(peer=tuple(session.peer))  # type: ignore[arg-type]
            self._sink.sessions.append(self._log)
        elif session.ssl and self._log is not None:
            ssl_obj = session.ssl.get("ssl_object")
            if ssl_obj is not None:
                self._log.tls_version = ssl_obj.version()
                self._log.sni = sni_of(ssl_obj)

    def _split_dsn(self, arg: str, names: tuple[str, ...]) -> tuple[str, list[str]]:
        """Take RFC 3461 parameters (and REQUIRETLS, RFC 8689, when offered) out of a
        MAIL/RCPT argument (aiosmtpd refuses them)."""
        if self._sink.requiretls and names[0] == "RET=":
            names = (*names, "REQUIRETLS")
        elif not self._sink.dsn:
            return arg, []
        if not arg:
            return arg, []
        words = arg.split(" ")
        dsn = [w for w in words if w.upper().startswith(names)]
        return " ".join(w for w in words if w not in dsn), dsn

    async def smtp_MAIL(self, arg: str) -> None:
        arg, dsn = self._split_dsn(arg, ("RET=", "ENVID="))
        await super().smtp_MAIL(arg)
        if self.envelope is not None and self.envelope.mail_from is not None:
            self.envelope.mail_options.extend(dsn)

    async def smtp_RCPT(self, arg: str) -> None:
        arg, dsn = self._split_dsn(arg, ("NOTIFY=", "ORCPT="))
        before = len(self.envelope.rcpt_tos) if self.envelope is not None else 0
        await super().smtp_RCPT(arg)
        if self.envelope is not None and len(self.envelope.rcpt_tos) > before:
            self.envelope.rcpt_options.extend(dsn)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._sink.starttls_reply is not None:
            await self.push(self._sink.starttls_reply)
            return
        await super().smtp_STARTTLS(arg)


class MxSink:
    """A receiving MX on (ip, port). port=0 picks one; sinks of a world share one port."""

    def __init__(
        self,
        ip: str,
        port: int = 0,
        *,
        hostname: str = "mx.test",
        starttls: bool = True,
        cert: ssl.SSLContext | None = None,
        rcpt_replies: dict[str, str] | None = None,
        data_reply: str | None = None,
        starttls_reply: str | None = None,
        dsn: bool = False,
        eightbitmime: bool = True,
        smtputf8: bool = False,
        requiretls: bool = False,
        drop_on: frozenset[str] = frozenset(),
        drop_after_data: bool = False,
    ) -> None:
        """`dsn` advertises DSN (RFC 3461 parameters land in the options of the message),
        `requiretls` REQUIRETLS after STARTTLS (the parameter lands there too),
        `eightbitmime`/`smtputf8` the EHLO keywords; `drop_on` verbs ("RSET", "MAIL")
        abort the connection without a reply; `drop_after_data` aborts after the whole
        message arrived, before the reply to the final dot."""
        if starttls and cert is None:
            raise ValueError("starttls=True needs cert=TestPKI.server_context(...)")
        self.ip = ip
        self.port = port
        self.hostname = hostname
        self.starttls = starttls
        self.cert = cert if starttls else None
        if self.cert is not None and self.cert.sni_callback is None:
            self.cert.sni_callback = record_sni
        self.rcpt_replies = {k.lower(): v for k, v in (rcpt_replies or {}).items()}
        self.data_reply = data_reply
        self.starttls_reply = starttls_reply
        self.dsn = dsn
        self.eightbitmime = eightbitmime
        self.smtputf8 = smtputf8
        self.requiretls = requiretls
        self.drop_on = drop_on
        self.drop_after_data = drop_after_data
        self.messages: list[ReceivedMessage] = []
        self.sessions: list[SessionLog] = []
        self.mail_commands = 0
        self.errors: list[Exception] = []
        self._server: asyncio.Server | None = None
        self._protocols: list[_SinkSMTP] = []

    @property
    def connections(self) -> int:
        return len(self.sessions)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self.ip, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for proto in self._protocols:
            if proto.transport is not None:
                proto.transport.close()
        await self._server.wait_closed()
        self._server = None

    def _protocol(self) -> _SinkSMTP:
        proto = _SinkSMTP(
            self,
            hostname=self.hostname,
            tls_context=self.cert,
            require_starttls=False,
            decode_data=False,
            enable_SMTPUTF8=self.smtputf8,
            loop=asyncio.get_running_loop(),
        )
        self._protocols.append(proto)
        return proto
