"""The listener's per-connection protocol set-up is aiosmtpd's constructor, attribute for
attribute: relay/inbound/aiosmtpd_setup.init_smtp skips only the introspection, whose
results it keeps.

Each case builds the protocol object the listener builds for a connection twice, once with
the fast set-up and once with aiosmtpd's own constructor (FAST_INIT off), and compares
every instance attribute: plain values equal, bound methods bound to the same function
and the same role (the protocol itself or the shared handler), streams and futures of the
same kind, tables with the same keys in the same order and the same values (the fast
set-up's bind each value when it is looked up: aiosmtpd_setup.BoundMethods).
"""

from __future__ import annotations

import asyncio
import io
import logging
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd import smtp as aiosmtpd_smtp

from relay.config import load_config
from relay.events import EventLog
from relay.inbound import aiosmtpd_setup
from relay.inbound import session as smtp_session
from relay.inbound.aiosmtpd_setup import FAST_INIT
from relay.inbound.listener import Listener
from relay.inbound.session import RelaySMTP


class _Store:
    async def put(self, msg: object) -> str:
        raise AssertionError("not used")


def _listener(tmp: Path, *, tls: bool) -> Listener:
    environ = {
        "STS_RELAY_LISTEN_ADDRESSES": "127.0.0.1:0",
        "STS_RELAY_LISTEN_HOSTNAME": "relay.test",
        "STS_RELAY_STATE_PATH": str(tmp / "state"),
    }
    if tls:
        leaf = trustme.CA().issue_cert("relay.test")
        cert, key = tmp / "cert.pem", tmp / "key.pem"
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        environ |= {"STS_RELAY_TLS_CERT_FILE": str(cert), "STS_RELAY_TLS_KEY_FILE": str(key)}
    cfg = load_config(None, environ, fqdn=lambda: "relay.test")
    return Listener(cfg, store=_Store(), events=EventLog(io.StringIO()), on_queued=lambda: None)


def _comparable(value: Any, server: RelaySMTP, handler: object) -> Any:
    """A value with identities replaced by roles, so two set-ups can be compared."""
    if value is server:
        return "<server>"
    if value is handler:
        return "<handler>"
    if hasattr(value, "__func__") and hasattr(value, "__self__"):
        return ("bound", value.__func__, _comparable(value.__self__, server, handler))
    if isinstance(value, Mapping):  # aiosmtpd's dicts; aiosmtpd_setup.BoundMethods
        return {k: _comparable(v, server, handler) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_comparable(v, server, handler) for v in value)
    if isinstance(value, weakref.ref):
        return ("weakref", _comparable(value(), server, handler))
    if isinstance(value, asyncio.StreamReader):
        return ("reader", value._limit)  # type: ignore[attr-defined]
    if isinstance(value, asyncio.Future | asyncio.AbstractEventLoop):
        return type(value)
    return value


def _attributes(server: RelaySMTP) -> dict[str, Any]:
    handler = server.event_handler
    return {k: _comparable(v, server, handler) for k, v in vars(server).items()}


@pytest.mark.parametrize("implicit_tls", [False, True])
@pytest.mark.parametrize("tls", [False, True])
async def test_same_attributes_as_aiosmtpd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tls: bool, implicit_tls: bool
) -> None:
    listener = _listener(tmp_path, tls=tls)
    await listener.start()  # loads the certificate; no connection is made
    try:
        assert FAST_INIT, "aiosmtpd changed: review relay/inbound/aiosmtpd_setup.py"
        fast = listener._protocol(implicit_tls=implicit_tls)
        monkeypatch.setattr(smtp_session, "FAST_INIT", False)
        reference = listener._protocol(implicit_tls=implicit_tls)
    finally:
        await listener.stop()
    expected = _attributes(reference)
    assert _attributes(fast) == expected
    for table in ("_smtp_methods", "_handle_hooks", "_auth_methods"):  # keys in aiosmtpd's order
        assert list(getattr(fast, table)) == list(getattr(reference, table))
    assert set(expected["_smtp_methods"]) >= {"EHLO", "MAIL", "RCPT", "DATA", "AUTH", "QUIT"}
    assert set(expected["_auth_methods"]) == {"PLAIN", "LOGIN"}
    assert expected["_auth_require_tls"] is not implicit_tls
    assert (expected["tls_context"] is not None) is (tls and not implicit_tls)


def test_command_lines_are_logged_only_when_aiosmtpd_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # aiosmtpd's command loop calls the helper from its module: ours is the one it finds.
    assert aiosmtpd_smtp.sanitized_log is aiosmtpd_setup.sanitized_log
    log = logging.getLogger("mail.log")
    calls: list[tuple[object, ...]] = []
    with caplog.at_level(logging.WARNING, logger="mail.log"):
        aiosmtpd_setup.sanitized_log(log.info, "%r >> %r", ("127.0.0.1", 1), b"MAIL FROM:<a@b>")
        aiosmtpd_setup.sanitized_log(lambda *a: calls.append(a), "%r", b"AUTH PLAIN c2VjcmV0")
    assert caplog.records == []
    assert calls == [("%r", b"AUTH PLAIN ********")]  # not aiosmtpd's logger: aiosmtpd's helper
    with caplog.at_level(logging.DEBUG, logger="mail.log"):
        aiosmtpd_setup.sanitized_log(log.debug, "%r", b"AUTH PLAIN c2VjcmV0\r\n")
        aiosmtpd_setup.sanitized_log(log.info, "%r >> %r", ("127.0.0.1", 1), b"QUIT")
    assert [r.getMessage() for r in caplog.records] == [
        "b'AUTH PLAIN ********\\r\\n'",  # still sanitized by aiosmtpd's own helper
        "('127.0.0.1', 1) >> b'QUIT'",
    ]
