"""MX sessions become TLSRPT sessions (RFC 8460 §4.2, §4.3); report mail is never counted."""

from __future__ import annotations

from pathlib import Path

from policy.model import Mode, Policy, PolicyLookup, TlsRptResult
from relay.delivery.attempt import MxTlsResult, mx_tls_result
from relay.delivery.client import ConversationResult
from relay.delivery.outcome import Hop
from relay.reporting import SessionRecorder, is_report_mail, sessions_of
from tlsrpt.counter import SessionCounter
from tlsrpt.model import Failure, PolicyType
from tlsrpt.store import ReportStore

BODY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.d.test\r\nmax_age: 86400\r\n"
ENFORCE = PolicyLookup("d.test", Policy(Mode.ENFORCE, ("mx1.d.test",), 86400, BODY), "1", "cached")
NONE = PolicyLookup("d.test", None, None, "none")
VERIFIED = Hop("mx1.d.test", "127.0.0.5", "TLSv1.3", verified=True)
OK = MxTlsResult("mx1.d.test", "127.0.0.5", None)
DAY = "2026-03-04"
MAIL_OK = (250, "2.1.0 ok")


def test_verified_session_is_a_successful_sts_session() -> None:
    assert mx_tls_result(ConversationResult(VERIFIED, connected=True), None) == OK
    (session,) = sessions_of("d.test", DAY, ENFORCE, [OK])
    assert session.failure is None
    assert session.policy.type is PolicyType.STS
    assert session.policy.mx == ("mx1.d.test",)


def test_tls_failure_is_a_failed_session_with_its_details() -> None:
    result = ConversationResult(
        Hop("MX1.d.test.", "127.0.0.5"),
        connected=True,
        tls_failure=TlsRptResult.CERTIFICATE_NOT_TRUSTED,
    )
    tried = mx_tls_result(result, None)
    assert tried is not None
    (session,) = sessions_of("d.test", DAY, ENFORCE, [tried])
    assert session.failure == Failure(
        TlsRptResult.CERTIFICATE_NOT_TRUSTED, receiving_mx="mx1.d.test", receiving_ip="127.0.0.5"
    )


def test_every_mx_session_of_an_attempt_counts() -> None:
    tried = [
        MxTlsResult("mx9.d.test", "", TlsRptResult.VALIDATION_FAILURE),  # refused by the policy
        MxTlsResult("mx1.d.test", "127.0.0.4", TlsRptResult.CERTIFICATE_EXPIRED),
        OK,
    ]
    sessions = sessions_of("d.test", DAY, ENFORCE, tried)
    assert [s.failure for s in sessions] == [
        Failure(TlsRptResult.VALIDATION_FAILURE, "mx9.d.test", ""),
        Failure(TlsRptResult.CERTIFICATE_EXPIRED, "mx1.d.test", "127.0.0.4"),
        None,
    ]


def test_testing_mode_session_that_enforce_would_refuse_is_a_failure() -> None:
    hop = Hop("mx1.d.test", "127.0.0.5", "TLSv1.3", verified=False)
    result = ConversationResult(hop, connected=True, tls_failure=TlsRptResult.CERTIFICATE_EXPIRED)
    assert mx_tls_result(result, None) == MxTlsResult(
        "mx1.d.test", "127.0.0.5", TlsRptResult.CERTIFICATE_EXPIRED
    )
    # An MX outside a testing policy, used anyway over good TLS.
    verified = ConversationResult(VERIFIED, connected=True, mail_reply=MAIL_OK)
    tried = mx_tls_result(verified, TlsRptResult.VALIDATION_FAILURE)
    assert tried == MxTlsResult("mx1.d.test", "127.0.0.5", TlsRptResult.VALIDATION_FAILURE)


def test_no_policy_over_tls_is_a_success_and_plaintext_is_starttls_not_supported() -> None:
    tls = ConversationResult(Hop("mx1.d.test", "127.0.0.5", "TLSv1.2"), connected=True)
    plain = ConversationResult(Hop("mx1.d.test", "127.0.0.5"), connected=True, mail_reply=MAIL_OK)
    ok = mx_tls_result(tls, None)
    clear = mx_tls_result(plain, None)
    assert ok is not None
    assert clear is not None
    ok_session, clear_session = sessions_of("d.test", DAY, NONE, [ok, clear])
    assert ok_session.failure is None
    assert ok_session.policy.type is PolicyType.NO_POLICY_FOUND
    assert clear_session.failure is not None
    assert clear_session.failure.result is TlsRptResult.STARTTLS_NOT_SUPPORTED


def test_policy_fetch_failure_without_cache_is_reported_under_no_policy_found() -> None:
    lookup = PolicyLookup("d.test", None, "2", "none", TlsRptResult.STS_POLICY_FETCH_ERROR, "x")
    (session,) = sessions_of("d.test", DAY, lookup, [OK])
    assert session.policy.type is PolicyType.NO_POLICY_FOUND
    assert session.failure is not None
    assert session.failure.result is TlsRptResult.STS_POLICY_FETCH_ERROR


def test_sessions_that_never_reached_tls_are_not_counted() -> None:
    # RFC 8460 §4.3.4: transient network failures need not be reported.
    hop = Hop("mx1.d.test", "127.0.0.5")
    refused = ConversationResult(hop, error="connection refused")
    greeting = ConversationResult(hop, connected=True, error_reply=(554, "go away"))
    assert mx_tls_result(refused, None) is None
    assert mx_tls_result(greeting, None) is None
    assert mx_tls_result(refused, TlsRptResult.VALIDATION_FAILURE) is None  # testing, unreached
    assert sessions_of("d.test", DAY, ENFORCE, []) == []


def test_a_pooled_connection_already_counted_for_the_domain_is_not_counted_again() -> None:
    again = ConversationResult(VERIFIED, connected=True, mail_reply=MAIL_OK, repeat=True)
    assert mx_tls_result(again, None) is None


def test_report_mail_is_recognised_by_tls_required_no() -> None:
    assert is_report_mail(b"From: a@b.test\r\nTLS-Required: No\r\n\r\nbody\r\n")
    assert is_report_mail(b"Subject: x\r\ntls-required:   no\r\n\r\n")
    assert not is_report_mail(b"Subject: x\r\n\r\nTLS-Required: No\r\n")  # in the body
    assert not is_report_mail(b"Subject: TLS-Required: No\r\n\r\n")


async def test_recorder_counts_sessions_but_never_report_mail(tmp_path: Path) -> None:
    store = ReportStore(tmp_path / "db.sqlite3")
    try:
        counter = SessionCounter(store)
        recorder = SessionRecorder(counter, clock=lambda: 1772625600.0)  # 2026-03-04 12:00Z
        recorder.record("D.test", ENFORCE, [OK], b"Subject: hi\r\n\r\nx\r\n")
        recorder.record("d.test", ENFORCE, [OK], b"Subject: hi\r\n\r\nx\r\n")
        recorder.record("d.test", ENFORCE, [OK], b"TLS-Required: No\r\n\r\nreport\r\n")
        assert counter.pending == 2
        await counter.close()
        (count,) = store.counts(DAY)
        assert (count.domain, count.count, count.failure) == ("d.test", 2, None)
    finally:
        store.close()
