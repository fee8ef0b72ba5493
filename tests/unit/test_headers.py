"""relay.inbound.headers: Received, loops, missing Date/Message-ID, bare CR/LF.

RFC-CHECKLIST SMTP-16/17, SMUG-01/02.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.inbound.headers import (
    add_missing_headers,
    count_received,
    has_bare_cr_or_lf,
    header_end,
    received_header,
)

NOW = datetime(2026, 3, 1, 12, 30, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("data", "bare"),
    [
        (b"", False),
        (b"a\r\nb\r\n", False),
        (b"\r\n\r\n", False),
        (b"line1\nline2\r\n", True),
        (b"line1\rline2\r\n", True),
        (b"\n", True),
        (b"\r", True),
        (b"x\r\r\n", True),
        (b"x\r\n\n", True),
        (b"\n\r", True),
        (b"Testing\n.\r\nMAIL FROM:<x@evil.test>\r\n", True),
    ],
)
def test_has_bare_cr_or_lf(data: bytes, bare: bool) -> None:
    assert has_bare_cr_or_lf(data) is bare


def _reference_bare(data: bytes) -> bool:
    for i, byte in enumerate(data):
        if byte == 0x0D and data[i + 1 : i + 2] != b"\n":
            return True
        if byte == 0x0A and (i == 0 or data[i - 1] != 0x0D):
            return True
    return False


@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b".", b" "]), max_size=40))
def test_has_bare_cr_or_lf_matches_reference(parts: list[bytes]) -> None:
    data = b"".join(parts)
    assert has_bare_cr_or_lf(data) is _reference_bare(data)


@pytest.mark.parametrize(
    ("data", "count"),
    [
        (b"Subject: x\r\n\r\nReceived: in body\r\n", 0),
        (b"Received: a\r\nReceived: b\r\n\r\nbody\r\n", 2),
        (b"received : a\r\nRECEIVED:b\r\n\tReceived: folded\r\n\r\n", 2),
        (b"X-Received: a\r\nReceived: b\r\n", 1),
        (b"Received: a\r\nnot a header line\r\nReceived: b\r\n", 1),
        (b"Received: x\r\n" * 101 + b"\r\nbody\r\n", 101),
    ],
)
def test_count_received(data: bytes, count: int) -> None:
    assert count_received(data) == count


@pytest.mark.parametrize(
    ("data", "end"),
    [
        (b"", 0),
        (b"A: 1\r\n\r\nbody", 6),
        (b"A: 1\r\n b\r\nC: 2\r\n\r\n", 16),
        (b"A: 1", 4),
        (b"body only\r\n", 0),
        (b" leading space: no\r\n", 0),
        (b"A: 1\r\nFrom nobody\r\n", 6),
    ],
)
def test_header_end(data: bytes, end: int) -> None:
    assert header_end(data) == end


def test_received_header_shape() -> None:
    field = received_header(
        client_ip="192.0.2.7",
        helo="app.example.test",
        by_host="relay.example.test",
        queue_id="ABC123",
        tls=None,
        when=NOW,
        for_rcpt="u@d.test",
    )
    assert field == (
        b"Received: from app.example.test ([192.0.2.7])\r\n"
        b"\tby relay.example.test (sts-relay) with ESMTP id ABC123\r\n"
        b"\tfor <u@d.test>; Sun, 01 Mar 2026 12:30:05 +0000\r\n"
    )


def test_received_header_ipv6_tls_and_hostile_helo() -> None:
    field = received_header(
        client_ip="::1",
        helo="evil\r\nX-Injected: 1 (x)",
        by_host="relay.test",
        queue_id="Q",
        tls="TLSv1.3",
        when=datetime(2026, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))),
        for_rcpt=None,
    )
    lines = field.split(b"\r\n")
    assert lines[0] == b"Received: from evil??X-Injected:?1??x? ([IPv6:::1])"
    assert b"with ESMTPS id Q" in lines[1]
    assert lines[2] == b"\t(using TLSv1.3); Sun, 01 Mar 2026 14:00:00 +0200"
    assert field.count(b"\r\n") == 3
    assert field.endswith(b"\r\n")
    assert not has_bare_cr_or_lf(field)


def test_received_header_needs_aware_time() -> None:
    naive = datetime(2026, 1, 1)  # noqa: DTZ001 - the point of the test
    with pytest.raises(ValueError, match="aware"):
        received_header(
            client_ip="127.0.0.1",
            helo="h",
            by_host="b",
            queue_id="q",
            tls=None,
            when=naive,
            for_rcpt=None,
        )


RECEIVED = b"Received: from x ([127.0.0.1])\r\n\tby r; Sun, 01 Mar 2026 12:30:05 +0000\r\n"


def stamp(data: bytes) -> tuple[bytes, str | None]:
    return add_missing_headers(
        data, hostname="relay.test", now=NOW, queue_id="QID", received=RECEIVED
    )


def test_adds_date_and_message_id_when_missing() -> None:
    out, message_id = stamp(b"Subject: hi\r\nReceived: old\r\n\r\nbody\r\n")
    assert message_id is not None
    assert message_id.startswith("<QID.")
    assert message_id.endswith("@relay.test>")
    assert out == (
        RECEIVED
        + b"Subject: hi\r\nReceived: old\r\n"
        + b"Date: Sun, 01 Mar 2026 12:30:05 +0000\r\n"
        + b"Message-ID: "
        + message_id.encode()
        + b"\r\n\r\nbody\r\n"
    )


def test_leaves_existing_date_and_message_id_alone() -> None:
    data = b"Date: Mon, 2 Feb 2026 00:00:00 +0000\r\nMessage-Id:\r\n <abc@app.test>\r\n\r\nb\r\n"
    out, message_id = stamp(data)
    assert out == RECEIVED + data
    assert message_id == "<abc@app.test>"


def test_headers_only_and_body_only_messages() -> None:
    out, _ = stamp(b"Subject: x")
    assert out.startswith(RECEIVED + b"Subject: x\r\nDate: ")
    out, _ = stamp(b"just a body line\r\n")
    assert out.startswith(RECEIVED + b"Date: ")
    assert out.endswith(b"\r\n\r\njust a body line\r\n")
    out, _ = stamp(b"")
    assert out.startswith(RECEIVED + b"Date: ")
    assert out.endswith(b"\r\n\r\n")


def test_resent_fields_do_not_count_as_date_or_message_id() -> None:
    out, message_id = stamp(b"Resent-Date: x\r\nResent-Message-ID: <r@x>\r\n\r\n")
    assert b"\r\nDate: " in out
    assert b"\r\nMessage-ID: " in out
    assert message_id != "<r@x>"


_lines = st.lists(
    st.sampled_from(
        [
            b"Subject: s",
            b"Date: Sun, 01 Mar 2026 00:00:00 +0000",
            b"Message-ID: <m@a.test>",
            b"Received: r",
            b" folded",
            b"",
            b"body text",
            b"X: \xc3\xa9",
        ]
    ),
    max_size=12,
)


@given(_lines, st.booleans())
def test_existing_bytes_never_change(lines: list[bytes], final_crlf: bool) -> None:
    data = b"\r\n".join(lines) + (b"\r\n" if final_crlf else b"")
    out, message_id = stamp(data)
    assert message_id is not None
    assert out.startswith(RECEIVED)
    rest = out[len(RECEIVED) :]
    # The original survives whole, with at most one run of added bytes inside it.
    k = 0
    while k < len(data) and k < len(rest) and data[k] == rest[k]:
        k += 1
    inserted = len(rest) - len(data)
    assert inserted >= 0
    assert rest[k + inserted :] == data[k:]
    added = rest[k : k + inserted]
    for line in added.split(b"\r\n"):
        assert line == b"" or line.startswith((b"Date: ", b"Message-ID: ")), added
    assert count_received(out) == count_received(data) + 1
