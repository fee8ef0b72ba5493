"""Pure delivery logic, table-driven: the outcome decision, status codes, MX ordering, TLS
requirements. IDs refer to /work/shared/RFC-CHECKLIST.md."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.model import TlsRptResult
from relay.delivery.attempt import conversation_failure, decide, reply_status
from relay.delivery.client import ConversationResult, Reply, safe_line
from relay.delivery.mx import MxList, NullMx, order_mx
from relay.delivery.outcome import Bounced, Deferred, Delivered, Hop, Reason

HOP = Hop(mx="mx1.d.test", ip="127.0.0.11", tls="TLSv1.3", verified=True)
OK: Reply = (250, "2.0.0 OK")


def _session(
    mail: Reply | None = OK,
    rcpts: dict[str, Reply] | None = None,
    data: Reply | None = (250, "2.0.0 queued"),
    *,
    completed: bool = True,
    error: str | None = None,
) -> ConversationResult:
    return ConversationResult(
        hop=HOP,
        connected=True,
        error=error,
        mail_reply=mail,
        rcpt_replies=rcpts if rcpts is not None else {"a@d.test": OK},
        data_reply=data,
        completed=completed,
    )


# (case, session, expected class, expected status, expected reply)
DECIDE_CASES = [
    ("all good", _session(), Delivered, "2.0.0", "250 2.0.0 queued"),
    (
        "rcpt 550",
        _session(rcpts={"a@d.test": (550, "5.1.1 no such user")}, data=None),
        Bounced,
        "5.1.1",
        "550 5.1.1 no such user",
    ),
    (
        "rcpt 451",
        _session(rcpts={"a@d.test": (451, "4.2.0 busy")}, data=None),
        Deferred,
        "4.2.0",
        "451 4.2.0 busy",
    ),
    (
        "rcpt 550 without enhanced code",
        _session(rcpts={"a@d.test": (550, "nope")}, data=None),
        Bounced,
        "5.0.0",
        "550 nope",
    ),
    (
        "rcpt 4xx with mismatched enhanced code",
        _session(rcpts={"a@d.test": (450, "5.1.1 x")}),
        Deferred,
        "4.0.0",
        "450 5.1.1 x",
    ),
    (
        "mail 550 bounces",
        _session(mail=(550, "5.7.1 sender refused"), rcpts={}, data=None),
        Bounced,
        "5.7.1",
        "550 5.7.1 sender refused",
    ),
    (
        "data 554",
        _session(data=(554, "5.6.0 content rejected")),
        Bounced,
        "5.6.0",
        "554 5.6.0 content rejected",
    ),
    ("data 451", _session(data=(451, "4.3.0 later")), Deferred, "4.3.0", "451 4.3.0 later"),
    (
        "dropped mid-DATA",
        _session(data=None, error="connection lost at DATA"),
        Deferred,
        "4.4.2",
        None,
    ),
    ("no reply to RCPT", _session(rcpts={}, data=None), Deferred, "4.4.2", None),
    (
        "unknown 3xx after DATA is temporary",
        _session(data=(354, "go on")),
        Deferred,
        "4.0.0",
        "354 go on",
    ),
    (
        "nonsense 6xx is temporary",
        _session(rcpts={"a@d.test": (699, "what")}),
        Deferred,
        "4.0.0",
        "699 what",
    ),
    ("no MAIL reply", _session(mail=None, rcpts={}, data=None), Deferred, "4.4.2", None),
]


@pytest.mark.parametrize(
    ("session", "kind", "status", "reply"),
    [case[1:] for case in DECIDE_CASES],
    ids=[case[0] for case in DECIDE_CASES],
)
def test_decide_single_recipient(
    session: ConversationResult, kind: type, status: str, reply: str | None
) -> None:
    outcome = decide(["a@d.test"], session, [])["a@d.test"]
    assert type(outcome) is kind
    assert outcome.reason.status == status
    assert outcome.reason.reply == reply
    assert outcome.reason.hop == HOP
    assert outcome.reason.tlsrpt is None
    assert "\n" not in outcome.reason.text
    assert "\r" not in outcome.reason.text


def test_decide_mixed_recipients_in_one_transaction() -> None:
    # SMTP-09
    session = _session(
        rcpts={"a@d.test": (550, "5.1.1 gone"), "b@d.test": OK, "c@d.test": (451, "4.2.0 busy")}
    )
    outcomes = decide(["a@d.test", "b@d.test", "c@d.test"], session, [])
    assert isinstance(outcomes["a@d.test"], Bounced)
    assert isinstance(outcomes["b@d.test"], Delivered)
    assert isinstance(outcomes["c@d.test"], Deferred)


def test_decide_5xx_after_data_bounces_only_accepted_recipients_by_data_reply() -> None:
    # SMTP-10: every accepted recipient shares the final reply.
    session = _session(rcpts={"a@d.test": OK, "b@d.test": OK}, data=(554, "5.6.0 no"))
    outcomes = decide(["a@d.test", "b@d.test"], session, [])
    assert all(isinstance(o, Bounced) and o.reason.status == "5.6.0" for o in outcomes.values())


def test_decide_testing_marks_delivered_with_would_refuse_only() -> None:
    session = _session(rcpts={"a@d.test": OK, "b@d.test": (550, "5.1.1 gone")})
    outcomes = decide(
        ["a@d.test", "b@d.test"], session, [], would_refuse=TlsRptResult.CERTIFICATE_EXPIRED
    )
    assert outcomes["a@d.test"].reason.tlsrpt is TlsRptResult.CERTIFICATE_EXPIRED
    assert outcomes["b@d.test"].reason.tlsrpt is None


POLICY_FAIL = Reason("MX evil not permitted", "4.7.5", tlsrpt=TlsRptResult.VALIDATION_FAILURE)
REFUSED = Reason("mx2[127.0.0.12]: connect failed", "4.4.1", hop=Hop(mx="mx2"))
TIMEOUT = Reason("mx3[127.0.0.13]: timed out", "4.4.2", hop=Hop(mx="mx3"))


@pytest.mark.parametrize(
    ("failures", "expected"),
    [
        ([], Reason("no MX host could be tried", "4.4.1")),
        ([REFUSED, TIMEOUT], TIMEOUT),
        ([REFUSED, POLICY_FAIL, TIMEOUT], POLICY_FAIL),
    ],
    ids=["nothing tried", "last error", "TLS/policy failure wins"],
)
def test_decide_without_completed_session_defers_all(
    failures: list[Reason], expected: Reason
) -> None:
    # TLS, policy and connection failures never bounce.
    outcomes = decide(["a@d.test", "b@d.test"], None, failures)
    assert outcomes == {"a@d.test": Deferred(expected), "b@d.test": Deferred(expected)}


def test_decide_ignores_incomplete_session() -> None:
    session = _session(mail=(421, "4.3.2 closing"), rcpts={}, data=None, completed=False)
    assert decide(["a@d.test"], session, [REFUSED]) == {"a@d.test": Deferred(REFUSED)}


@pytest.mark.parametrize(
    ("session", "enforced", "status", "tlsrpt"),
    [
        (ConversationResult(hop=HOP, error="connect refused"), False, "4.4.1", None),
        (ConversationResult(hop=HOP, connected=True, error="dropped"), False, "4.4.2", None),
        (
            ConversationResult(hop=HOP, connected=True, error_reply=(554, "5.3.2 go away")),
            False,
            "4.3.2",
            None,
        ),
        (
            ConversationResult(hop=HOP, connected=True, error_reply=(421, "busy")),
            False,
            "4.0.0",
            None,
        ),
        (
            ConversationResult(
                hop=HOP,
                connected=True,
                tls_failure=TlsRptResult.CERTIFICATE_EXPIRED,
                tls_failure_detail="certificate has expired",
            ),
            True,
            "4.7.5",
            TlsRptResult.CERTIFICATE_EXPIRED,
        ),
        (
            ConversationResult(
                hop=HOP,
                connected=True,
                tls_failure=TlsRptResult.CERTIFICATE_EXPIRED,
                error="dropped",
            ),
            False,
            "4.4.2",
            None,
        ),
    ],
    ids=["refused", "dropped", "5xx greeting defers", "421", "tls enforced", "tls testing"],
)
def test_session_failure(
    session: ConversationResult, enforced: bool, status: str, tlsrpt: TlsRptResult | None
) -> None:
    reason = conversation_failure(session, enforced=enforced)
    assert reason.status == status
    assert reason.tlsrpt is tlsrpt
    assert reason.hop == HOP


@pytest.mark.parametrize(
    ("code", "text", "status"),
    [
        (250, "2.0.0 OK", "2.0.0"),
        (550, "5.1.1 user unknown", "5.1.1"),
        (550, "5.7.26 unauthenticated", "5.7.26"),
        (451, "4.7.1 greylisted", "4.7.1"),
        (550, "4.7.1 class mismatch", "5.0.0"),
        (550, "user unknown", "5.0.0"),
        (421, "", "4.0.0"),
        (550, "5.1.1x trailing junk", "5.0.0"),
        (550, "5.1234.1 too long", "5.0.0"),
        (354, "go ahead", "4.0.0"),
        (550, "5.1.1\nmore text", "5.1.1"),
    ],
)
def test_reply_status(code: int, text: str, status: str) -> None:
    assert reply_status(code, text) == status


def test_reason_text_is_one_safe_line() -> None:
    session = _session(rcpts={"a@d.test": (550, "5.1.1 evil\r\nX-Injected: yes\n" + "x" * 900)})
    outcome = decide(["a@d.test"], session, [])["a@d.test"]
    for line in (outcome.reason.text, outcome.reason.reply or ""):
        assert "\r" not in line
        assert "\n" not in line
        assert len(line) <= 300


@given(st.text())
def test_safe_line_has_no_control_characters(text: str) -> None:
    line = safe_line(text)
    assert len(line) <= 300
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in line)


# -- MX ordering (RFC 5321 §5.1, RFC 7505) ---------------------------------------------------


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([(20, "b.d.test."), (10, "a.d.test.")], MxList(hosts=("a.d.test", "b.d.test"))),
        ([(10, "MX1.D.TEST.")], MxList(hosts=("mx1.d.test",))),
        ([(0, ".")], NullMx()),
        ([(0, "."), (10, "mx1.d.test.")], MxList(hosts=("mx1.d.test",))),
        ([(0, "."), (0, ".")], NullMx()),
        ([(10, "a.d.test."), (20, "a.d.test.")], MxList(hosts=("a.d.test",))),
    ],
    ids=["by preference", "lower-case, no dot", "null MX", "null mixed", "two nulls", "dup"],
)
def test_order_mx(records: list[tuple[int, str]], expected: MxList | NullMx) -> None:
    assert order_mx(records, random.Random(1)) == expected


def test_order_mx_shuffles_equal_preferences() -> None:
    # SMTP-02: equal preferences are randomised; lower preferences always come first.
    records = [(10, "a.d.test."), (10, "b.d.test."), (5, "first.d.test."), (20, "z.d.test.")]
    rng = random.Random(42)
    seconds: Counter[str] = Counter()
    for _ in range(200):
        result = order_mx(records, rng)
        assert isinstance(result, MxList)
        assert result.hosts[0] == "first.d.test"
        assert result.hosts[-1] == "z.d.test"
        seconds[result.hosts[1]] += 1
    assert seconds["a.d.test"] > 50
    assert seconds["b.d.test"] > 50
