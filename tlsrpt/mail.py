"""The report as an email (RFC 8460 §5.3): multipart/report; report-type="tlsrpt", a
human-readable part and the gzip'd JSON, with the TLS-Report-* header fields and
`TLS-Required: No` (RFC 8689 §5: reports must go out despite TLS failures), DKIM-signed
(RFC 8460 §3, RFC 6376) when a key is given.

Pure functions over bytes; signing uses dkimpy. Knows nothing of the queue or SMTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

# The MIME classes and dkimpy are imported when a report mail is built or a key checked:
# not in every process of the relay, for a job done once a day.

# RFC 8460 §3: the TLS-Report-* fields SHOULD be signed; the usual identity fields too.
SIGNED_HEADERS = (
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
    b"tls-report-domain",
    b"tls-report-submitter",
    b"tls-required",
)


class DkimError(ValueError):
    """The key cannot sign (unreadable, not a PKCS#1 RSA key, too weak)."""


@dataclass(frozen=True, slots=True)
class DkimKey:
    selector: str
    domain: str
    private_key: bytes  # PEM, PKCS#1 ("BEGIN RSA PRIVATE KEY")


@dataclass(frozen=True, slots=True)
class ReportMail:
    """Who a report mail is from and to, and what it carries."""

    sender: str  # From: and the envelope sender
    recipient: str
    domain: str  # the Policy Domain (TLS-Report-Domain)
    submitter: str  # TLS-Report-Submitter: the domain of contact-info
    report_id: str
    filename: str
    payload: bytes  # gzip'd JSON


def build_mail(mail: ReportMail, *, now: datetime, dkim_key: DkimKey | None) -> bytes:
    """The RFC 5322 message, CRLF line ends, signed first if `dkim_key` is given."""
    import email.policy
    import email.utils
    from email.mime.application import MIMEApplication
    from email.mime.multipart import MIMEMultipart
    from email.mime.text import MIMEText

    msg = MIMEMultipart("report", report_type="tlsrpt")
    msg["From"] = mail.sender
    msg["To"] = mail.recipient
    # RFC 8460 §5.3 SHOULD: this exact Subject shape.
    msg["Subject"] = (
        f"Report Domain: {mail.domain} Submitter: {mail.submitter} Report-ID: <{mail.report_id}>"
    )
    msg["Date"] = email.utils.format_datetime(now)
    msg["Message-ID"] = email.utils.make_msgid(domain=mail.submitter)
    msg["TLS-Report-Domain"] = mail.domain
    msg["TLS-Report-Submitter"] = mail.submitter
    msg["TLS-Required"] = "No"
    msg.preamble = "This is a multipart message in MIME format."
    text = (
        f"This is an aggregate TLS report (RFC 8460) from {mail.submitter} "
        f"for {mail.domain}.\r\nReport-ID: {mail.report_id}\r\n"
    )
    msg.attach(MIMEText(text, "plain", "us-ascii"))
    attachment = MIMEApplication(mail.payload, "tlsrpt+gzip")
    attachment.add_header("Content-Disposition", "attachment", filename=mail.filename)
    msg.attach(attachment)
    data = msg.as_bytes(policy=email.policy.SMTP)
    if dkim_key is None:
        return data
    return sign(data, dkim_key)


def sign(data: bytes, key: DkimKey) -> bytes:
    """Prepend an rsa-sha256 DKIM-Signature (relaxed/simple, no l= tag: RFC 8460 §3)."""
    import dkim  # type: ignore[import-untyped]
    import dkim.asn1  # type: ignore[import-untyped]
    import dkim.crypto  # type: ignore[import-untyped]

    try:
        header: bytes = dkim.sign(
            data,
            key.selector.encode("ascii"),
            key.domain.encode("ascii"),
            key.private_key,
            include_headers=list(SIGNED_HEADERS),
            length=False,
            tlsrpt=True,
        )
    except (
        dkim.DKIMException,
        dkim.asn1.ASN1FormatError,
        dkim.crypto.UnparsableKeyError,
        dkim.crypto.DigestTooLargeError,
        ValueError,
        IndexError,
        TypeError,
    ) as exc:
        raise DkimError(f"DKIM signing failed: {exc}") from exc
    return header + data


def check_key(key: DkimKey) -> None:
    """Sign a throwaway message, so a bad key is found at start, not at midnight."""
    sign(b"From: a@b.test\r\nSubject: key check\r\n\r\nx\r\n", key)
