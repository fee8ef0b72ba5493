"""Library internals pinned: what relay/ reads or overrides inside aiosmtpd.

pyproject.toml pins aiosmtpd to the one release tested; the first tests fail when the
installed release is another or the pin lets an untested one in. The rest fail when an
internal relay/ relies on moves or changes shape, checked on real objects. (Delivery speaks
SMTP through its own wire, relay/delivery/smtp_wire.py; aiosmtplib serves only
`sts-relay policy probe`, through its public API.)

- aiosmtpd (relay/inbound/session.py and the layers of RelaySMTP: auth.py,
  command_loop.py, replies.py, lifetime.py, envelope.py; aiosmtpd_setup.py): the private
  methods RelaySMTP overrides or calls, with their signatures; the attributes it reads, on a
  connected aiosmtpd SMTP built by aiosmtpd's own constructor; the module-level names
  those modules use; how aiosmtpd uses the reader RelaySMTP gives it
  (relay/inbound/lines.SessionReader). That constructor is compared attribute for attribute
  with aiosmtpd_setup.init_smtp by tests/unit/test_aiosmtpd_setup.py (not repeated here).
  RelaySMTP transcribes some of this release's code: its command loop
  (command_loop.CommandLoop._serve, from `_handle_client`), `connection_made`
  (lifetime.SessionLifetime), the plain MAIL/RCPT answers (envelope.EnvelopeCommands
  `_plain_mail`, `_plain_rcpt`, from `smtp_MAIL`/`smtp_RCPT`) and `_data` (session.py,
  from `smtp_DATA`); the version pin ties them to it, and the source of each is pinned too
  (a patched install fails).
- asyncio (relay/inbound/command_loop.py, lines.py): RelaySMTP, an asyncio
  StreamReaderProtocol, takes what a connection delivers in its own `data_received`
  (StreamReaderProtocol's only feeds the StreamReader, which aiosmtpd does not override),
  and skips `drain()` when it would return at once, read from FlowControlMixin's `_paused`
  and `_connection_lost` (CommandLoop._drain_waits): checked on a real connection.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import importlib.metadata
import inspect
import tomllib
from pathlib import Path

import aiosmtpd
import attr
import pytest
from aiosmtpd import smtp as aiosmtpd_smtp
from packaging.requirements import Requirement
from packaging.version import Version

from relay.inbound.aiosmtpd_setup import FAST_INIT
from relay.inbound.session import RelaySMTP
from tests.support.waiting import eventually

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
PINNED = ("aiosmtpd",)


# --- the pins ---------------------------------------------------------------------------


def _pin(name: str) -> Requirement:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    (requirement,) = (
        r for r in map(Requirement, project["dependencies"]) if r.name.lower() == name
    )
    return requirement


@pytest.mark.parametrize("name", PINNED)
def test_installed_release_is_the_pinned_one(name: str) -> None:
    installed = Version(importlib.metadata.version(name))
    specifier = _pin(name).specifier
    assert installed in specifier, f"{name} {installed} is not the release pinned: {specifier}"
    # The pin admits this release and no other: not an older one, not the next bug fix.
    lower = [Version(s.version) for s in specifier if s.operator == ">="]
    assert lower == [installed], f"{name}: lower bound must be the tested release"
    following = Version(f"{installed.major}.{installed.minor}.{installed.micro + 1}")
    assert following not in specifier, f"{name}: the pin lets an untested release in"


def test_aiosmtpd_module_version_is_the_installed_one() -> None:
    # aiosmtpd_setup.FAST_INIT compares aiosmtpd.__version__ (test_aiosmtpd_setup.py asserts
    # it is on); the two must name the same release.
    assert aiosmtpd.__version__ == importlib.metadata.version("aiosmtpd")
    assert FAST_INIT


# --- aiosmtpd ------------------------------------------------------------------------------

# (method of aiosmtpd.smtp.SMTP, its parameters, async?) that relay/inbound overrides or
# calls: RelaySMTP's overrides must keep being called, with these arguments.
AIOSMTPD_METHODS = [
    ("_cb_client_connected", ["self", "reader", "writer"], False),  # SessionReader
    ("_reset_timeout", ["self", "duration"], False),  # one moving timer
    ("_timeout_cb", ["self"], False),  # 421 before closing
    ("_create_envelope", ["self"], False),  # RelayEnvelope
    ("_create_session", ["self"], False),  # connection_made
    ("_set_rset_state", ["self"], False),  # connection_made
    ("_getaddr", ["self", "arg"], False),  # the fast path for plain addresses
    ("_call_handler_hook", ["self", "command", "args"], True),  # hooks
    ("_set_post_data_state", ["self"], False),  # after our own DATA phase
    ("_handle_client", ["self"], True),  # replaced by CommandLoop._serve (see below)
    ("check_helo_needed", ["self", "helo"], True),
    ("check_auth_needed", ["self", "caller_method"], True),
    ("challenge_auth", ["self", "challenge", "encode_to_b64", "log_client_response"], True),
    ("handle_exception", ["self", "error"], True),
    ("push", ["self", "status"], True),
    ("smtp_AUTH", ["self", "arg"], True),
    ("smtp_MAIL", ["self", "arg"], True),
    ("smtp_RCPT", ["self", "arg"], True),
    ("smtp_DATA", ["self", "arg"], True),
    ("smtp_EHLO", ["self", "hostname"], True),  # its reply written at once
    ("connection_made", ["self", "transport"], False),
    ("connection_lost", ["self", "error"], False),
    ("eof_received", ["self"], False),
]


@pytest.mark.parametrize(
    ("name", "parameters", "is_async"), AIOSMTPD_METHODS, ids=[m[0] for m in AIOSMTPD_METHODS]
)
def test_aiosmtpd_methods_relay_overrides_or_calls(
    name: str, parameters: list[str], is_async: bool
) -> None:
    method = getattr(aiosmtpd_smtp.SMTP, name)
    assert list(inspect.signature(method).parameters) == parameters
    assert inspect.iscoroutinefunction(method) is is_async


# SHA-256 (first 16 hex digits) of the source of what RelaySMTP's modules (relay/inbound/)
# transcribe: when one changes, read our copy against it again.
AIOSMTPD_TRANSCRIBED = {
    "_handle_client": "0e4d096403af6c74",  # command_loop.CommandLoop._serve, _answer_exception
    "connection_made": "77a45df5065bba34",  # lifetime.SessionLifetime.connection_made
    "smtp_MAIL": "80dd938e7791acfb",  # envelope.EnvelopeCommands._plain_mail
    "smtp_RCPT": "a0d6605883c0e608",  # envelope.EnvelopeCommands._plain_rcpt
    "smtp_DATA": "3a33f30d3fd6d02f",  # session.RelaySMTP._data
    "push": "15f4f1de5e30c337",  # command_loop.CommandLoop._put
    "smtp_EHLO": "1d91592dd954c4cd",  # pushes its lines one by one (CommandLoop.smtp_EHLO)
    "_call_handler_hook": "6ff23a6634ea0307",  # _plain_mail and _plain_rcpt call hooks so
}


@pytest.mark.parametrize("name", AIOSMTPD_TRANSCRIBED)
def test_aiosmtpd_code_transcribed_is_unchanged(name: str) -> None:
    source = inspect.getsource(getattr(aiosmtpd_smtp.SMTP, name))
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == AIOSMTPD_TRANSCRIBED[name]


def test_aiosmtpd_uses_the_reader_as_session_reader_serves_it() -> None:
    # AUTH answers: read with readline() (SessionReader.readline, StreamReader's semantics).
    assert "line = await self._reader.readline()" in inspect.getsource(
        aiosmtpd_smtp.SMTP.challenge_auth
    )
    # STARTTLS: the reader's transport is set and its buffer cleared (SessionReader takes
    # `_transport`; RelaySMTP.connection_made drops what SessionReader holds).
    source = inspect.getsource(aiosmtpd_smtp.SMTP.connection_made)
    assert "self._reader._transport = transport" in source
    assert "self._reader._buffer.clear()" in source
    # No other use of the reader, but in what RelaySMTP replaces.
    reads = {
        name
        for name, member in inspect.getmembers(aiosmtpd_smtp.SMTP, inspect.isfunction)
        if "self._reader." in inspect.getsource(member)
    }
    assert reads == {"_handle_client", "smtp_DATA", "challenge_auth", "connection_made"}
    for replaced in ("_handle_client", "smtp_DATA"):
        assert getattr(RelaySMTP, replaced) is not getattr(aiosmtpd_smtp.SMTP, replaced)


def test_received_bytes_go_through_data_received_only() -> None:
    # CommandLoop.data_received feeds SessionReader instead of the StreamReader: aiosmtpd
    # leaves StreamReaderProtocol's in place, and that one only feeds the reader.
    assert aiosmtpd_smtp.SMTP.data_received is asyncio.StreamReaderProtocol.data_received
    assert "buffer_updated" not in vars(asyncio.StreamReaderProtocol)  # not a BufferedProtocol


def _flow(protocol: asyncio.StreamReaderProtocol) -> tuple[bool, bool]:
    """FlowControlMixin's (_paused, _connection_lost), as CommandLoop._drain_waits reads them."""
    return bool(protocol._paused), bool(protocol._connection_lost)  # type: ignore[attr-defined]


async def test_drain_returns_at_once_unless_paused_closing_or_lost() -> None:
    # CommandLoop._put skips drain() when FlowControlMixin's _paused and _connection_lost are
    # False, the transport is not closing and the reader holds no error.
    made: list[asyncio.StreamReaderProtocol] = []
    writers: list[asyncio.StreamWriter] = []

    def protocol() -> asyncio.StreamReaderProtocol:
        made.append(
            asyncio.StreamReaderProtocol(asyncio.StreamReader(), lambda _r, w: writers.append(w))
        )
        return made[-1]

    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _reader, client = await asyncio.open_connection("127.0.0.1", port)
    try:
        await eventually(lambda: writers)
        (proto,), (writer,) = made, writers
        assert _flow(proto) == (False, False)
        step = writer.drain()
        with pytest.raises(StopIteration):  # done without waiting for anything
            step.send(None)
        proto.pause_writing()
        assert _flow(proto) == (True, False)
        step = writer.drain()
        step.send(None)  # waits for resume_writing()
        proto.resume_writing()
        assert _flow(proto) == (False, False)
        with pytest.raises(StopIteration):
            step.send(None)
        writer.close()
        await eventually(lambda: _flow(proto) == (False, True))
        with pytest.raises(ConnectionResetError):  # drain() raises once the connection is lost
            await writer.drain()
    finally:
        client.close()
        server.close()
        await server.wait_closed()


def test_aiosmtpd_module_names_used() -> None:
    assert aiosmtpd_smtp._AuthMechAttr._fields == ("method", "is_builtin")
    assert aiosmtpd_smtp.login_always_fail("PLAIN", b"user", b"password") is False
    assert {a.name for a in attr.fields(aiosmtpd_smtp.AuthResult)} >= {
        "success",
        "handled",
        "message",
        "auth_data",
    }
    assert isinstance(aiosmtpd_smtp.MISSING, aiosmtpd_smtp._Missing)
    assert isinstance(aiosmtpd_smtp.DATA_SIZE_DEFAULT, int)
    assert isinstance(aiosmtpd_smtp.__ident__, str)
    assert isinstance(aiosmtpd_smtp.SMTP.line_length_limit, int)
    assert isinstance(aiosmtpd_smtp.SMTP.local_part_limit, int)
    assert isinstance(aiosmtpd_smtp.SMTP.command_size_limits, collections.defaultdict)
    # command_loop.CommandLoop._serve
    assert aiosmtpd_smtp.BOGUS_LIMIT == 5
    assert {"NOOP", "EHLO", "STARTTLS", "QUIT"} == aiosmtpd_smtp.ALLOWED_BEFORE_STARTTLS
    assert issubclass(aiosmtpd_smtp.TLSSetupException, Exception)
    assert aiosmtpd_smtp.log.name == "mail.log"
    assert callable(aiosmtpd_smtp.sanitized_log)
    assert aiosmtpd_smtp.syntax("X")(lambda: None).__smtp_syntax__ == "X"  # type: ignore[attr-defined]


class _NoHooks:
    """A handler without hooks: aiosmtpd's defaults answer."""


async def test_connected_aiosmtpd_session_attributes() -> None:
    loop = asyncio.get_running_loop()
    made: list[aiosmtpd_smtp.SMTP] = []

    def protocol() -> aiosmtpd_smtp.SMTP:
        made.append(aiosmtpd_smtp.SMTP(_NoHooks(), loop=loop, timeout=42.0))
        return made[-1]

    server = await loop.create_server(protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readline()  # the greeting
        writer.write(b"EHLO client.test\r\n")
        while (await reader.readline())[3:4] != b" ":
            pass
        (proto,) = made
        # RelaySMTP (relay/inbound/session.py and its layers) reads and sets these.
        assert isinstance(proto._reader, asyncio.StreamReader)
        assert isinstance(proto._writer, asyncio.StreamWriter)
        assert isinstance(proto._timeout_handle, asyncio.TimerHandle)
        assert proto._timeout_duration == 42.0
        assert isinstance(proto._handle_hooks, dict)
        assert {"EHLO", "MAIL", "RCPT", "DATA"} <= set(proto._smtp_methods)  # tests/support
        assert isinstance(proto.loop, asyncio.AbstractEventLoop)
        session = proto.session
        assert session is not None
        assert session.host_name == "client.test"
        assert session.extended_smtp is True
        assert not session.authenticated  # falsy until AUTH succeeds (listener, session)
        envelope = proto.envelope
        assert envelope is not None
        assert envelope.mail_from is None
        assert envelope.rcpt_tos == []
    finally:
        writer.close()
        for proto in made:
            if proto.transport is not None:
                proto.transport.close()
        server.close()
        await server.wait_closed()
