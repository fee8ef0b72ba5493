"""Delivery outcomes become TLSRPT sessions (RFC 8460 §4.2, §4.3); report mail is never counted."""

from __future__ import annotations

from pathlib import Path

from policy.model import Mode, Policy, PolicyLookup, TlsRptResult
from relay.delivery.outcome import Bounced, Deferred, Delivered, Hop, Outcome, Reason
from relay.reporting import SessionRecorder, is_report_mail, session_of
from tlsrpt.counter import SessionCounter
from tlsrpt.model import Failure, PolicyType
from tlsrpt.store import ReportStore

BODY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.d.test\r\nmax_age: 86400\r\n"
ENFORCE = PolicyLookup("d.test", Policy(Mode.ENFORCE, ("mx1.d.test",), 86400, BODY), "1", "cached")
NONE = PolicyLookup("d.test", None, None, "none")
VERIFIED = Hop("mx1.d.test", "127.0.0.5", "TLSv1.3", verified=True)
DAY = "2026-03-04"


def _one(outcome: Outcome) -> dict[str, Outcome]:
    return {"u@d.test": outcome}


def test_verified_delivery_is_a_successful_sts_session() -> None:
    session = session_of(
        "d.test", DAY, ENFORCE, _one(Delivered(Reason("ok", "2.0.0", hop=VERIFIED)))
    )
    assert session is not None
    assert session.failure is None
    assert session.policy.type is PolicyType.STS
    assert session.policy.mx == ("mx1.d.test",)


def test_tls_failure_is_a_failed_session_with_its_details() -> None:
    hop = Hop("MX1.d.test.", "127.0.0.5")
    reason = Reason("bad cert", "4.7.5", hop=hop, tlsrpt=TlsRptResult.CERTIFICATE_NOT_TRUSTED)
    session = session_of("d.test", DAY, ENFORCE, _one(Deferred(reason)))
    assert session is not None
    assert session.failure == Failure(
        TlsRptResult.CERTIFICATE_NOT_TRUSTED, receiving_mx="mx1.d.test", receiving_ip="127.0.0.5"
    )


def test_mx_not_in_policy_is_a_validation_failure_without_ip() -> None:
    reason = Reason(
        "not permitted", "4.7.5", hop=Hop("mx9.d.test"), tlsrpt=TlsRptResult.VALIDATION_FAILURE
    )
    session = session_of("d.test", DAY, ENFORCE, _one(Deferred(reason)))
    assert session is not None
    assert session.failure == Failure(TlsRptResult.VALIDATION_FAILURE, "mx9.d.test", "")


def test_testing_mode_delivery_that_enforce_would_refuse_is_a_failure() -> None:
    hop = Hop("mx1.d.test", "127.0.0.5", "TLSv1.3", verified=False)
    reason = Reason("ok", "2.0.0", hop=hop, tlsrpt=TlsRptResult.CERTIFICATE_EXPIRED)
    session = session_of("d.test", DAY, ENFORCE, _one(Delivered(reason)))
    assert session is not None
    assert session.failure is not None
    assert session.failure.result is TlsRptResult.CERTIFICATE_EXPIRED


def test_no_policy_over_tls_is_a_success_and_plaintext_is_starttls_not_supported() -> None:
    tls = Delivered(Reason("ok", "2.0.0", hop=Hop("mx1.d.test", "127.0.0.5", "TLSv1.2")))
    plain = Delivered(Reason("ok", "2.0.0", hop=Hop("mx1.d.test", "127.0.0.5", None)))
    ok = session_of("d.test", DAY, NONE, _one(tls))
    assert ok is not None
    assert ok.failure is None
    assert ok.policy.type is PolicyType.NO_POLICY_FOUND
    clear = session_of("d.test", DAY, NONE, _one(plain))
    assert clear is not None
    assert clear.failure is not None
    assert clear.failure.result is TlsRptResult.STARTTLS_NOT_SUPPORTED


def test_recipient_refused_over_verified_tls_is_still_a_successful_tls_session() -> None:
    outcome = Bounced(Reason("550 no such user", "5.1.1", hop=VERIFIED))
    session = session_of("d.test", DAY, ENFORCE, _one(outcome))
    assert session is not None
    assert session.failure is None


def test_policy_fetch_failure_without_cache_is_reported_under_no_policy_found() -> None:
    lookup = PolicyLookup("d.test", None, "2", "none", TlsRptResult.STS_POLICY_FETCH_ERROR, "x")
    tls = Delivered(Reason("ok", "2.0.0", hop=Hop("mx1.d.test", "127.0.0.5", "TLSv1.3")))
    session = session_of("d.test", DAY, lookup, _one(tls))
    assert session is not None
    assert session.policy.type is PolicyType.NO_POLICY_FOUND
    assert session.failure is not None
    assert session.failure.result is TlsRptResult.STS_POLICY_FETCH_ERROR


def test_nothing_reached_is_not_a_session() -> None:
    # RFC 8460 §4.3.4: transient network failures need not be reported.
    refused = Deferred(Reason("connection refused", "4.4.1", hop=Hop("mx1.d.test", "127.0.0.5")))
    no_dns = Deferred(Reason("SERVFAIL", "4.4.3"))
    assert session_of("d.test", DAY, NONE, _one(refused)) is None
    assert session_of("d.test", DAY, ENFORCE, _one(no_dns)) is None


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
        outcome = _one(Delivered(Reason("ok", "2.0.0", hop=VERIFIED)))
        recorder.record("D.test", ENFORCE, outcome, b"Subject: hi\r\n\r\nx\r\n")
        recorder.record("d.test", ENFORCE, outcome, b"Subject: hi\r\n\r\nx\r\n")
        recorder.record("d.test", ENFORCE, outcome, b"TLS-Required: No\r\n\r\nreport\r\n")
        assert counter.pending == 2
        await counter.close()
        (count,) = store.counts(DAY)
        assert (count.domain, count.count, count.failure) == ("d.test", 2, None)
    finally:
        store.close()
