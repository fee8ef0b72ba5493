"""SMTP AUTH for the listener's sessions: PLAIN (RFC 4616) and LOGIN, under RFC 4954.

Owns the AUTH exchanges on top of aiosmtpd's `smtp_AUTH` (which already refuses AUTH
outside TLS with 538 and advertises the mechanisms only inside it): decoding the client's
answers, checking them against the users file off the event loop (scrypt is slow on
purpose), the per-address limit on failed logins, and the `authenticated`/`auth_failed`
events. Knows nothing of relay permission: the handler reads `session.authenticated`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult

from relay.events import EventLog
from relay.users import FailureLimiter, UsersFile, valid_user_name

REPLY_AUTH_LOCKED = "454 4.7.0 Too many failed authentication attempts, try again later"
REPLY_AUTH_SYNTAX = "501 5.5.2 Cannot decode the authentication data"


def _b64(text: str) -> bytes | None:
    if text == "=":  # RFC 4954 §4: an empty initial response
        return b""
    try:
        return base64.b64decode(text.encode("ascii", "replace"), validate=True)
    except binascii.Error:
        return None


class AuthenticatingSMTP(SMTP):
    """aiosmtpd's SMTP whose AUTH PLAIN and LOGIN check the users file; a subclass sets
    `_users`, `_limiter`, `_events` and `_client` (the peer address) per session."""

    _users: UsersFile
    _limiter: FailureLimiter
    _events: EventLog
    _client: str

    async def smtp_AUTH(self, arg: str) -> None:
        # RFC 4954 §4: a server may limit failed attempts; 454 4.7.0 is temporary.
        if self._limiter.blocked(self._client):
            self._events.auth_failed(
                client=self._client, user=None, mechanism=None, reason="rate limited"
            )
            await self.push(REPLY_AUTH_LOCKED)
            return
        await super().smtp_AUTH(arg)

    # aiosmtpd finds mechanisms by the `auth_` prefix; these replace its built-in ones so
    # the slow hash runs off the event loop.

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        blob = await self._initial_or_challenge(args, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push(REPLY_AUTH_SYNTAX)
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid not in (b"", login):  # RFC 4616 §2: no acting as another user
            return await self._failed("PLAIN", login, "authorization identity not allowed")
        return await self._check("PLAIN", login, password)

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        login = await self._initial_or_challenge(args, "Username:")
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await self._challenge("Password:")
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self._check("LOGIN", login, password)

    async def _initial_or_challenge(self, args: list[str], prompt: str) -> bytes | None:
        if len(args) == 1:
            return await self._challenge(prompt)
        blob = _b64(args[1])
        if blob is None:
            await self.push(REPLY_AUTH_SYNTAX)
        return blob

    async def _challenge(self, prompt: str) -> bytes | None:
        answer = await self.challenge_auth(prompt)  # pushes 501 itself on "*" or bad base64
        return None if answer is MISSING else answer

    async def _check(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        user = login.decode("utf-8", "replace")
        if valid_user_name(user) and await asyncio.to_thread(self._users.verify, user, password):
            self._events.authenticated(client=self._client, user=user, mechanism=mechanism)
            return AuthResult(success=True, auth_data=user)
        return await self._failed(mechanism, login, "bad credentials")

    async def _failed(self, mechanism: str, login: bytes, reason: str) -> AuthResult:
        failures = self._limiter.failed(self._client)
        user = login.decode("utf-8", "replace")[:64]
        self._events.auth_failed(client=self._client, user=user, mechanism=mechanism, reason=reason)
        if failures >= self._limiter.limit:
            return AuthResult(success=False, handled=False, message=REPLY_AUTH_LOCKED)
        return AuthResult(success=False, handled=False)  # 535 5.7.8
