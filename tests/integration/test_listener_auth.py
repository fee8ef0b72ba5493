"""Inbound TLS and SMTP AUTH on the listener, over real loopback sockets; the users file and
`sts-relay user add|remove|list`.

Covers issue 5 items 1 and 2: AUTH (PLAIN, LOGIN) only under TLS (after STARTTLS or on an
implicit-TLS port), checked against the scrypt users file; failed logins rate-limited per
address and logged; authenticated clients relay from anywhere; `auth.required`; the
certificate reloaded by `Listener.reload_tls()` (SIGHUP).
"""

from __future__ import annotations

import asyncio
import base64
import os
import sqlite3
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiosmtplib
import pytest
import trustme

from relay.inbound.tls import ServerTlsError
from relay.state import DB_NAME
from relay.users import check_password, hash_password, read_users, write_users
from tests.integration.test_listener import MESSAGE, Client, Lab, running

PASSWORD = "correct horse battery staple"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def auth_plain(user: str, password: str, authzid: str = "") -> bytes:
    """An `AUTH PLAIN <initial response>` command line (RFC 4616)."""
    blob = f"{authzid}\x00{user}\x00{password}".encode()
    return b"AUTH PLAIN " + b64(blob).encode() + b"\r\n"


class Pki:
    """A throwaway CA and the listener's certificate files."""

    def __init__(self, tmp: Path) -> None:
        self.ca = trustme.CA()
        self.cert_file = tmp / "relay-cert.pem"
        self.key_file = tmp / "relay-key.pem"
        self.issue("relay.test")

    def issue(self, name: str) -> None:
        leaf = self.ca.issue_cert(name)
        self.cert_file.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        self.key_file.write_bytes(leaf.private_key_pem.bytes())

    def client(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    # A cheap cost for tests: the parameters are stored with each hash.
    write_users(path, {"alice": hash_password(PASSWORD, log2_n=10)})
    return path


def settings(pki: Pki, users: Path, **extra: str) -> dict[str, str]:
    env = {
        "STS_RELAY_TLS_CERT_FILE": str(pki.cert_file),
        "STS_RELAY_TLS_KEY_FILE": str(pki.key_file),
        "STS_RELAY_AUTH_USERS_FILE": str(users),
    }
    env.update({f"STS_RELAY_{k.upper()}": v for k, v in extra.items()})
    return env


@asynccontextmanager
async def tls_client(lab: Lab, pki: Pki) -> AsyncIterator[Client]:
    """A raw client after STARTTLS and a second EHLO; yields the EHLO reply on `.ehlo`."""
    async with Client.connect(lab) as c:
        before = await c.hello()
        assert "250-STARTTLS" in before
        assert not any("AUTH" in line for line in before)
        assert (await c.cmd(b"STARTTLS\r\n")).startswith("220")
        await c.writer.start_tls(pki.client(), server_hostname="relay.test")
        c.writer.write(b"EHLO app.example.test\r\n")
        c.ehlo = await c.reply()  # type: ignore[attr-defined]
        yield c


async def test_auth_is_never_offered_or_accepted_in_cleartext(pki: Pki, users: Path) -> None:
    async with running(extra=settings(pki, users)) as lab, Client.connect(lab) as c:
        ehlo = await c.hello()
        assert "250-STARTTLS" in ehlo
        assert not any("AUTH" in line for line in ehlo)
        line = auth_plain("alice", PASSWORD)
        assert await c.cmd(line) == (
            "538 5.7.11 Encryption required for requested authentication mechanism"
        )
    assert lab.events("authenticated") == []


async def test_no_starttls_and_no_auth_without_a_certificate(users: Path) -> None:
    env = {"STS_RELAY_AUTH_USERS_FILE": str(users)}
    async with running(extra=env) as lab, Client.connect(lab) as c:
        ehlo = await c.hello()
        assert not any("STARTTLS" in line or "AUTH" in line for line in ehlo)
        assert (await c.cmd(b"STARTTLS\r\n"))[:3] in ("454", "500", "502")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_authenticated_client_relays_from_an_untrusted_address(
    pki: Pki, users: Path, mechanism: str
) -> None:
    env = settings(pki, users)
    async with (
        running(extra=env, trusted_networks="10.0.0.0/8") as lab,
        tls_client(lab, pki) as c,
    ):
        assert "250-AUTH LOGIN PLAIN" in c.ehlo  # type: ignore[attr-defined]
        assert "250-DSN" in c.ehlo  # type: ignore[attr-defined]
        assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n"))[:3] == "250"
        assert (await c.cmd(b"RCPT TO:<u@d.test>\r\n")) == "554 5.7.1 Relay access denied"
        assert (await c.cmd(b"RSET\r\n"))[:3] == "250"
        if mechanism == "PLAIN":
            line = auth_plain("alice", PASSWORD)
            assert await c.cmd(line) == "235 2.7.0 Authentication successful"
        else:
            assert await c.cmd(b"AUTH LOGIN\r\n") == "334 " + b64(b"Username:")
            assert await c.cmd(b64(b"alice").encode() + b"\r\n") == "334 " + b64(b"Password:")
            reply = await c.cmd(b64(PASSWORD.encode()).encode() + b"\r\n")
            assert reply == "235 2.7.0 Authentication successful"
        assert (await c.send("app@src.test", ["u@d.test"], MESSAGE)).startswith("250 2.0.0")
    [msg] = lab.store.puts
    assert msg.recipients == ("u@d.test",)
    head = msg.data.split(b"\r\n\r\n")[0]
    assert b" with ESMTPS id " in head
    assert b"(using TLSv1." in head
    [event] = lab.events("authenticated")
    assert (event["user"], event["mechanism"], event["client"]) == (
        "alice",
        mechanism,
        "127.0.0.1",
    )


async def test_aiosmtplib_login_and_send(pki: Pki, users: Path) -> None:
    # An ordinary client library: STARTTLS, login, send.
    env = settings(pki, users)
    async with running(extra=env, trusted_networks="10.0.0.0/8") as lab:
        host, port = lab.address
        client = aiosmtplib.SMTP(
            hostname=host, port=port, start_tls=False, tls_context=pki.client(), timeout=10
        )
        async with client:
            await client.starttls(server_hostname="relay.test")
            await client.login("alice", PASSWORD)
            await client.sendmail("app@src.test", ["u@d.test"], MESSAGE)
    assert lab.store.puts[0].recipients == ("u@d.test",)


async def test_failed_logins_are_refused_logged_and_rate_limited(pki: Pki, users: Path) -> None:
    env = settings(pki, users, auth_max_failures="3")
    good = auth_plain("alice", PASSWORD)
    async with running(extra=env) as lab:
        async with tls_client(lab, pki) as c:
            bad = auth_plain("alice", "wrong")
            assert await c.cmd(bad) == "535 5.7.8 Authentication credentials invalid"
            unknown = auth_plain("mallory", PASSWORD)
            assert await c.cmd(unknown) == "535 5.7.8 Authentication credentials invalid"
            locked = "454 4.7.0 Too many failed authentication attempts, try again later"
            assert await c.cmd(bad) == locked
            # Now even the right password is not checked, in this session or a new one.
            assert await c.cmd(good) == locked
        async with tls_client(lab, pki) as again:
            assert await again.cmd(good) == locked
    failed = lab.events("auth_failed")
    assert [e["reason"] for e in failed] == ["bad credentials"] * 3 + ["rate limited"] * 2
    assert [e["user"] for e in failed[:3]] == ["alice", "mallory", "alice"]
    assert all(e["client"] == "127.0.0.1" and e["level"] == "warning" for e in failed)
    assert lab.events("authenticated") == []


@pytest.mark.parametrize(
    ("lines", "reply"),
    [
        ([b"AUTH PLAIN !!!notbase64\r\n"], "501 5.5.2"),
        ([b"AUTH PLAIN " + b64(b"no-nul-here").encode() + b"\r\n"], "501 5.5.2"),
        ([b"AUTH PLAIN " + b64(b"bob\x00alice\x00x").encode() + b"\r\n"], "535 5.7.8"),
        ([b"AUTH PLAIN\r\n", b"*\r\n"], "501 5.7.0"),
        ([b"AUTH CRAM-MD5\r\n"], "504 5.5.4"),
        ([b"AUTH LOGIN\r\n", b"*\r\n"], "501 5.7.0"),
    ],
)
async def test_malformed_auth_exchanges(
    pki: Pki, users: Path, lines: list[bytes], reply: str
) -> None:
    async with running(extra=settings(pki, users)) as lab, tls_client(lab, pki) as c:
        for line in lines[:-1]:
            assert (await c.cmd(line)).startswith("334 ")
        assert (await c.cmd(lines[-1])).startswith(reply + " ")
        # The session is still usable.
        assert (await c.cmd(b"NOOP\r\n"))[:3] == "250"
    assert lab.events("session_error") == []


async def test_auth_required_applies_to_trusted_clients_too(pki: Pki, users: Path) -> None:
    env = settings(pki, users, auth_required="true")
    async with running(extra=env) as lab:
        async with Client.connect(lab) as plain:
            await plain.hello()
            assert await plain.cmd(b"MAIL FROM:<app@src.test>\r\n") == (
                "530 5.7.0 Authentication required"
            )
        async with tls_client(lab, pki) as c:
            assert (await c.cmd(b"MAIL FROM:<app@src.test>\r\n"))[:3] == "530"
            line = auth_plain("alice", PASSWORD)
            assert (await c.cmd(line))[:3] == "235"
            assert (await c.send("app@src.test", ["u@d.test"], MESSAGE)).startswith("250 2.0.0")
    assert len(lab.store.puts) == 1


async def test_implicit_tls_port_offers_auth_from_the_start(pki: Pki, users: Path) -> None:
    env = settings(pki, users, listen_tls_addresses="127.0.0.1:0")
    async with running(extra=env, trusted_networks="10.0.0.0/8") as lab:
        _plain, implicit = lab.listener.bound_addresses
        host, _, port = implicit.rpartition(":")
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(
                host, int(port), ssl=pki.client(), server_hostname="relay.test"
            )
        c = Client(reader, writer)
        try:
            ehlo = await c.hello()
            assert "250-AUTH LOGIN PLAIN" in ehlo
            assert not any("STARTTLS" in line for line in ehlo)
            line = auth_plain("alice", PASSWORD)
            assert (await c.cmd(line))[:3] == "235"
            assert (await c.send("app@src.test", ["u@d.test"], MESSAGE)).startswith("250 2.0.0")
        finally:
            writer.close()
    assert b"(using TLSv1." in lab.store.puts[0].data.split(b"\r\n\r\n")[0]


async def test_tls_addresses_need_a_certificate() -> None:
    from relay.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"listen\.tls_addresses"):
        load_config(None, {"STS_RELAY_LISTEN_TLS_ADDRESSES": "127.0.0.1:465"})


async def _peer_names(lab: Lab, pki: Pki) -> list[str]:
    async with tls_client(lab, pki) as c:
        ssl_obj = c.writer.get_extra_info("ssl_object")
        cert = ssl_obj.getpeercert()
        return [value for kind, value in cert["subjectAltName"] if kind == "DNS"]


async def test_reload_tls_serves_the_new_certificate(pki: Pki, users: Path) -> None:
    async with running(extra=settings(pki, users)) as lab:
        assert await _peer_names(lab, pki) == ["relay.test"]
        old_key = pki.key_file.read_bytes()
        # A new certificate naming a second host too: visible only after the reload.
        leaf = pki.ca.issue_cert("relay.test", "smtp.relay.test")
        pki.cert_file.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        pki.key_file.write_bytes(leaf.private_key_pem.bytes())
        assert old_key != pki.key_file.read_bytes()
        lab.listener.reload_tls()
        assert await _peer_names(lab, pki) == ["relay.test", "smtp.relay.test"]
        # A broken file is refused and the certificate in use stays.
        pki.key_file.write_bytes(b"not a key")
        with pytest.raises(ServerTlsError):
            lab.listener.reload_tls()
        assert await _peer_names(lab, pki) == ["relay.test", "smtp.relay.test"]


# --- the users file and `sts-relay user` ---


def test_hash_stores_its_parameters_and_a_fresh_salt() -> None:
    one, two = hash_password("pw", log2_n=10), hash_password("pw", log2_n=10)
    assert one.startswith("scrypt$10$8$1$")
    assert one != two  # salted
    assert check_password(b"pw", one)
    assert not check_password(b"pW", one)
    assert not check_password(b"pw", "scrypt$99$8$1$AAAA$AAAA")  # absurd cost refused
    assert not check_password(b"pw", "plain:pw")


def _user_cmd(state: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STS_RELAY_")}
    env["STS_RELAY_STATE_PATH"] = str(state)
    return subprocess.run(  # noqa: S603 - our own command, fixed arguments
        [sys.executable, "-m", "relay", "user", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _served(state: Path) -> Path:
    """`state` as `serve` leaves it: the user commands never create a store."""
    state.mkdir(parents=True, exist_ok=True)
    sqlite3.connect(state / DB_NAME).close()
    return state


def test_user_add_list_remove(tmp_path: Path) -> None:
    state = tmp_path / "state"
    refused = _user_cmd(state, "add", "alice", stdin="s3cret\n")
    assert refused.returncode == 1
    assert f"no sts-relay state at {state}" in refused.stderr
    assert not state.exists()
    _served(state)
    added = _user_cmd(state, "add", "alice", stdin="s3cret\n")
    assert added.returncode == 0, added.stderr
    assert "s3cret" not in added.stdout + added.stderr
    path = state / "users"
    assert path.stat().st_mode & 0o777 == 0o600
    stored = read_users(path)
    assert list(stored) == ["alice"]
    assert "s3cret" not in path.read_text()
    assert check_password(b"s3cret", stored["alice"])

    assert _user_cmd(state, "add", "bob", stdin="other\n").returncode == 0
    assert _user_cmd(state, "add", "alice", stdin="changed\n").returncode == 0
    assert check_password(b"changed", read_users(path)["alice"])
    listed = _user_cmd(state, "list")
    assert listed.stdout.split() == ["alice", "bob"]
    assert _user_cmd(state, "list", "--json").stdout.replace(" ", "").split() == [
        "[",
        '"alice",',
        '"bob"',
        "]",
    ]
    assert _user_cmd(state, "remove", "alice").returncode == 0
    assert list(read_users(path)) == ["bob"]
    missing = _user_cmd(state, "remove", "alice")
    assert missing.returncode == 1
    assert "no user" in missing.stderr


@pytest.mark.parametrize(("name", "stdin"), [("bad:name", "pw\n"), ("alice", "\n")])
def test_user_add_refuses_bad_input(tmp_path: Path, name: str, stdin: str) -> None:
    result = _user_cmd(_served(tmp_path), "add", name, stdin=stdin)
    assert result.returncode == 2
    assert not (tmp_path / "users").exists()


async def test_a_user_added_while_running_can_log_in(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "later-users"
    async with running(extra=settings(pki, path)) as lab:
        async with tls_client(lab, pki) as c:
            line = auth_plain("carol", "pw")
            assert (await c.cmd(line))[:3] == "535"
        write_users(path, {"carol": hash_password("pw", log2_n=10)})
        async with tls_client(lab, pki) as c:
            assert (await c.cmd(line))[:3] == "235"
