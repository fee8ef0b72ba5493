"""The decision over a session whose MX broke the reply sequence (issue 10), table-driven.

`client` keeps only replies read in sequence and says what broke in
`ConversationResult.violation`; `attempt.decide` and `attempt.conversation_failure` must
then never turn the session into Delivered or Bounced, except for a 2xx to the final dot
read before the violation (the MX took the message: RFC 5321 §6.1) and a RCPT refusal read
in sequence before the body went out. Sessions over real misbehaving servers are in
tests/integration/test_delivery_protocol.py.
"""

from __future__ import annotations

import pytest

from policy.model import TlsRptResult
from relay.delivery.attempt import conversation_failure, decide
from relay.delivery.client import ConversationResult, Reply
from relay.delivery.outcome import Bounced, Deferred, Delivered, Hop

HOP = Hop(mx="mx1.d.test", ip="127.0.0.11", tls="TLSv1.3", verified=True)
OK: Reply = (250, "2.0.0 OK")
AFTER_DOT = "protocol violation: MX answered 354 to the end of data"
BEFORE_DATA = "protocol violation: MX answered 250 to DATA instead of 354"


def _session(
    violation: str,
    data: Reply | None = None,
    *,
    rcpts: dict[str, Reply] | None = None,
    completed: bool = True,
) -> ConversationResult:
    return ConversationResult(
        hop=HOP,
        connected=True,
        error=violation,
        mail_reply=OK,
        rcpt_replies=rcpts if rcpts is not None else {"a@d.test": OK},
        data_reply=data,
        completed=completed,
        violation=violation,
    )


# (case, session, expected class, expected status)
CASES = [
    ("after the body, no reply kept", _session(AFTER_DOT), Deferred, "4.5.0"),
    ("after an in-sequence 250", _session("protocol violation: x", OK), Delivered, "2.0.0"),
    # Never built by the client (a refusal followed by more is dropped), decided safely.
    ("beside a 554", _session("protocol violation: x", (554, "5.6.0 no")), Deferred, "4.5.0"),
    ("beside a 451", _session("protocol violation: x", (451, "4.3.0 no")), Deferred, "4.5.0"),
]


@pytest.mark.parametrize(
    ("session", "kind", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_accepted_recipient(session: ConversationResult, kind: type, status: str) -> None:
    outcome = decide(["a@d.test"], session, [])["a@d.test"]
    assert type(outcome) is kind
    assert outcome.reason.status == status
    assert outcome.reason.hop == HOP
    if kind is Deferred:
        assert outcome.reason.text == f"mx1.d.test[127.0.0.11]: {session.violation}"
        assert outcome.reason.reply is None


def test_refusal_at_rcpt_read_before_the_violation_still_decides() -> None:
    session = _session(AFTER_DOT, rcpts={"a@d.test": OK, "b@d.test": (550, "5.1.1 gone")})
    outcomes = decide(["a@d.test", "b@d.test"], session, [])
    assert isinstance(outcomes["a@d.test"], Deferred)
    assert outcomes["a@d.test"].reason.status == "4.5.0"
    assert isinstance(outcomes["b@d.test"], Bounced)
    assert outcomes["b@d.test"].reason.status == "5.1.1"


def test_incomplete_session_defers_everyone_naming_the_violation() -> None:
    session = _session(BEFORE_DATA, completed=False, rcpts={"b@d.test": (550, "5.1.1 gone")})
    failure = conversation_failure(session, enforced=True)
    assert failure.status == "4.5.0"
    assert failure.text == f"mx1.d.test[127.0.0.11]: {BEFORE_DATA}"
    assert failure.tlsrpt is None
    outcomes = decide(["a@d.test", "b@d.test"], session, [failure])
    assert all(isinstance(o, Deferred) and o.reason is failure for o in outcomes.values())


def test_violation_wins_over_the_reply_that_came_with_it() -> None:
    session = ConversationResult(
        hop=HOP, connected=True, error_reply=(250, "x"), violation=BEFORE_DATA
    )
    assert conversation_failure(session, enforced=False).status == "4.5.0"


def test_enforced_tls_failure_is_still_named_first() -> None:
    session = ConversationResult(
        hop=HOP,
        connected=True,
        tls_failure=TlsRptResult.CERTIFICATE_EXPIRED,
        tls_failure_detail="expired",
        violation=BEFORE_DATA,
    )
    failure = conversation_failure(session, enforced=True)
    assert failure.status == "4.7.5"
    assert failure.tlsrpt is TlsRptResult.CERTIFICATE_EXPIRED
