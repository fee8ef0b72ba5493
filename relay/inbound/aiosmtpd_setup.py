"""Per-connection set-up of aiosmtpd's SMTP protocol object, without its introspection.

aiosmtpd 1.4.6's `SMTP.__init__` runs `inspect.getmembers()` and `dir()` over the protocol
and the handler, and `inspect.signature()` on the EHLO hook, for every connection: about a
fifth of the listener's CPU when each message comes on a new connection. What it finds
depends only on the two classes, so it is found once per (protocol class, handler class)
here, and its three tables of bound methods are mappings that bind a method when it is
looked up (`BoundMethods`: a session looks up a handful). Owns nothing else: every
attribute is set as aiosmtpd's constructor sets it, the tables with the same keys, order and
values (tests/unit/test_aiosmtpd_setup.py compares the two), and any other aiosmtpd version
gets aiosmtpd's own constructor (`FAST_INIT` is False).

Also aiosmtpd's logging of every command line: its `sanitized_log` copies and sanitizes the
line twice per command (about 2% of ingest CPU) only for its logger ("mail.log") to drop
the record, as it does unless the process configures logging. The same helper, installed
in its place, returns at once when the logger would drop the call.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import ssl
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import aiosmtpd
from aiosmtpd import smtp as aiosmtp

# The constructor below mirrors this version's; others use aiosmtpd's own.
FAST_INIT = aiosmtpd.__version__ == "1.4.6"

_log = logging.getLogger("mail.log")  # aiosmtpd's logger
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO}
_sanitized_log = aiosmtp.sanitized_log


def sanitized_log(func: Callable[..., None], msg: Any, *args: Any, **kwargs: Any) -> None:
    """aiosmtpd's `sanitized_log(log.debug | log.info, ...)`, skipped when it would not log."""
    level = _LEVELS.get(getattr(func, "__name__", ""))
    mine = level is not None and getattr(func, "__self__", None) is _log
    if mine and not _log.isEnabledFor(level or 0):
        return
    _sanitized_log(func, msg, *args, **kwargs)


if FAST_INIT:
    aiosmtp.sanitized_log = sanitized_log  # looked up by SMTP._handle_client at each call


class _Shape(NamedTuple):
    """What aiosmtpd's constructor finds by introspection: its tables as names,
    {key: (on the handler?, method name)}."""

    auth_table: dict[str, tuple[bool, str]]  # "PLAIN": protocol.auth_PLAIN, ...
    hook_table: dict[str, tuple[bool, str]]  # "DATA": handler.handle_DATA, ...
    ehlo_hook_ver: str | None
    command_table: dict[str, tuple[bool, str]]  # "MAIL": protocol.smtp_MAIL, ...


class BoundMethods(Mapping[str, Any]):
    """One of aiosmtpd's per-connection tables ({"DATA": handler.handle_DATA, ...},
    {"MAIL": protocol.smtp_MAIL, ...}, {"PLAIN": _AuthMechAttr(protocol.auth_PLAIN, True),
    ...}) with the same keys in the same order, each value bound when it is looked up:
    building the dicts cost more than a session's use of them."""

    __slots__ = ("_auth", "_handler", "_protocol", "_table")

    def __init__(
        self, protocol: Any, handler: Any, table: dict[str, tuple[bool, str]], *, auth: bool
    ) -> None:
        self._protocol = protocol
        self._handler = handler
        self._table = table
        self._auth = auth  # values are aiosmtpd's _AuthMechAttr(method, is_builtin)

    def _value(self, entry: tuple[bool, str]) -> Any:
        on_handler, name = entry
        method = getattr(self._handler if on_handler else self._protocol, name)
        return aiosmtp._AuthMechAttr(method, not on_handler) if self._auth else method

    def __getitem__(self, key: str) -> Any:
        return self._value(self._table[key])

    def get(self, key: str, default: Any = None) -> Any:
        entry = self._table.get(key)
        return default if entry is None else self._value(entry)

    def __contains__(self, key: object) -> bool:
        return key in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


def _auth_names(obj: Any) -> tuple[tuple[str, str], ...]:
    return tuple(
        (
            getattr(func, "__auth_mechanism_name__", name.replace("auth_", "").replace("__", "-")),
            name,
        )
        for name, func in inspect.getmembers(obj)
        if name.startswith("auth_")
    )


def _ehlo_hook_ver(handler: Any) -> str | None:
    hook = getattr(handler, "handle_EHLO", None)
    if hook is None:
        return None
    if len(inspect.signature(hook).parameters) == 5:
        return "new"
    # Only aiosmtpd's new-style hook is supported here (the 4-argument one is deprecated).
    raise RuntimeError("Unsupported EHLO Hook")


_SHAPES: dict[tuple[type, type], _Shape] = {}


def _shape(protocol: Any, handler: Any) -> _Shape:
    """Found on the first connection of a (protocol class, handler class) pair: hooks and
    mechanisms are methods of those classes (the listener sets none per instance)."""
    key = (type(protocol), type(handler))
    shape = _SHAPES.get(key)
    if shape is None:
        auth_table: dict[str, tuple[bool, str]] = {}
        for on_handler, obj in ((False, protocol), (True, handler)):
            for mechanism, name in _auth_names(obj):  # the handler's win, as in aiosmtpd
                auth_table[mechanism] = (on_handler, name)
        shape = _Shape(
            auth_table=auth_table,
            hook_table={
                m.replace("handle_", ""): (True, m) for m in dir(handler) if m.startswith("handle_")
            },
            ehlo_hook_ver=_ehlo_hook_ver(handler),
            command_table={
                m.replace("smtp_", ""): (False, m) for m in dir(protocol) if m.startswith("smtp_")
            },
        )
        _SHAPES[key] = shape
        _log.info("Available AUTH mechanisms: %s", " ".join(sorted(auth_table)))
    return shape


def init_smtp(
    protocol: Any,
    handler: Any,
    *,
    loop: asyncio.AbstractEventLoop,
    hostname: str | None,
    ident: str,
    data_size_limit: int | None,
    enable_smtputf8: bool,
    decode_data: bool,
    tls_context: ssl.SSLContext | None,
    timeout: float,
    auth_require_tls: bool,
) -> None:
    """What `aiosmtpd.smtp.SMTP.__init__` (1.4.6) does with these arguments, with the
    defaults for the rest (no AUTH requirement, no call limits, no PROXY protocol, no
    authenticator), but the introspection results come from `_shape`, and aiosmtpd's
    tables of bound methods are bound lazily (BoundMethods)."""
    shape = _shape(protocol, handler)
    protocol.__ident__ = ident
    protocol.loop = loop
    asyncio.StreamReaderProtocol.__init__(
        protocol,
        asyncio.StreamReader(loop=loop, limit=protocol.line_length_limit),
        client_connected_cb=protocol._cb_client_connected,
        loop=loop,
    )
    protocol.event_handler = handler
    protocol.data_size_limit = data_size_limit
    protocol.enable_SMTPUTF8 = enable_smtputf8
    protocol._decode_data = decode_data
    protocol.command_size_limits.clear()
    protocol.hostname = hostname or socket.getfqdn()
    protocol.tls_context = tls_context
    protocol.require_starttls = tls_context and False
    protocol._timeout_duration = timeout
    protocol._timeout_handle = None
    protocol._tls_handshake_okay = True
    protocol._tls_protocol = None
    protocol._original_transport = None
    protocol.session = None
    protocol.envelope = None
    protocol.transport = None
    protocol._handler_coroutine = None
    protocol._auth_require_tls = auth_require_tls
    protocol._proxy_timeout = None
    protocol._auth_callback = aiosmtp.login_always_fail
    protocol._authenticator = None
    protocol._auth_required = False
    protocol._auth_methods = BoundMethods(protocol, handler, shape.auth_table, auth=True)
    protocol._handle_hooks = BoundMethods(protocol, handler, shape.hook_table, auth=False)
    protocol._ehlo_hook_ver = shape.ehlo_hook_ver
    protocol._smtp_methods = BoundMethods(protocol, handler, shape.command_table, auth=False)
    protocol._enforce_call_limit = False
