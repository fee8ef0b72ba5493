"""The envelope of a listener's transaction: RelayEnvelope, and MAIL and RCPT that fill it.

Owns envelope path syntax, SMTPUTF8 for non-ASCII paths (RFC 6531 §3.4), the RFC 3461 DSN
parameters and RFC 8689's REQUIRETLS (taken out before aiosmtpd parses the rest;
REQUIRETLS only inside TLS), and the rule that MAIL needs AUTH when `auth.required`: each
refusal answered and logged through relay/inbound/replies.py. MAIL and RCPT as most clients
send them, one plain path and no parameter, are answered directly (`_plain_mail`,
`_plain_rcpt`, transcribed from aiosmtpd 1.4.6's smtp_MAIL and smtp_RCPT, whose source
tests/unit/test_library_internals.py pins): every check of the general way passes for them,
and the replies, events and stored envelopes are the same
(tests/integration/test_listener_commands.py). A plain `<local@domain>` path skips
aiosmtpd's parser (`_getaddr`, tests/unit/test_smtp_getaddr.py). Knows nothing of relay
permission or recipient limits: those are the handler's (relay/inbound/listener.py), whose
MAIL and RCPT hooks still answer.
"""

from __future__ import annotations

import re
from typing import cast

from aiosmtpd import smtp as aiosmtpd_smtp
from aiosmtpd.smtp import MISSING, Envelope

from mailqueue.model import DsnRequest
from relay.inbound.data import MessageBuffer
from relay.inbound.esmtp import (
    MailDsn,
    ParamError,
    RcptDsn,
    has_parameter,
    non_ascii_path,
    path_ok,
    take_mail_dsn,
    take_rcpt_dsn,
    take_requiretls,
)
from relay.inbound.lifetime import SessionLifetime
from relay.inbound.replies import (
    REPLY_AUTH_REQUIRED,
    REPLY_BAD_ADDRESS,
    REPLY_NEEDS_SMTPUTF8,
    REPLY_REQUIRETLS_NEEDS_TLS,
)

_log = aiosmtpd_smtp.log  # aiosmtpd's logger ("mail.log"): the session logs as aiosmtpd did

# The common envelope path: <dot-atom@ASCII-domain>, then the end or one space and a
# parameter. For it aiosmtpd's parser (email's header parser, plus a class it builds on
# every call: ~15% of ingest CPU) returns exactly (the address, the text after the space);
# everything else still goes through aiosmtpd. (That parser strips every character
# str.isspace() knows after the ">", U+0085 among them: so does \s here.)
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?:$| (?=[^\s(]))"
)
# MAIL and RCPT as most clients send them: one plain path, no parameter. Every check of
# the general way passes for these (path_ok, ASCII, no DSN parameter, _SIMPLE_PATH), so
# EnvelopeCommands answers them directly (_plain_mail, _plain_rcpt), in the same order.
_LDH = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_PLAIN = rf"<({_ATEXT}(?:\.{_ATEXT})*@{_LDH}(?:\.{_LDH})*)>"
_PLAIN_MAIL = re.compile(rf"[Ff][Rr][Oo][Mm]:{_PLAIN}")
_PLAIN_RCPT = re.compile(rf"[Tt][Oo]:{_PLAIN}")
# RFC 5321 §4.5.1: "RCPT TO:<Postmaster>" (any case), with no domain.
_POSTMASTER = re.compile(r" *<postmaster>(?: .*)?", re.IGNORECASE)

# No DSN parameter given (the types are frozen: one instance serves every envelope).
_NO_MAIL_DSN = MailDsn()
_NO_RCPT_DSN = RcptDsn()


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope plus the RFC 3461 parameters of this transaction."""

    def __init__(self) -> None:
        # Envelope.__init__ (aiosmtpd 1.4.6), inlined: three envelopes per message.
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.smtp_utf8 = False
        self.content: bytes | str | None = None
        self.original_content: bytes | None = None
        self.rcpt_tos: list[str] = []
        self.rcpt_options: list[str] = []
        self.mail_dsn = _NO_MAIL_DSN
        self.rcpt_dsn: dict[str, RcptDsn] = {}
        self.requiretls = False  # MAIL FROM carried REQUIRETLS (RFC 8689), in TLS
        # The content once DATA ended well (original_content stays None: no bytes copy).
        self.message: MessageBuffer | None = None

    def dsn_request(self) -> DsnRequest:
        notify = {r: d.notify for r, d in self.rcpt_dsn.items() if d.notify is not None}
        orcpt = {r: d.orcpt for r, d in self.rcpt_dsn.items() if d.orcpt is not None}
        return DsnRequest(
            ret=self.mail_dsn.ret, envid=self.mail_dsn.envid, notify=notify, orcpt=orcpt
        )


class EnvelopeCommands(SessionLifetime):
    """MAIL and RCPT with our checks and parameters, into a RelayEnvelope."""

    def _create_envelope(self) -> RelayEnvelope:
        return RelayEnvelope()

    @property
    def relay_envelope(self) -> RelayEnvelope:
        return cast(RelayEnvelope, self.envelope)

    # --- commands ---

    def _extended(self) -> bool:
        return (
            self.session is not None
            and bool(self.session.host_name)
            and bool(self.session.extended_smtp)
        )

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        simple = _SIMPLE_PATH.match(arg)
        if simple is not None:
            address = simple.group(1)
            limit = self.local_part_limit
            if not limit or len(address.rpartition("@")[0]) <= limit:
                return address, arg[simple.end() :]
        result: tuple[str | None, str | None] = super()._getaddr(arg)
        return result

    async def smtp_MAIL(self, arg: str | None) -> None:
        rest = arg[5:] if arg is not None and arg[:5].upper() == "FROM:" else None
        session = self.session
        required = self._settings.auth_required
        if required and session is not None and session.host_name and not session.authenticated:
            await self._refuse("mail", REPLY_AUTH_REQUIRED, "authentication required")
            return
        plain = _PLAIN_MAIL.fullmatch(arg) if arg is not None else None
        if plain is not None and await self._plain_mail(plain.group(1)):
            return
        if rest is not None and not path_ok(rest, null_ok=True):
            await self._refuse("mail", REPLY_BAD_ADDRESS, "bad sender address syntax")
            return
        if (
            rest is not None
            and non_ascii_path(rest, null_ok=True)
            and not has_parameter(rest, "SMTPUTF8", null_ok=True)
        ):
            await self._refuse("mail", REPLY_NEEDS_SMTPUTF8, "non-ASCII sender without SMTPUTF8")
            return
        envelope = self.relay_envelope
        dsn = _NO_MAIL_DSN
        requiretls = False
        if rest is not None and self._extended() and envelope.mail_from is None:
            try:
                rest, dsn = take_mail_dsn(rest)
                rest, requiretls = take_requiretls(rest)
            except ParamError as exc:
                await self._refuse("mail", exc.reply, exc.reply[10:])
                return
            if requiretls and self.tls_version() is None:
                # RFC 8689 §2: only in a session that itself uses TLS (RTLS-02).
                await self._refuse("mail", REPLY_REQUIRETLS_NEEDS_TLS, "REQUIRETLS without TLS")
                return
            arg = "FROM:" + rest
        had_sender = envelope.mail_from is not None
        await super().smtp_MAIL(arg)
        if not had_sender and envelope.mail_from is not None:
            envelope.mail_dsn = dsn
            envelope.requiretls = requiretls

    async def smtp_RCPT(self, arg: str | None) -> None:
        plain = _PLAIN_RCPT.fullmatch(arg) if arg is not None else None
        if plain is not None and await self._plain_rcpt(plain.group(1)):
            return
        rest = arg[3:] if arg is not None and arg[:3].upper() == "TO:" else None
        if rest is not None and _POSTMASTER.fullmatch(rest):
            # RFC 5321 §4.5.1: the one path without a domain; the handler answers it.
            await super().smtp_RCPT(arg)
            return
        if rest is not None and not path_ok(rest, null_ok=False):
            await self._refuse("rcpt", REPLY_BAD_ADDRESS, "bad recipient address syntax")
            return
        if (
            rest is not None
            and self.envelope is not None
            and self.envelope.mail_from is not None
            and not self.envelope.smtp_utf8
            and non_ascii_path(rest, null_ok=False)
        ):
            await self._refuse("rcpt", REPLY_NEEDS_SMTPUTF8, "non-ASCII recipient without SMTPUTF8")
            return
        dsn = _NO_RCPT_DSN
        if rest is not None and self._extended() and self.relay_envelope.mail_from is not None:
            try:
                rest, dsn = take_rcpt_dsn(rest)
            except ParamError as exc:
                await self._refuse("rcpt", exc.reply, exc.reply[10:])
                return
            arg = "TO:" + rest
        envelope = self.relay_envelope
        before = len(envelope.rcpt_tos)
        await super().smtp_RCPT(arg)
        if self.envelope is envelope and len(envelope.rcpt_tos) > before:
            envelope.rcpt_dsn[envelope.rcpt_tos[-1]] = dsn

    def _plain_ok(self, address: str) -> bool:
        """Whether aiosmtpd's own checks before its hook pass for a plain path (HELO
        seen, no AUTH requirement of its own, the local part within its limit)."""
        session = self.session
        limit = self.local_part_limit
        return (
            session is not None
            and bool(session.host_name)
            and not self._auth_required
            and (not limit or len(address.rpartition("@")[0]) <= limit)
        )

    async def _plain_mail(self, address: str) -> bool:
        """MAIL FROM:<address> without parameters, as smtp_MAIL's general way answers it
        (aiosmtpd's smtp_MAIL after our checks, then no DSN and no REQUIRETLS); False
        (nothing done) when that way would find more to check."""
        envelope = self.relay_envelope
        if envelope.mail_from is not None or not self._plain_ok(address):
            return False
        envelope.smtp_utf8 = False
        hook = self._handle_hooks.get("MAIL")
        status = MISSING if hook is None else await hook(self, self.session, envelope, address, [])
        if status is MISSING:
            envelope.mail_from = address
            status = "250 OK"
        _log.info("%r sender: %s", self._peer(), address)
        await self.push(status)
        if envelope.mail_from is not None:
            envelope.mail_dsn = _NO_MAIL_DSN
            envelope.requiretls = False
        return True

    async def _plain_rcpt(self, address: str) -> bool:
        """RCPT TO:<address> without parameters, as smtp_RCPT's general way answers it
        (our checks pass, then aiosmtpd's smtp_RCPT, then no DSN); False (nothing done)
        when that way would find more to check."""
        envelope = self.relay_envelope
        if not envelope.mail_from or not self._plain_ok(address):
            return False
        before = len(envelope.rcpt_tos)
        hook = self._handle_hooks.get("RCPT")
        status = MISSING if hook is None else await hook(self, self.session, envelope, address, [])
        if status is MISSING:
            envelope.rcpt_tos.append(address)
            status = "250 OK"
        _log.info("%r recip: %s", self._peer(), address)
        await self.push(status)
        if self.envelope is envelope and len(envelope.rcpt_tos) > before:
            envelope.rcpt_dsn[envelope.rcpt_tos[-1]] = _NO_RCPT_DSN
        return True
