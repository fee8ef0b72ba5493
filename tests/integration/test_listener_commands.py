"""MAIL and RCPT without parameters, answered directly by the session
(relay/inbound/envelope.py's `_plain_mail`, `_plain_rcpt`), against the general way (our
checks, then aiosmtpd's smtp_MAIL/smtp_RCPT), over real sockets: for any command sequence,
the same replies, the same events and the same stored messages (envelope, DSN request,
REQUIRETLS)."""

from __future__ import annotations

import asyncio
import re
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.inbound import envelope, session
from tests.integration.test_listener import MESSAGE, Client, Lab, running

_NEVER = re.compile(r"(?!)")

_LOCAL = st.sampled_from(["u", "a.b", "first.last+tag", "x-y_z", "A", "u!#$%&'*/=?^`{|}~"])
_DOMAIN = st.sampled_from(["d.test", "nowhere.test", "a-b.c.test", "D.TEST", "x", "-d.test"])
_PATH = st.one_of(
    st.builds(lambda local, domain: f"<{local}@{domain}>", _LOCAL, _DOMAIN),
    st.sampled_from(
        [
            "<>",
            "<u@[127.0.0.1]>",
            "<Postmaster>",
            "<postmaster@d.test>",
            "<a..b@d.test>",
            "<\xe9@d.test>",
            "<u@d.test> NOTIFY=NEVER",
            " <u@d.test>",
            "<u@d.test> ",
            "u@d.test",
            "<" + "l" * 65 + "@d.test>",
        ]
    ),
)
_MAIL = st.sampled_from(["MAIL FROM", "mail from", "MaIl FrOm"])
_RCPT = st.sampled_from(["RCPT TO", "rcpt to", "RCPT TO "])
_COMMAND = st.one_of(
    st.builds(lambda k, p: f"{k}:{p}", _MAIL, _PATH),
    st.builds(lambda k, p: f"{k}:{p}", _RCPT, _PATH),
    st.builds(lambda k, p: f"{k}:{p}", _RCPT, _PATH),
    st.sampled_from(["HELO c.test", "EHLO c.test", "RSET", "DATA", "DATA", "NOOP", "BOGUS"]),
)
_SESSIONS = st.builds(
    lambda hello, commands: [hello, *commands] if hello else commands,
    st.sampled_from(["EHLO c.test", "HELO c.test", "EHLO c.test", ""]),
    st.lists(_COMMAND, min_size=1, max_size=12),
)


def _events(lab: Lab) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in event.items() if k not in ("ts", "queue_id", "message_id")}
        for name in ("rejected", "received", "session_error")
        for event in lab.events(name)
    ]


def _stored(lab: Lab) -> list[tuple[Any, ...]]:
    return [
        (m.sender, m.recipients, m.dsn, m.requiretls, m.data.split(b"\r\n\r\n", 1)[1])
        for m in lab.store.puts
    ]


async def _session(commands: list[str], env: dict[str, str]) -> tuple[list[list[str]], Any, Any]:
    async with running(extra=env) as lab, Client.connect(lab) as c:
        replies = [await c.reply()]
        for command in commands:
            c.writer.write(command.encode("utf-8", "surrogateescape") + b"\r\n")
            replies.append(await c.reply())
            if replies[-1][0].startswith("354"):
                replies.append([await c.cmd(MESSAGE + b".\r\n")])
            if replies[-1][-1].startswith(("421", "221")):
                break
    return replies, _events(lab), _stored(lab)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    _SESSIONS,
    st.sampled_from(
        [
            {},
            {"STS_RELAY_LISTEN_TRUSTED_NETWORKS": "10.0.0.0/8"},
            {"STS_RELAY_LISTEN_MAX_RECIPIENTS": "1", "STS_RELAY_LISTEN_MAX_ERRORS": "4"},
            {"STS_RELAY_AUTH_REQUIRED": "true"},
        ]
    ),
)
def test_plain_mail_and_rcpt_answer_as_the_general_way(
    commands: list[str], env: dict[str, str]
) -> None:
    plain = asyncio.run(_session(commands, env))
    with (
        mock.patch.object(envelope, "_PLAIN_MAIL", _NEVER),
        mock.patch.object(envelope, "_PLAIN_RCPT", _NEVER),
    ):
        general = asyncio.run(_session(commands, env))
    assert plain == general


async def test_the_plain_way_is_taken() -> None:
    taken: list[str] = []
    plain_mail, plain_rcpt = session.RelaySMTP._plain_mail, session.RelaySMTP._plain_rcpt

    async def mail(self: session.RelaySMTP, address: str) -> bool:
        taken.append("MAIL")
        return await plain_mail(self, address)

    async def rcpt(self: session.RelaySMTP, address: str) -> bool:
        taken.append("RCPT")
        return await plain_rcpt(self, address)

    with (
        mock.patch.object(session.RelaySMTP, "_plain_mail", mail),
        mock.patch.object(session.RelaySMTP, "_plain_rcpt", rcpt),
    ):
        async with running() as lab, Client.connect(lab) as c:
            await c.hello()
            assert (await c.send("app@src.test", ["u@d.test"], MESSAGE)).startswith("250 2.0.0")
    assert taken == ["MAIL", "RCPT"]
    [msg] = lab.store.puts
    assert (msg.sender, msg.recipients) == ("app@src.test", ("u@d.test",))
