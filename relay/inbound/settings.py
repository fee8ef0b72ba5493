"""What every session of a listener is set up with: one frozen SessionSettings, shared.

Owns the per-session settings relay/inbound/listener.py builds from the config and each
layer of the session reads (relay/inbound/session.RelaySMTP ties the layers together):
timeouts and lifetime (relay/inbound/lifetime.py), the error limit
(relay/inbound/replies.py), whether MAIL needs AUTH (relay/inbound/envelope.py), and the
AUTH service (relay/inbound/auth.py). Knows nothing of SMTP.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.inbound.auth import AuthService


@dataclass(frozen=True)
class SessionSettings:
    data_timeout: float
    max_errors: int
    auth_required: bool  # every client must AUTH before MAIL, trusted networks included
    auth: AuthService
    untrusted_timeout: float = 30.0  # an untrusted client not authenticated by then is closed
    max_session_time: float = 3600.0  # every session is closed after this many seconds
    implicit_tls: bool = False  # the whole connection is TLS (port 465)
