"""REQUIRETLS (RFC 8689 §2) at the listener, over real loopback sockets: offered and
accepted only inside TLS (after STARTTLS or on an implicit-TLS port), refused in cleartext
with 530 5.7.10, and kept with the message. IDs refer to /work/shared/RFC-CHECKLIST.md.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.integration.test_listener import MESSAGE, Client, running
from tests.integration.test_listener_auth import Pki, settings, tls_client

REFUSED_IN_CLEARTEXT = "530 5.7.10 REQUIRETLS is allowed only over TLS (STARTTLS first)"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text("")
    return path


async def test_cleartext_session_neither_offers_nor_accepts_requiretls(
    pki: Pki, users: Path
) -> None:
    # RTLS-02: no REQUIRETLS line before STARTTLS; the parameter is refused with 530 5.7.10.
    async with running(extra=settings(pki, users)) as lab, Client.connect(lab) as c:
        ehlo = await c.hello()
        assert "250-STARTTLS" in ehlo
        assert not any("REQUIRETLS" in line for line in ehlo)
        assert await c.cmd(b"MAIL FROM:<app@src.test> REQUIRETLS\r\n") == REFUSED_IN_CLEARTEXT
        # The transaction did not start: a plain MAIL is still the first one.
        assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n")).startswith("250")
    [event] = lab.events("rejected")
    assert (event["stage"], event["code"]) == ("mail", "530 5.7.10")
    assert lab.store.puts == []


async def test_after_starttls_requiretls_is_offered_and_kept_with_the_message(
    pki: Pki, users: Path
) -> None:
    async with running(extra=settings(pki, users)) as lab, tls_client(lab, pki) as c:
        assert "250-REQUIRETLS" in c.ehlo  # type: ignore[attr-defined]
        assert (await c.cmd(b"MAIL FROM:<app@src.test> REQUIRETLS\r\n")).startswith("250")
        assert (await c.cmd(b"RCPT TO:<u@d.test>\r\n")).startswith("250")
        assert (await c.cmd(b"DATA\r\n")).startswith("354")
        assert (await c.cmd(MESSAGE + b".\r\n")).startswith("250 2.0.0")
        # The next transaction on the same session starts without it.
        assert (await c.send("app@src.test", ["v@d.test"], MESSAGE)).startswith("250 2.0.0")
    first, second = lab.store.puts
    assert first.requiretls is True
    assert second.requiretls is False


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL FROM:<app@src.test> REQUIRETLS=yes\r\n", "501 5.5.4"),
        (b"MAIL FROM:<app@src.test> REQUIRETLS REQUIRETLS\r\n", "501 5.5.4"),
        (b"MAIL FROM:<app@src.test> requiretls RET=HDRS\r\n", "250"),
        (b"MAIL FROM:<> REQUIRETLS\r\n", "250"),
    ],
)
async def test_requiretls_syntax_inside_tls(pki: Pki, users: Path, line: bytes, reply: str) -> None:
    async with running(extra=settings(pki, users)) as lab, tls_client(lab, pki) as c:
        assert (await c.cmd(line)).startswith(reply + " ")


async def test_implicit_tls_port_offers_and_accepts_requiretls(pki: Pki, users: Path) -> None:
    env = settings(pki, users, listen_tls_addresses="127.0.0.1:0")
    async with running(extra=env) as lab:
        _plain, implicit = lab.listener.bound_addresses
        host, _, port = implicit.rpartition(":")
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(
                host, int(port), ssl=pki.client(), server_hostname="relay.test"
            )
        c = Client(reader, writer)
        try:
            assert "250-REQUIRETLS" in await c.hello()
            assert (await c.cmd(b"MAIL FROM:<app@src.test> REQUIRETLS\r\n")).startswith("250")
            assert (await c.cmd(b"RCPT TO:<u@d.test>\r\n")).startswith("250")
            assert (await c.cmd(b"DATA\r\n")).startswith("354")
            assert (await c.cmd(MESSAGE + b".\r\n")).startswith("250 2.0.0")
        finally:
            writer.close()
    [message] = lab.store.puts
    assert message.requiretls is True
