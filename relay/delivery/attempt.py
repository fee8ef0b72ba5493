"""One delivery attempt of one message to one recipient domain.

Owns the MX walk (RFC 5321 §5.1, RFC 8461 §8.4) and the decision that turns host results
into per-recipient outcomes (`decide`, pure). The policy lookup comes in from the caller
(the worker); this module never fetches policies, touches the queue or schedules retries.

Decision rules (Postfix-like; CONVENTIONS "Outcomes are values"): every unknown is
temporary; TLS, MTA-STS and DNS-timeout failures defer, never bounce; a bounce needs a
5xx from an MX that passed the policy, NXDOMAIN, a domain without address, or a null MX.
A REQUIRETLS message (RFC 8689) that no MX can take (none authenticated by DANE or
MTA-STS, or none offering REQUIRETLS) defers with 4.7.30; the pipeline turns that into
5.7.30 when its lifetime ends.
"""

from __future__ import annotations

import random
import re
import ssl
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import assert_never

import dns.asyncresolver

from policy.model import TlsRptResult
from relay.delivery.client import (
    Connection,
    ConversationResult,
    Dialer,
    Reply,
    connect,
    safe_line,
    transact,
)
from relay.delivery.dane import Tlsa
from relay.delivery.decision import MxRule, TlsDecision, TlsPolicySource
from relay.delivery.envelope import Envelope
from relay.delivery.mx import (
    DnsTempFail,
    MxList,
    NoAddresses,
    NoSuchDomain,
    NullMx,
    resolve_addresses,
    resolve_mx,
)
from relay.delivery.outcome import Bounced, Deferred, Delivered, Hop, Outcome, Reason
from relay.delivery.pool import ConnectionPool, PoolKey, PoolLimits
from relay.delivery.tls import TlsRequirement


@dataclass(frozen=True, slots=True)
class AttemptSettings:
    """Everything an attempt needs besides the message. Timeouts in seconds.

    Defaults follow Postfix (smtp_connect_timeout 30 s, command timeouts 300 s).
    `max_addresses` caps the connections of one attempt over all MX hosts (RFC 5321
    §5.1 allows a limit; it must be at least 2). `allow_loopback_mx` also allows MX
    addresses that belong to this machine (`own_addresses`, local interfaces).
    """

    port: int
    helo: str
    verified_ctx: ssl.SSLContext
    unverified_ctx: ssl.SSLContext
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    dns_timeout: float = 10.0
    allow_loopback_mx: bool = False
    max_addresses: int = 10
    max_messages_per_connection: int = 100
    max_connections_per_host: int = 20
    own_addresses: frozenset[str] = frozenset()
    # Told of every completed TLS handshake of an MX connection: True when resumed.
    on_tls_handshake: Callable[[bool], None] | None = None

    @property
    def dialer(self) -> Dialer:
        return Dialer(
            port=self.port,
            helo=self.helo,
            verified_ctx=self.verified_ctx,
            unverified_ctx=self.unverified_ctx,
            connect_timeout=self.connect_timeout,
            command_timeout=self.command_timeout,
            on_tls_handshake=self.on_tls_handshake,
        )

    def pool_limits(self) -> PoolLimits:
        return PoolLimits(
            max_per_host=self.max_connections_per_host,
            max_messages=self.max_messages_per_connection,
            slot_wait=min(self.connect_timeout, 5.0),
        )


# RFC 3463 §2: class.subject.detail at the start of the reply text (RFC 2034).
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?=\s|$)")
_DEFAULT_STATUS = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}


def reply_status(code: int, text: str) -> str:
    """The reply's enhanced status code, or one derived from its class; unknown is 4.0.0."""
    match = _ENHANCED.match(text)
    if match and match.group(1) == str(code // 100):
        return match.group(0)
    return _DEFAULT_STATUS.get(code // 100, "4.0.0")


def _transient(status: str) -> str:
    return "4" + status[1:]


def _where(hop: Hop) -> str:
    return f"{hop.mx}[{hop.ip}]" if hop.ip else hop.mx


def _by_reply(reply: Reply, stage: str, hop: Hop, tlsrpt: TlsRptResult | None = None) -> Outcome:
    """2xx delivered, 5xx bounced, anything else (4xx, or nonsense) deferred."""
    code, text = reply
    line = safe_line(f"{code} {text}")
    status = reply_status(code, text)
    said = safe_line(f"{_where(hop)} said: {line} (in reply to {stage})")
    match code // 100:
        case 2:
            return Delivered(Reason(said, status, line, hop, tlsrpt))
        case 5:
            return Bounced(Reason(said, status, line, hop))
        case _:
            return Deferred(Reason(said, _transient(status), line, hop))


def _recipient_outcome(
    rcpt: str, session: ConversationResult, would_refuse: TlsRptResult | None
) -> Outcome:
    hop = session.hop
    lost = safe_line(f"{_where(hop)}: {session.error or 'no reply'}")
    if session.mail_reply is None:
        return Deferred(Reason(lost, "4.4.2", hop=hop))
    if session.mail_reply[0] // 100 != 2:
        return _by_reply(session.mail_reply, "MAIL FROM", hop)
    rcpt_reply = session.rcpt_replies.get(rcpt)
    if rcpt_reply is None:
        return Deferred(Reason(lost, "4.4.2", hop=hop))
    if rcpt_reply[0] // 100 != 2:
        return _by_reply(rcpt_reply, "RCPT TO", hop)
    accepted = session.data_reply is not None and session.data_reply[0] // 100 == 2
    if session.violation is not None and not accepted:
        # The MX broke the reply sequence once the data was out: no reply of it decides
        # (never sent, never bounced); RFC 5321 §6.1 keeps the message ours. A 2xx kept
        # beside a violation came in sequence before it (client.ConversationResult).
        text = safe_line(f"{_where(hop)}: {session.violation}")
        return Deferred(Reason(text, "4.5.0", hop=hop))
    if session.data_reply is None:
        # Dropped mid-DATA: maybe delivered, maybe not; RFC 5321 §6.1 keeps it ours.
        return Deferred(Reason(lost, "4.4.2", hop=hop))
    return _by_reply(session.data_reply, "end of DATA", hop, would_refuse)


def is_tls_refusal(reason: Reason) -> bool:
    """A TLS, policy or REQUIRETLS failure (RFC 8460 result type, or RFC 8689's X.7.30)."""
    return reason.tlsrpt is not None or reason.status[1:] == ".7.30"


def _most_meaningful(failures: Sequence[Reason]) -> Reason:
    """The first TLS/policy/REQUIRETLS failure (it names what a fix needs), else the last
    error."""
    for reason in failures:
        if is_tls_refusal(reason):
            return reason
    if failures:
        return failures[-1]
    return Reason("no MX host could be tried", "4.4.1")


def decide(
    recipients: Sequence[str],
    session: ConversationResult | None,
    failures: Sequence[Reason],
    *,
    would_refuse: TlsRptResult | None = None,
) -> dict[str, Outcome]:
    """Per-recipient outcomes of one attempt.

    `session` is the session that completed the transaction, or None when no host did
    (then every recipient is deferred with the most meaningful of `failures`, the host
    failures met on the way, marked `unreachable` when every one of them was).
    `would_refuse` (testing only) is what enforce would have refused; it is carried on
    Delivered reasons for reporting (RFC 8461 §5, RFC 8460).
    """
    if session is None or not session.completed:
        reason = _most_meaningful(failures)
        # The destination is unreachable only when every host failure says so (a 4xx
        # greeting or a TLS failure anywhere is a reply): relay/delivery/holds.py.
        unreachable = bool(failures) and all(f.unreachable for f in failures)
        if reason.unreachable != unreachable:
            reason = replace(reason, unreachable=unreachable)
        return {rcpt: Deferred(reason) for rcpt in recipients}
    return {rcpt: _recipient_outcome(rcpt, session, would_refuse) for rcpt in recipients}


def conversation_failure(session: ConversationResult, *, enforced: bool) -> Reason:
    """Why an incomplete session did not decide anything (a transient host failure)."""
    hop = session.hop
    if session.requiretls_missing:
        # RFC 8689 §4.2.1: this host cannot take the REQUIRETLS message (5.7.30 at the end).
        return Reason(session.error or "REQUIRETLS not offered", "4.7.30", hop=hop)
    if enforced and session.tls_failure is not None:
        text = safe_line(f"TLS with {_where(hop)} failed: {session.tls_failure_detail}")
        return Reason(text, "4.7.5", hop=hop, tlsrpt=session.tls_failure)
    if session.violation is not None:
        # RFC 3463 4.5.0: the MX broke the protocol; its replies decide nothing.
        return Reason(safe_line(f"{_where(hop)}: {session.violation}"), "4.5.0", hop=hop)
    if session.error_reply is not None:
        code, text = session.error_reply
        line = safe_line(f"{code} {text}")
        said = safe_line(f"{_where(hop)} said: {line}")
        return Reason(said, _transient(reply_status(code, text)), line, hop)
    status = "4.4.2" if session.connected else "4.4.1"
    text = safe_line(f"{_where(hop)}: {session.error or 'no answer'}")
    return Reason(text, status, hop=hop, unreachable=session.unreachable)


@dataclass(frozen=True, slots=True)
class MxTlsResult:
    """One session with one MX host as RFC 8460 counts it: it reached TLS or MTA-STS
    evaluation. `result` is None for policy-compliant TLS, else the failure's result type;
    `ip` is empty when the MX was refused by the policy before any connection."""

    mx: str
    ip: str
    result: TlsRptResult | None
    tlsa: tuple[str, ...] | None = None  # held to DANE: the TLSA RRset (RFC 8460 `tlsa`)


def mx_tls_result(
    session: ConversationResult,
    policy_fail: TlsRptResult | None,
    *,
    validates: bool = True,
    tlsa: tuple[str, ...] | None = None,
) -> MxTlsResult | None:
    """`session` as a TLSRPT session, or None when it does not count: it never reached
    TLS (RFC 8460 §4.3.4: transient network failures need not be reported), or it ran
    over a pooled connection whose TLS session was already counted for this domain.

    Counted against what the domain published: `policy_fail` is the published policy's
    verdict on the MX name; `validates` says whether that policy asks for a validated
    certificate. Without one, a certificate failure met only because an override asked
    for verification is no failure of the domain's (the session is not counted)."""
    hop = session.hop
    if not session.connected or session.repeat:
        return None
    tls_failure = session.tls_failure
    certificate_only = tls_failure not in (None, TlsRptResult.STARTTLS_NOT_SUPPORTED)
    if not validates and certificate_only:
        return None
    result = policy_fail or tls_failure
    if result is None and hop.tls is None:
        if session.mail_reply is None:
            return None  # ended before the TLS decision (greeting refused, dropped)
        result = TlsRptResult.STARTTLS_NOT_SUPPORTED  # went on in the clear
    return MxTlsResult(hop.mx, hop.ip or "", result, tlsa)


def _dane_reason(host: str, rule: MxRule) -> Reason:
    """RFC 7672 §2.2: the host's TLSA lookup failed (bogus, SERVFAIL, timeout): it is not
    used, and nothing else (MTA-STS, cleartext) stands in for DANE."""
    text = safe_line(f"DANE: {host} not used: {rule.detail or 'TLSA lookup failed'}")
    return Reason(text, "4.7.5", hop=Hop(mx=host), tlsrpt=rule.refused)


def _requiretls_reason(host: str, rule: MxRule) -> Reason:
    """RFC 8689 §4.2.1: nothing authenticates this host; a REQUIRETLS message skips it."""
    text = safe_line(f"REQUIRETLS: {host} not used: {rule.requiretls_unmet}")
    return Reason(text, "4.7.30", hop=Hop(mx=host))


def _tlsa_strings(rule: MxRule) -> tuple[str, ...] | None:
    """The TLSA RRset as RFC 8460 §4.5 reports a `tlsa` policy, for a host under DANE."""
    return tuple(r.text for r in rule.records) if rule.dane else None


def _policy_reason(domain: str, host: str, decision: TlsDecision) -> Reason:
    refused = decision.refuses_mx(host) or TlsRptResult.VALIDATION_FAILURE
    whose = (
        "tls.overrides entry" if decision.source is TlsPolicySource.OVERRIDE else "MTA-STS policy"
    )
    text = safe_line(f"MX {host} is not permitted by the {whose} of {domain}")
    return Reason(
        text, "4.7.5", hop=Hop(mx=host), tlsrpt=decision.published_verdict(host) or refused
    )


def _everyone(recipients: Sequence[str], outcome: Outcome) -> dict[str, Outcome]:
    return dict.fromkeys(recipients, outcome)


async def attempt_domain(
    domain: str,
    envelope: Envelope,
    *,
    decision: TlsDecision,
    settings: AttemptSettings,
    resolver: dns.asyncresolver.Resolver,
    rng: random.Random,
    pool: ConnectionPool | None = None,
    mx: MxList | NullMx | NoSuchDomain | DnsTempFail | None = None,
    sessions: list[MxTlsResult] | None = None,
) -> dict[str, Outcome]:
    """Try to deliver `envelope` (all recipients at `domain`); one outcome per recipient.

    Without a `pool`, every session uses a new connection closed after it. `mx` is the
    domain's MX lookup when the caller already made it (to know whether a policy matters).
    `sessions`, when given, receives every MX session of the attempt that counts for TLS
    reporting (`mx_tls_result`), in the order tried: outcomes name only the deciding host.
    """
    recipients = envelope.recipients
    if decision.blocked is not None:
        # Our own store failed us: the policy in force is unknown. Waiting is safe; guessing
        # "no policy" could send an enforce domain's mail in the clear.
        text = safe_line(f"{decision.blocked}; not attempted, the mail waits")
        return _everyone(recipients, Deferred(Reason(text, "4.3.0")))
    if mx is None:
        mx = await resolve_mx(domain, resolver, timeout=settings.dns_timeout, rng=rng)
    match mx:
        case NullMx():
            # RFC 7505 §3: no connection, no retry (NMX-01).
            text = f"{domain} accepts no mail (null MX)"
            return _everyone(recipients, Bounced(Reason(text, "5.1.10")))
        case NoSuchDomain(detail=detail, status=status):
            return _everyone(recipients, Bounced(Reason(safe_line(detail), status)))
        case DnsTempFail(detail=detail):
            return _everyone(recipients, Deferred(Reason(safe_line(detail), "4.4.3")))
        case MxList():
            own_pool = pool is None
            active = pool or ConnectionPool(replace(settings.pool_limits(), max_messages=1))
            try:
                tried = sessions if sessions is not None else []
                return await _walk(
                    domain, mx, envelope, decision, settings, resolver, active, tried
                )
            finally:
                if own_pool:
                    active.close_all()
        case _:
            assert_never(mx)


async def _walk(
    domain: str,
    mx: MxList,
    envelope: Envelope,
    decision: TlsDecision,
    settings: AttemptSettings,
    resolver: dns.asyncresolver.Resolver,
    pool: ConnectionPool,
    tried: list[MxTlsResult],
) -> dict[str, Outcome]:
    """RFC 8461 §8.4: walk the MX list in order; a host the decision refuses counts as a
    transient failure and is never contacted; under REPORT every host is used and what
    the published policy would have refused is recorded. Every conversation that counts
    for TLS reporting (against the published policy) goes to `tried`."""
    recipients = envelope.recipients
    failures: list[Reason] = []
    left = max(settings.max_addresses, 2)
    for host in mx.hosts:
        rule = decision.for_mx(host)  # DANE evidence first, per host (RFC 7672 §2.2)
        requirement = rule.requirement
        enforced = requirement not in (TlsRequirement.OPPORTUNISTIC, TlsRequirement.REPORT)
        validates = rule.dane or decision.published_requires_validation
        tlsa = _tlsa_strings(rule)
        # Under DANE the host is held to its TLSA records, not to the MTA-STS names.
        published_fail = None if rule.dane else decision.published_verdict(host)
        if rule.requiretls_unmet is not None:
            # Not contacted: no TLS session, nothing for a TLS report (RFC 8460 §4.3).
            failures.append(_requiretls_reason(host, rule))
            continue
        if rule.refused is not None:
            if rule.dane:
                failures.append(_dane_reason(host, rule))
                tried.append(MxTlsResult(host, "", rule.refused, tlsa))
                continue
            failures.append(_policy_reason(domain, host, decision))
            if published_fail is not None:
                tried.append(MxTlsResult(host, "", published_fail))
            continue
        conversations = _conversations(
            pool, domain, host, rule, envelope, settings, resolver, failures
        )
        async for conversation in conversations:
            left -= 1
            counted = mx_tls_result(conversation, published_fail, validates=validates, tlsa=tlsa)
            if counted is not None:
                tried.append(counted)
            if conversation.completed:
                await conversations.aclose()
                would_refuse = None
                if requirement is TlsRequirement.REPORT:
                    would_refuse = published_fail or conversation.tls_failure
                return decide(recipients, conversation, failures, would_refuse=would_refuse)
            failures.append(conversation_failure(conversation, enforced=enforced))
            if left <= 0:
                await conversations.aclose()
                return decide(recipients, None, failures)
    return decide(recipients, None, failures)


async def _conversations(
    pool: ConnectionPool,
    domain: str,
    host: str,
    rule: MxRule,
    envelope: Envelope,
    settings: AttemptSettings,
    resolver: dns.asyncresolver.Resolver,
    failures: list[Reason],
) -> AsyncGenerator[ConversationResult, None]:
    """The sessions tried at `host` under `rule`: over an idle pooled connection first (no
    address lookup), then one per address, IPv6 first (RFC 5321 §5.1: try every address)."""
    requirement, requiretls = rule.requirement, rule.requiretls
    session = await _over_idle(pool, host, rule, envelope, settings, domain)
    if session is not None:
        yield session
    addresses = await resolve_addresses(
        host,
        resolver,
        timeout=settings.dns_timeout,
        allow_loopback=settings.allow_loopback_mx,
        own=settings.own_addresses,
    )
    if isinstance(addresses, DnsTempFail | NoAddresses):
        status = "4.4.3" if isinstance(addresses, DnsTempFail) else "4.4.4"
        failures.append(Reason(safe_line(addresses.detail), status, hop=Hop(mx=host)))
        return
    for ip in addresses:
        key = PoolKey(host, ip, requirement, requiretls)
        yield await pooled_conversation(
            pool, key, envelope, settings, domain=domain, tlsa=rule.tlsa
        )


async def _over_idle(
    pool: ConnectionPool,
    host: str,
    rule: MxRule,
    envelope: Envelope,
    settings: AttemptSettings,
    domain: str,
) -> ConversationResult | None:
    """A transaction over an idle pooled connection to `host` opened under `rule`'s
    requirement (and for REQUIRETLS mail exactly when the rule is), if there is a live one."""
    requirement, requiretls = rule.requirement, rule.requiretls
    while (conn := pool.take_idle_for_host(host, requirement, requiretls)) is not None:
        result = await _transact_pooled(pool, conn, envelope, settings, domain, reused=True)
        if result.stale:
            await pool.discard(conn)
            continue
        await _give_back(pool, PoolKey(host, conn.ip, requirement, requiretls), conn, result)
        return result
    return None


async def pooled_conversation(
    pool: ConnectionPool,
    key: PoolKey,
    envelope: Envelope,
    settings: AttemptSettings,
    *,
    domain: str = "",
    tlsa: tuple[Tlsa, ...] = (),
) -> ConversationResult:
    """One transaction to key's (MX, IP) under key's requirement, over an idle pooled
    connection when there is one. A pooled connection found dead is discarded and the
    message sent over a fresh one; that is not a failed attempt (nothing was sent).
    `domain` is the recipients' policy domain (marks repeats, see `MxTlsResult`); `tlsa`
    the usable TLSA records of the MX host under DANE (a pooled DANE connection to that
    host matched the same RRset: TLSA records belong to the host, not the domain)."""
    host, ip, requirement, requiretls = key
    while True:
        got = await pool.acquire(key)
        if got is False:
            error = f"too many connections to {ip} (delivery.max_connections_per_host)"
            down = pool.is_down(ip)
            if down:
                error = f"{ip} timed out recently; not tried again yet"
            return ConversationResult(hop=Hop(mx=host, ip=ip), error=error, unreachable=down)
        if isinstance(got, Connection):
            result = await _transact_pooled(pool, got, envelope, settings, domain, reused=True)
            if result.stale:
                await pool.discard(got)
                continue
            await _give_back(pool, key, got, result)
            return result
        break
    try:
        conn = await connect(ip, host, requirement, settings.dialer, tlsa, requiretls=requiretls)
    except BaseException:
        pool.abandon(None, ip)  # cut off while connecting: the reserved slot goes back
        raise
    if isinstance(conn, ConversationResult):
        if conn.timed_out:
            pool.mark_down(ip, settings.connect_timeout)
        await pool.unreserve(ip)
        return conn
    result = await _transact_pooled(pool, conn, envelope, settings, domain, reused=False)
    await _give_back(pool, key, conn, result)
    return result


async def _transact_pooled(
    pool: ConnectionPool,
    conn: Connection,
    envelope: Envelope,
    settings: AttemptSettings,
    domain: str,
    *,
    reused: bool,
) -> ConversationResult:
    """`transact` over a connection the pool lent us, marked a repeat when `conn` carried
    `domain`'s mail before (a stale result is dropped with its connection); a connection
    whose transaction was cut off (the attempt's deadline) is in an unknown state: closed,
    never lent again."""
    repeat = domain in conn.domains
    conn.domains.add(domain)
    try:
        return await transact(
            conn,
            envelope,
            command_timeout=settings.command_timeout,
            reused=reused,
            repeat=repeat,
        )
    except BaseException:
        pool.abandon(conn, conn.ip)
        raise


async def _give_back(
    pool: ConnectionPool, key: PoolKey, conn: Connection, result: ConversationResult
) -> None:
    if result.error is None and conn.alive:
        await pool.put_back(key, conn)
    else:
        await pool.discard(conn)
