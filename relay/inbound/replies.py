"""What a listener's session answers on its own, and how its refusals are counted and logged.

Owns the session's reply texts, which carry RFC 3463 codes and never internal details or
echoed client text (aiosmtpd's stock replies are rewritten to ours, control characters
never sent), `push` (the text of a reply decided here, then written by
relay/inbound/command_loop.py), errors per session (`max_errors` client errors close the
session with 421), the `rejected` event of every refusal (`reject`), and the answer to an
exception raised by a command: a command line without CRLF or too long (RFC 5321 §2.3.8,
§4.5.3.1.4, raised by relay/inbound/lines.SessionReader) gets its 500, anything else 451
with the half-done transaction voided and a `session_error` event. Knows nothing of relay
permission (relay/inbound/listener.py's) or of which command is refused.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, AnyStr

from aiosmtpd import smtp as aiosmtpd_smtp

from relay.events import EventLog
from relay.inbound.command_loop import CommandLoop
from relay.inbound.lines import BareLfCommand, LongCommand
from relay.inbound.settings import SessionSettings

REPLY_RELAY_DENIED = "554 5.7.1 Relay access denied"
REPLY_TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
REPLY_TIMEOUT = "421 4.4.2 Timeout, closing connection"
REPLY_NOT_AUTHENTICATED_IN_TIME = "421 4.7.0 Not authenticated in time, closing connection"
REPLY_SESSION_TOO_LONG = "421 4.4.2 Session time limit reached, closing connection"
REPLY_INTERNAL = "451 4.3.0 Internal error, try again later"
REPLY_NO_ROOM = "451 4.3.1 Insufficient system storage, try again later"
REPLY_BAD_ADDRESS = "501 5.1.3 Bad address syntax"
REPLY_BARE_LF_COMMAND = "500 5.5.2 Syntax error: command lines must end with CRLF"
REPLY_COMMAND_TOO_LONG = "500 5.5.2 Line too long"
REPLY_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
REPLY_AUTH_REQUIRED = "530 5.7.0 Authentication required"
REPLY_BARE_CRLF = "550 5.5.2 Message contains bare CR or LF"
# RFC 6531 §3.4, §3.7.4.1: a non-ASCII path needs the SMTPUTF8 parameter on MAIL.
REPLY_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter on MAIL"
# RFC 8689 §2: REQUIRETLS is offered, and may be used, only in a TLS session; 5.7.10
# "Encryption needed" (RFC 5248), as mox answers it.
REPLY_REQUIRETLS_NEEDS_TLS = "530 5.7.10 REQUIRETLS is allowed only over TLS (STARTTLS first)"

# aiosmtpd's stock replies that lack an RFC 3463 status, and ours in their place.
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
    "500 Command line too long": (REPLY_COMMAND_TOO_LONG, None),
}
REPLY_UNKNOWN_COMMAND = "500 5.5.2 Command not recognized"
_log = aiosmtpd_smtp.log  # aiosmtpd's logger ("mail.log")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")

# Not counted as client errors: our own farewells, and RFC 5321 §4.5.3.1.10's recipient
# limit (a normal way to split a long recipient list).
_NOT_ERRORS = ("421", "452")


_ECHOING = '500 Error: command "'  # aiosmtpd's reply to an unknown command: it echoes it


def _clean_reply(status: str) -> str:
    """aiosmtpd echoes client text in some replies: never reflect it, never send controls."""
    if status.startswith(_ECHOING):
        return REPLY_UNKNOWN_COMMAND
    if status.isascii() and status.isprintable():  # no control characters: every reply of ours
        return status
    return _CONTROLS.sub("?", status)


def peer_ip(session: Any) -> str:
    peer = getattr(session, "peer", None)
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


def report_error(events: EventLog, client: str, error: str) -> None:
    # Must not raise: aiosmtpd would answer an exception raised here with its text.
    with contextlib.suppress(Exception):
        events.session_error(client=client, error=error)


class SessionReplies(CommandLoop):
    """The command loop with our replies, error count and refusal events; a subclass sets
    `_settings` and `_errors` (0) per session."""

    _settings: SessionSettings
    _errors: int

    async def push(self, status: AnyStr) -> None:
        if not isinstance(status, str):
            if self._put(status):
                await self._writer.drain()
            return
        stock = _STOCK_REPLIES.get(status)
        if stock is not None:
            status, stage = stock
            if stage is not None:
                self.reject(stage, status, "message too big" if "5.3.4" in status else status)
        elif not (
            status.isascii() and status.isprintable() and not status.startswith(_ECHOING)
        ):  # (every reply of ours is printable ASCII)
            status = _clean_reply(status)
        if self._put(status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")):
            await self._writer.drain()
        if status[:1] in ("4", "5") and status[:3] not in _NOT_ERRORS:
            self._errors += 1
            if self._errors >= self._settings.max_errors and self.transport is not None:
                self.reject("session", REPLY_TOO_MANY_ERRORS, "too many errors")
                must_drain = self._put(REPLY_TOO_MANY_ERRORS.encode())
                if self._corked is not None:
                    must_drain = self._uncork()  # all replies out before closing
                if must_drain:
                    await self._writer.drain()
                self.transport.close()

    def transaction_done(self) -> None:
        """A message was accepted: the client is working, its error count starts again."""
        self._errors = 0

    def reject(self, stage: str, reply: str, reason: str, rcpt: str | None = None) -> None:
        """Log a refusal as a `rejected` event (`reply` starts "554 5.7.1 ...")."""
        sender = self.envelope.mail_from if self.envelope is not None else None
        self._events.rejected(
            client=self._client or peer_ip(self.session),
            stage=stage,
            code=" ".join(reply.split(" ", 2)[:2]),  # "530 5.7.10" as well as "554 5.7.1"
            reason=reason,
            sender=None if sender is None else ("" if sender == "<>" else sender),
            rcpt=rcpt,
        )

    async def _refuse(self, stage: str, reply: str, reason: str) -> None:
        self.reject(stage, reply, reason)
        await self.push(reply)

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default answers 500 with the exception's text: never show internals.
        if isinstance(error, BareLfCommand):
            return REPLY_BARE_LF_COMMAND
        if isinstance(error, LongCommand):
            return REPLY_COMMAND_TOO_LONG
        report_error(self._events, self._client, repr(error))
        self.envelope = self._create_envelope()  # a half-done transaction is void
        return REPLY_INTERNAL
