"""policy.webpki's TLS session cache and resuming contexts: how long a session may be
resumed, and that a resuming context checks exactly what the plain one checks.

Handshakes against real servers are in tests/integration/test_delivery_tls_resumption.py.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import cast

import pytest

from policy.webpki import (
    SESSION_LIFETIME_S,
    ResumingContext,
    SessionCache,
    client_context,
    unverified_context,
)

NOW = 1_800_000_000.0


@dataclass
class FakeSession:
    """What SessionCache reads of an ssl.SSLSession."""

    time: int = int(NOW)
    timeout: int = 7200
    ticket_lifetime_hint: int = 7200


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def _session(**fields: int) -> ssl.SSLSession:
    return cast(ssl.SSLSession, FakeSession(**fields))


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_session_is_offered_to_its_name_until_its_lifetime_ends(clock: Clock) -> None:
    cache = SessionCache(clock=clock)
    session = _session()
    cache.keep("mx1.d.test", session)
    assert cache.offer("mx1.d.test") is session
    assert cache.offer("mx2.d.test") is None
    assert cache.offer("MX1.d.test") is None
    clock.now += SESSION_LIFETIME_S - 1
    assert cache.offer("mx1.d.test") is session
    clock.now += 1
    assert cache.offer("mx1.d.test") is None
    assert len(cache) == 0


def test_never_past_the_certificate_or_what_the_session_allows(clock: Clock) -> None:
    cache = SessionCache(clock=clock)
    cache.keep("cert.test", _session(), not_after=NOW + 60)
    cache.keep("timeout.test", _session(timeout=30, ticket_lifetime_hint=0))
    cache.keep("hint.test", _session(ticket_lifetime_hint=45))
    cache.keep("expired.test", _session(), not_after=NOW - 1)
    assert len(cache) == 3
    clock.now += 30
    assert cache.offer("timeout.test") is None
    assert cache.offer("hint.test") is not None
    clock.now += 15
    assert cache.offer("hint.test") is None
    assert cache.offer("cert.test") is not None
    clock.now += 15
    assert cache.offer("cert.test") is None


def test_forget_and_the_size_bound(clock: Clock) -> None:
    cache = SessionCache(clock=clock, max_entries=2)
    for name in ("a.test", "b.test", "c.test"):
        cache.keep(name, _session())
    assert cache.offer("a.test") is None  # the longest kept made room
    assert cache.offer("b.test") is not None
    assert cache.offer("c.test") is not None
    cache.forget("b.test")
    cache.forget("never.test")
    assert cache.offer("b.test") is None
    assert len(cache) == 1


def test_resuming_contexts_check_what_plain_ones_check() -> None:
    """`resume=True` changes which sessions are offered, nothing that is verified."""
    reference = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    plain, resuming = client_context(None), client_context(None, resume=True)
    assert isinstance(resuming, ResumingContext)
    assert not isinstance(plain, ResumingContext)
    for context in (plain, resuming):
        assert context.verify_flags == reference.verify_flags
        assert context.options == reference.options | ssl.OP_NO_COMPRESSION
        assert context.cert_store_stats() == reference.cert_store_stats()
    for attribute in (
        "verify_mode",
        "check_hostname",
        "hostname_checks_common_name",
        "minimum_version",
        "maximum_version",
        "verify_flags",
        "options",
        "security_level",
    ):
        assert getattr(plain, attribute) == getattr(resuming, attribute), attribute
    assert [c["name"] for c in plain.get_ciphers()] == [c["name"] for c in resuming.get_ciphers()]
    opportunistic = unverified_context(resume=True)
    assert isinstance(opportunistic, ResumingContext)
    assert opportunistic.verify_mode is ssl.CERT_NONE
    assert opportunistic.minimum_version == unverified_context().minimum_version
    assert opportunistic.security_level == unverified_context().security_level


def test_every_resuming_context_has_a_cache_of_its_own() -> None:
    contexts = [
        client_context(None, resume=True),
        client_context(None, resume=True),
        unverified_context(resume=True),
    ]
    caches = {id(c.sessions) for c in contexts if isinstance(c, ResumingContext)}
    assert len(caches) == 3


def test_nothing_is_offered_before_a_session_is_kept() -> None:
    context = client_context(None, resume=True)
    assert isinstance(context, ResumingContext)
    ssl_object = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="a.test")
    assert ssl_object.session is None
