"""SMTP AUTH for the listener's sessions: PLAIN (RFC 4616) and LOGIN, under RFC 4954.

Owns the AUTH exchanges on top of aiosmtpd's `smtp_AUTH` (which already refuses AUTH
outside TLS with 538 and advertises the mechanisms only inside it): decoding the client's
answers, checking them against the users file on a small pool of threads of its own (scrypt
is slow on purpose, and must never queue ahead of the store's and the policy cache's work in
asyncio's default pool), the limits on failed logins per client address and per user name
(an attempt counts from the moment its check starts), and the `authenticated`/`auth_failed`
events. Knows nothing of relay permission: the handler reads `session.authenticated`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult

from relay.events import EventLog
from relay.users import FailureLimiter, UsersFile, valid_user_name

REPLY_AUTH_LOCKED = "454 4.7.0 Too many failed authentication attempts, try again later"
REPLY_AUTH_BUSY = "454 4.7.0 Too many authentications in progress, try again later"
REPLY_AUTH_SYNTAX = "501 5.5.2 Cannot decode the authentication data"


def _b64(text: str) -> bytes | None:
    if text == "=":  # RFC 4954 §4: an empty initial response
        return b""
    try:
        return base64.b64decode(text.encode("ascii", "replace"), validate=True)
    except binascii.Error:
        return None


class ChecksBusy(Exception):
    """Every hashing thread is busy and the queue is full: try again later (454 4.7.0)."""


class PasswordChecks:
    """Checks passwords on `threads` threads of its own, with at most `queue` more checks
    waiting for one; past that `verify` raises ChecksBusy at once. The bound also bounds
    memory: each scrypt check holds 128 * r * n bytes (32 MiB at the default cost)."""

    def __init__(self, users: UsersFile, *, threads: int, queue: int) -> None:
        self._users = users
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="auth-hash")
        self._bound = threads + queue
        self._pending = 0  # checks awaited by sessions: running or queued (event loop only)

    async def verify(self, user: str, password: bytes) -> bool:
        if self._pending >= self._bound:
            raise ChecksBusy
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._users.verify, user, password)
        finally:
            self._pending -= 1

    def close(self) -> None:
        """Stop the threads; checks not started are dropped (their sessions are closing)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class AuthService:
    """What every session's AUTH shares: the checks and the failure limits."""

    checks: PasswordChecks
    per_client: FailureLimiter  # keyed by client address
    per_user: FailureLimiter  # keyed by the user name as given


class AuthenticatingSMTP(SMTP):
    """aiosmtpd's SMTP whose AUTH PLAIN and LOGIN check the users file; a subclass sets
    `_auth`, `_events` and `_client` (the peer address) per session, and may override
    `_authenticated()`."""

    _auth: AuthService
    _events: EventLog
    _client: str

    async def smtp_AUTH(self, arg: str) -> None:
        # RFC 4954 §4: a server may limit failed attempts; 454 4.7.0 is temporary.
        if self._auth.per_client.blocked(self._client):
            self._events.auth_failed(
                client=self._client, user=None, mechanism=None, reason="rate limited"
            )
            await self.push(REPLY_AUTH_LOCKED)
            return
        await super().smtp_AUTH(arg)

    def _authenticated(self) -> None:
        """Called once a login succeeded."""

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
            return await self._refused("PLAIN", login)
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
        shown = user[:64]
        limits = self._auth
        # Both attempts are counted before the slow check starts, here on the event loop:
        # sessions checking at the same time cannot all pass a limit none has reached yet.
        client_stamp = limits.per_client.reserve(self._client)
        if client_stamp is None:
            return self._rate_limited(mechanism, shown)
        user_key = user[:256]
        user_stamp = limits.per_user.reserve(user_key)
        if user_stamp is None:
            limits.per_client.release(self._client, client_stamp)  # no password was checked
            return self._rate_limited(mechanism, shown)
        try:
            ok = valid_user_name(user) and await limits.checks.verify(user, password)
        except ChecksBusy:
            limits.per_client.release(self._client, client_stamp)
            limits.per_user.release(user_key, user_stamp)
            self._events.auth_failed(
                client=self._client, user=shown, mechanism=mechanism, reason="busy"
            )
            return AuthResult(success=False, handled=False, message=REPLY_AUTH_BUSY)
        if ok:
            limits.per_client.release(self._client, client_stamp)
            limits.per_user.release(user_key, user_stamp)
            self._events.authenticated(client=self._client, user=user, mechanism=mechanism)
            self._authenticated()
            return AuthResult(success=True, auth_data=user)
        self._events.auth_failed(
            client=self._client, user=shown, mechanism=mechanism, reason="bad credentials"
        )
        return self._failure_reply(user_key)

    async def _refused(self, mechanism: str, login: bytes) -> AuthResult:
        """An exchange refused without a password check; it counts for the address."""
        self._auth.per_client.failed(self._client)
        self._events.auth_failed(
            client=self._client,
            user=login.decode("utf-8", "replace")[:64],
            mechanism=mechanism,
            reason="authorization identity not allowed",
        )
        return self._failure_reply(None)

    def _rate_limited(self, mechanism: str, shown: str) -> AuthResult:
        self._events.auth_failed(
            client=self._client, user=shown, mechanism=mechanism, reason="rate limited"
        )
        return AuthResult(success=False, handled=False, message=REPLY_AUTH_LOCKED)

    def _failure_reply(self, user_key: str | None) -> AuthResult:
        limits = self._auth
        if limits.per_client.blocked(self._client) or (
            user_key is not None and limits.per_user.blocked(user_key)
        ):
            return AuthResult(success=False, handled=False, message=REPLY_AUTH_LOCKED)
        return AuthResult(success=False, handled=False)  # 535 5.7.8
