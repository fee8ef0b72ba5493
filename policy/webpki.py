"""The TLS client contexts and the mapping of certificate errors to RFC 8460 result types.

Owns the security parameters of every outgoing TLS connection (policy fetches and MX
connections): trusted roots, minimum version (TLS 1.2 whenever anything is verified, TLS
1.0 for opportunistic encryption), name checks, and which TLS session may be resumed where
(`ResumingContext`). Knows nothing about HTTP, SMTP or policies; the relay's delivery code
uses these same functions for MX certificates.

TLS session resumption (delivery only, `resume=True`): a resumed handshake proves that the
server holds the secret of an earlier session, and OpenSSL verifies neither the certificate
chain nor the name again. So a session is offered only where the full handshake that made
it would be valid now: through the same context (the cache belongs to the context: same
trusted roots, version floor and checks; a verified context never sees an opportunistic
session, Python refuses a session of another context anyway), to the exact server name it
was verified for, for at most `SESSION_LIFETIME_S` since that full handshake (Postfix's
`smtp_tls_session_cache_timeout`) and never past the peer certificate's notAfter. Only a
full handshake replaces the session kept for a name: a resumed connection keeps using the
one it resumed (TLS 1.3 sends new tickets, which are not read), so no chain of
resumptions outlives the full verification it started from; a server that takes a
ticket only once answers the next offer with a full handshake, whose session is kept.
(RFC 8446 §C.4 discourages reusing a ticket because it lets an observer link connections;
an MX already sees the relay's address and EHLO name in the clear.) Reading a session
from CPython's TLS object copies it (`SSL_SESSION` serialised and parsed again, about as
costly as the verification resumption saves), so it is read once per full handshake.
asyncio's and uvloop's `start_tls` take no session argument; both create the TLS object
through `SSLContext.wrap_bio`, which this subclass overrides, so resumption works under
either loop.
"""

from __future__ import annotations

import os
import ssl
import sys
import time
import warnings
from collections.abc import Callable
from typing import Final, TypeVar

from policy.model import TlsRptResult

# OpenSSL X509_V_ERR_* codes (include/openssl/x509_vfy.h).
_NOT_YET_VALID: Final = 9
_EXPIRED: Final = 10
_HOSTNAME_MISMATCH: Final = 62
_IP_ADDRESS_MISMATCH: Final = 64
_NOT_TRUSTED: Final = frozenset(
    {
        2,  # UNABLE_TO_GET_ISSUER_CERT
        4,  # UNABLE_TO_DECRYPT_CERT_SIGNATURE
        6,  # UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY
        7,  # CERT_SIGNATURE_FAILURE
        18,  # DEPTH_ZERO_SELF_SIGNED_CERT
        19,  # SELF_SIGNED_CERT_IN_CHAIN
        20,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        21,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
        23,  # CERT_REVOKED
        24,  # INVALID_CA
        27,  # CERT_UNTRUSTED
        28,  # CERT_REJECTED
        _NOT_YET_VALID,  # STS-93 allows not-trusted or validation-failure; not trusted *now*
    }
)


# Postfix's smtp_tls_session_cache_timeout (3600 s): how long after a full handshake its
# session may be resumed.
SESSION_LIFETIME_S: Final = 3600.0
_MAX_SESSIONS: Final = 10_000  # server names kept per context (oldest dropped first)


class SessionCache:
    """The resumable TLS sessions of ONE client context, by the server name they were
    verified for (the name as the TLS object reports it: an MX name from DNS as is).

    `clock` is POSIX time (certificate dates are too). Used from one event loop only.
    """

    def __init__(
        self,
        *,
        lifetime: float = SESSION_LIFETIME_S,
        max_entries: int = _MAX_SESSIONS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.lifetime = lifetime
        self._max_entries = max_entries
        self._clock = clock
        self._sessions: dict[str, tuple[ssl.SSLSession, float]] = {}  # name: (session, until)

    def __len__(self) -> int:
        return len(self._sessions)

    def offer(self, server_name: str) -> ssl.SSLSession | None:
        """The session to offer to `server_name`, or None (none kept, or expired)."""
        kept = self._sessions.get(server_name)
        if kept is None:
            return None
        session, until = kept
        if until <= self._clock():
            del self._sessions[server_name]
            return None
        return session

    def keep(
        self, server_name: str, session: ssl.SSLSession, *, not_after: float | None = None
    ) -> None:
        """Keep `session` of a full handshake with `server_name` that passed every check:
        it may be resumed for `lifetime` seconds, and not past `not_after` (the verified
        peer certificate's)."""
        now = self._clock()
        until = now + self.lifetime
        if not_after is not None:
            until = min(until, not_after)
        # What the session itself allows (OpenSSL's timeout, the ticket's lifetime hint).
        if session.timeout > 0:
            until = min(until, session.time + session.timeout)
        if session.ticket_lifetime_hint > 0:
            until = min(until, session.time + session.ticket_lifetime_hint)
        self._sessions.pop(server_name, None)
        if until <= now:
            return
        if len(self._sessions) >= self._max_entries:
            del self._sessions[next(iter(self._sessions))]  # the longest kept
        self._sessions[server_name] = (session, until)

    def forget(self, server_name: str) -> None:
        """A handshake with `server_name` failed or was abandoned: offer it nothing more."""
        self._sessions.pop(server_name, None)


class ResumingContext(ssl.SSLContext):
    """A client context that offers the TLS session kept for the server name (see the
    module doc), whoever creates the TLS object: asyncio's sslproto and uvloop both call
    `wrap_bio` without a session. Each has a session cache of its own."""

    def __init__(self, protocol: int = ssl.PROTOCOL_TLS_CLIENT) -> None:
        # ssl.SSLContext is built in __new__ (which takes `protocol`); nothing to pass on.
        self.sessions = SessionCache()

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        ssl_object = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        name = ssl_object.server_hostname
        if session is None and not server_side and name:
            offered = self.sessions.offer(name)
            if offered is not None:
                # Checked by Python too: a session of another context is refused.
                ssl_object.session = offered
        return ssl_object

    def remember(self, ssl_object: ssl.SSLObject) -> None:
        """Keep the session of `ssl_object`, a connection of this context that passed every
        check, when its handshake was a full one (see the module doc). Call it after the
        first reply read over TLS: TLS 1.3 tickets come after the handshake."""
        name = ssl_object.server_hostname
        if not name or ssl_object.context is not self or ssl_object.session_reused:
            return
        session = ssl_object.session
        if session is None:
            return
        if ssl_object.version() == "TLSv1.3" and not session.has_ticket:
            return  # no ticket (yet): nothing the server would resume
        self.sessions.keep(name, session, not_after=_not_after(ssl_object))

    def forget(self, server_hostname: str) -> None:
        self.sessions.forget(server_hostname)


def _not_after(ssl_object: ssl.SSLObject) -> float | None:
    """The verified peer certificate's notAfter (POSIX time); None when not verified."""
    cert = ssl_object.getpeercert()
    not_after = cert.get("notAfter") if cert else None
    return ssl.cert_time_to_seconds(not_after) if isinstance(not_after, str) else None


_Context = TypeVar("_Context", bound=ssl.SSLContext)


def _server_auth_context(cls: type[_Context]) -> _Context:
    """What ssl.create_default_context(Purpose.SERVER_AUTH) builds, as a `cls` (tested to
    match): certificate and host name checks on, system roots, SSLKEYLOGFILE honoured."""
    context = cls(ssl.PROTOCOL_TLS_CLIENT)
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    keylog = os.environ.get("SSLKEYLOGFILE")
    if keylog and not sys.flags.ignore_environment:
        context.keylog_filename = keylog
    return context


def client_context(ca_file: str | None, *, resume: bool = False) -> ssl.SSLContext:
    """System roots plus `ca_file`, TLS 1.2 or newer, DNS-ID name checks (RFC 8461 §3.3, §4.2).

    `resume`: a `ResumingContext` with its own session cache (MX connections; see the
    module doc). Raises OSError / ssl.SSLError if `ca_file` cannot be read (a
    configuration error the caller reports at start-up).
    """
    # create_default_context(cafile=...) would load ONLY that file and skip the system
    # roots, so load the extra CA separately.
    context = _server_auth_context(ResumingContext if resume else ssl.SSLContext)
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    _harden(context)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    # RFC 8461 §4.2 / RFC 6125: the name must be a SAN DNS-ID; a CN-only certificate
    # passes on Python 3.11 unless this is off (STS-95).
    context.hostname_checks_common_name = False
    return context


def unverified_context(*, resume: bool = False) -> ssl.SSLContext:
    """Encryption without authentication, for opportunistic STARTTLS (no policy, testing).

    Any encryption beats none: this context also speaks TLS 1.0 and 1.1 (which OpenSSL 3
    offers only at security level 0), so an old MX gets TLS rather than plaintext. It
    never authenticates anything; verified delivery uses `client_context` (TLS 1.2 or
    newer, RFC 8461 §7.2, RFC 8996). `resume`: a `ResumingContext` with a session cache
    of its own (never shared with a verified context).
    """
    context = (ResumingContext if resume else ssl.SSLContext)(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.options |= ssl.OP_NO_COMPRESSION
    with warnings.catch_warnings():
        # Python flags the constant as deprecated; here it is the point (RFC 7435 §1).
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def _harden(context: ssl.SSLContext) -> None:
    # RFC 8461 §7.2 and RFC 8996: never TLS 1.0 or 1.1.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION


def classify_certificate_error(exc: ssl.SSLCertVerificationError) -> TlsRptResult:
    """The RFC 8460 §4.3 result type for a failed certificate verification."""
    code = getattr(exc, "verify_code", None)
    if code == _EXPIRED:
        return TlsRptResult.CERTIFICATE_EXPIRED
    if code in (_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH):
        return TlsRptResult.CERTIFICATE_HOST_MISMATCH
    if code in _NOT_TRUSTED:
        return TlsRptResult.CERTIFICATE_NOT_TRUSTED
    if isinstance(code, int):
        return TlsRptResult.VALIDATION_FAILURE
    return _classify_message(str(getattr(exc, "verify_message", None) or exc).lower())


def _classify_message(message: str) -> TlsRptResult:
    # Only when OpenSSL gave no code (should not happen on CPython, but be total).
    if "expired" in message:
        return TlsRptResult.CERTIFICATE_EXPIRED
    if "mismatch" in message:
        return TlsRptResult.CERTIFICATE_HOST_MISMATCH
    if "self-signed" in message or "self signed" in message or "issuer" in message:
        return TlsRptResult.CERTIFICATE_NOT_TRUSTED
    return TlsRptResult.VALIDATION_FAILURE
