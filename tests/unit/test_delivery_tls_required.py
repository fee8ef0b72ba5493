"""Pure delivery logic: `TLS-Required: No` (RFC 8689 §5) in a message header.
IDs refer to /work/shared/RFC-CHECKLIST.md."""

from __future__ import annotations

import pytest

from relay.delivery.tls import tls_required_no


@pytest.mark.parametrize(
    ("message", "honoured"),
    [
        (b"Subject: x\r\nTLS-Required: No\r\n\r\nbody\r\n", True),  # RTLS-05
        (b"tls-required:no\r\n\r\n", True),
        (b"TLS-Required:\r\n  NO\r\nSubject: folded\r\n\r\n", True),
        (b"Subject: x\r\nTLS-Required: No\r\n", True),  # header only, no body
        (b"Subject: x\r\nTLS-Required: maybe\r\n\r\n", False),  # RTLS-06
        (b"Subject: x\r\nTLS-Required: No thanks\r\n\r\n", False),
        (b"TLS-Required: No\r\nTLS-Required: Yes\r\n\r\n", False),  # conflicting fields
        (b"Subject: x\r\n\r\nTLS-Required: No\r\n", False),  # in the body
        (b"\r\nTLS-Required: No\r\n", False),  # empty header: the line is body
        (b"Subject: TLS-Required: No\r\n\r\n", False),
        (b"X-TLS-Required: No\r\n\r\n", False),
    ],
)
def test_tls_required_no(message: bytes, honoured: bool) -> None:
    assert tls_required_no(message) is honoured
