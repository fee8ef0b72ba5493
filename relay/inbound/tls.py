"""The listener's own TLS: the server context for STARTTLS and implicit TLS, and its reload.

Owns building a server SSLContext from the configured certificate and key (TLS 1.2 or
newer, no client certificates asked for) and swapping in a new one on reload without
restarting listeners: every connection starts with one stable front context whose SNI
callback (called by OpenSSL for every ClientHello, SNI or not) moves the handshake onto the
newest context. Connections already established keep the certificate they began with.
Knows nothing of SMTP.
"""

from __future__ import annotations

import ssl
from typing import Any


class ServerTlsError(OSError):
    """The certificate or key could not be loaded; the message says which file and why."""


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for `cert_file` (PEM chain) and `key_file`; raises ServerTlsError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ServerTlsError(f"{cert_file} / {key_file}: {exc}") from None
    return ctx


class ServerTls:
    """The current server context, reloadable; `front` is what listeners are given."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.front = server_context(cert_file, key_file)
        self._current = self.front
        self.front.sni_callback = self._switch

    def _switch(self, ssl_obj: Any, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
        if self._current is not self.front:
            ssl_obj.context = self._current

    def reload(self) -> None:
        """Load the files again; new handshakes use them. On error the old context stays."""
        self._current = server_context(self.cert_file, self.key_file)
