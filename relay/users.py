"""SMTP AUTH credentials: the users file, salted slow password hashes, and failed-login limits.

Owns the users file format (one `name:scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>` line per
user, parameters stored with each hash so they can be raised later without breaking old
entries), password hashing and verification (hashlib.scrypt, constant-time comparison), and
the limits on failed logins (one FailureLimiter per client address, one per user name; an
attempt is counted when it starts). Knows nothing of SMTP sessions: the listener asks
`verify()` (off the event loop, on threads of its own: scrypt is deliberately slow) and the
limiters.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# scrypt cost: n=2**15, r=8 (32 MiB, tens of ms); OWASP's floor is n=2**17 with r=8, p=1
# for interactive logins, too slow for an SMTP relay handling many submissions.
SCRYPT_LOG2_N = 15
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_HASH_BYTES = 32
_MAX_LOG2_N = 20  # refuse absurd stored parameters (memory 128*r*n bytes)
_MAX_R = 16
_MAX_P = 4

# User names: printable ASCII without ":" or spaces (the file's separators), as SASL
# authcids usually are; at most 256 bytes.
_USER = re.compile(r"[\x21-\x39\x3b-\x7e]{1,256}")
_ENTRY = re.compile(
    r"scrypt\$(?P<n>[0-9]{1,2})\$(?P<r>[0-9]{1,2})\$(?P<p>[0-9]{1,2})"
    r"\$(?P<salt>[A-Za-z0-9+/=]{4,64})\$(?P<hash>[A-Za-z0-9+/=]{4,128})"
)


class UsersFileError(Exception):
    """The users file cannot be read or written, or a name is not acceptable."""


def valid_user_name(name: str) -> bool:
    return _USER.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class _Hash:
    log2_n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _scrypt(password: bytes, salt: bytes, log2_n: int, r: int, p: int, size: int) -> bytes:
    n = 1 << log2_n
    return hashlib.scrypt(
        password, salt=salt, n=n, r=r, p=p, maxmem=128 * r * n * p + (1 << 20), dklen=size
    )


def hash_password(password: str, *, log2_n: int = SCRYPT_LOG2_N) -> str:
    """The stored form of `password`: `scrypt$n$r$p$salt$hash` with a fresh random salt."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(password.encode(), salt, log2_n, SCRYPT_R, SCRYPT_P, _HASH_BYTES)
    b64 = base64.b64encode
    return f"scrypt${log2_n}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def _parse_hash(text: str) -> _Hash | None:
    match = _ENTRY.fullmatch(text)
    if match is None:
        return None
    log2_n, r, p = int(match["n"]), int(match["r"]), int(match["p"])
    if not (1 <= log2_n <= _MAX_LOG2_N and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        return None
    try:
        salt = base64.b64decode(match["salt"], validate=True)
        digest = base64.b64decode(match["hash"], validate=True)
    except binascii.Error:
        return None
    return _Hash(log2_n, r, p, salt, digest) if digest else None


def check_password(password: bytes, stored: str) -> bool:
    """Whether `password` matches the stored form (False for a malformed entry)."""
    parsed = _parse_hash(stored)
    if parsed is None:
        return False
    digest = _scrypt(password, parsed.salt, parsed.log2_n, parsed.r, parsed.p, len(parsed.digest))
    return hmac.compare_digest(digest, parsed.digest)


def parse_users(text: str) -> dict[str, str]:
    """name -> stored hash; blank lines and `#` comments skipped, malformed lines ignored."""
    users: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if sep and valid_user_name(name) and _parse_hash(stored) is not None:
            users[name] = stored
    return users


def format_users(users: dict[str, str]) -> str:
    return "".join(f"{name}:{stored}\n" for name, stored in sorted(users.items()))


def read_users(path: Path) -> dict[str, str]:
    """The users in `path`; an absent file has none."""
    try:
        return parse_users(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise UsersFileError(f"{path}: cannot read the users file: {exc}") from None


def write_users(path: Path, users: dict[str, str]) -> None:
    """Replace `path` atomically (temporary file, fsync, rename, directory fsync), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".users.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(format_users(users))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise UsersFileError(f"{path}: cannot write the users file: {exc}") from None


class UsersFile:
    """The users file as the listener sees it: re-read when it changes on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}
        # Verifying against this for unknown names keeps their timing like known ones'.
        self._decoy: str | None = None

    def _current(self) -> dict[str, str]:
        try:
            st = self.path.stat()
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._users = read_users(self.path) if stamp is not None else {}
                self._stamp = stamp
            return self._users

    def verify(self, user: str, password: bytes) -> bool:
        """Blocking (scrypt): call it in a worker thread. False for any unknown user."""
        try:
            stored = self._current().get(user)
        except UsersFileError:
            stored = None
        if stored is None:
            if self._decoy is None:
                self._decoy = hash_password(secrets.token_hex(16))
            check_password(password, self._decoy)
            return False
        return check_password(password, stored)


class FailureLimiter:
    """Failed logins per key (a client address, a user name) in a sliding window (RFC 4954
    §4: servers may limit attempts). `blocked()` once `limit` failures fall within the last
    `window` seconds.

    An attempt counts from the moment it starts: `reserve()` records it as a failure before
    the password is checked (so concurrent attempts cannot all pass a check made before any
    of them failed), and `release()` takes it back when it succeeded or was never checked.
    """

    def __init__(self, limit: int, window: float, clock: Callable[[], float]) -> None:
        self.limit = limit
        self._window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        cutoff = self._clock() - self._window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def blocked(self, key: str) -> bool:
        return len(self._recent(key)) >= self.limit

    def count(self, key: str) -> int:
        """Failures (reserved attempts included) now in the window."""
        return len(self._recent(key))

    def reserve(self, key: str) -> float | None:
        """Count an attempt as failed now; None (nothing counted) when `key` is blocked.
        Returns the stamp to give to `release()`."""
        times = self._recent(key)
        if len(times) >= self.limit:
            return None
        stamp = self._clock()
        self._failures[key] = times
        times.append(stamp)
        # Bound memory under a spray of addresses or names: forget the stalest keys.
        if len(self._failures) > 100_000:
            for stale in list(self._failures)[:10_000]:
                del self._failures[stale]
        return stamp

    def release(self, key: str, stamp: float) -> None:
        """Take back an attempt `reserve()` counted (it succeeded, or was never checked)."""
        times = self._failures.get(key)
        if times is not None and stamp in times:
            times.remove(stamp)
            if not times:
                del self._failures[key]

    def failed(self, key: str) -> int:
        """Record a failure (past the limit, the oldest is forgotten); the number now in
        the window."""
        if self.reserve(key) is None:
            times = self._recent(key)
            times.popleft()
            times.append(self._clock())
        return self.count(key)
