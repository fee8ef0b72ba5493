"""What REQUIRETLS (RFC 8689) changes in the pure delivery rules: the MAIL parameter, which
host failure an attempt reports, and the status a deferral bounces with at the end of the
lifetime (5.7.30 when no MX could meet the message's TLS demands, RTLS-04)."""

from __future__ import annotations

import pytest

from policy.model import TlsRptResult
from relay.delivery.attempt import decide
from relay.delivery.envelope import Envelope, mail_params
from relay.delivery.outcome import Bounced, Deferred, Delivered, Hop, Outcome, Reason
from relay.delivery.pipeline import expire_outcome

HOP = Hop(mx="mx1.d.test", ip="127.0.0.11")
UNMET = Reason("REQUIRETLS: mx1.d.test not used: no DANE TLSA records", "4.7.30", hop=HOP)
MISSING = Reason("REQUIRETLS: mx1.d.test: not offered after STARTTLS", "4.7.30", hop=HOP)
CERT = Reason("TLS failed", "4.7.5", hop=HOP, tlsrpt=TlsRptResult.CERTIFICATE_NOT_TRUSTED)
REFUSED = Reason("mx2.d.test[127.0.0.12]: connection refused", "4.4.1", hop=HOP)
BUSY = Reason("said: 451 4.3.0 busy", "4.3.0", "451 4.3.0 busy", HOP)


@pytest.mark.parametrize(
    ("requiretls", "offered", "expected"),
    [
        (True, ("requiretls", "size"), [b"SIZE=6", b"REQUIRETLS"]),
        (False, ("requiretls", "size"), [b"SIZE=6"]),
    ],
)
def test_requiretls_is_passed_on_in_mail(
    requiretls: bool, offered: tuple[str, ...], expected: list[bytes]
) -> None:
    envelope = Envelope("app@src.test", ["u@d.test"], b"hello\n", requiretls=requiretls)
    assert mail_params(envelope, lambda name: name in offered, utf8=False) == expected


def test_the_requiretls_failure_is_what_an_attempt_reports() -> None:
    # MX 10 could not take the message (REQUIRETLS), MX 20 was down: the first names a fix.
    (outcome,) = decide(["u@d.test"], None, [UNMET, REFUSED]).values()
    assert outcome == Deferred(UNMET)


@pytest.mark.parametrize(
    ("requiretls", "last", "status"),
    [
        (True, UNMET, "5.7.30"),  # no MX authenticated by DANE or MTA-STS
        (True, MISSING, "5.7.30"),  # the MX did not offer REQUIRETLS
        (True, CERT, "5.7.30"),  # TLS did not meet the demand either
        (True, REFUSED, "4.4.7"),  # only the network failed: the usual expiry
        (True, BUSY, "4.4.7"),
        (False, CERT, "4.4.7"),
        (False, REFUSED, "4.4.7"),
    ],
)
def test_expiry_bounces_requiretls_mail_with_5_7_30(
    requiretls: bool, last: Reason, status: str
) -> None:
    outcome = expire_outcome(Deferred(last), requiretls)
    assert isinstance(outcome, Bounced)
    assert outcome.reason.status == status
    assert outcome.reason.hop == last.hop
    assert ("REQUIRETLS support required" in outcome.reason.text) is (status == "5.7.30")


@pytest.mark.parametrize(
    "outcome",
    [Delivered(Reason("ok", "2.0.0", "250 ok", HOP)), Bounced(Reason("no", "5.1.1", "550 no"))],
)
def test_expiry_leaves_final_outcomes_alone(outcome: Outcome) -> None:
    assert expire_outcome(outcome, True) is outcome
