"""The DATA transfer: a stored message sent as SMTP mail data, in bounded chunks.

Owns the on-the-wire form of the message body (RFC 5321 §4.5.2 transparency, §2.3.8 line
endings) and streaming it over an open connection (`smtp_wire.SmtpWire`) after the 354
reply, with flow control, so that a large message is never copied whole again on its way
out. Knows nothing about recipients, outcomes or TLS requirements; `client` calls it and
turns what it returns or raises into values.

The order matters (RFC-CHECKLIST SMUG-06): line endings are normalised first (a bare CR
or LF becomes CRLF, SMTP-15), and only then are lines starting with "." doubled (SMTP-14),
so that no "\\r\\n.\\r\\n" can appear inside the data. The listener refuses bare CR and LF,
so normalising should never change stored mail; it is done anyway, defensively.

Also owns the reply sequence of the data phase (issue 10). DATA is the last command of
a group (RFC 2920 §3.1): its reply may count only if nothing else came from the server
after it, and nothing may be waiting when the body is written (`SmtpWire.unsolicited`).
DATA's only go-ahead is 354 and only a 2xx read after the final "." means the MX took the
message (RFC 5321 §3.3, §6.1); anything else is a violation (`DataResult.violation`),
never a delivery.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from relay.delivery.smtp_wire import MalformedReply, Reply, SmtpWire

CHUNK = 64 * 1024
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")
_END_OF_DATA = b".\r\n"


class DataEncoder:
    """Turns message bytes, fed in pieces split anywhere, into SMTP mail data.

    `feed(piece)` returns the encoded bytes that are now certain; `finish()` returns the
    rest and the terminating "." line. The concatenation equals the whole-message form:
    normalise(message), ensure it ends with CRLF, double leading dots, append ".CRLF".
    """

    def __init__(self) -> None:
        self._at_line_start = True  # the next output byte starts a line
        self._ends_crlf = False  # the output so far ends with CRLF
        self._held_cr = False  # a CR at the end of the last piece: is an LF next?

    def feed(self, piece: bytes) -> bytes:
        if self._held_cr:
            piece = b"\r" + piece
            self._held_cr = False
        if piece.endswith(b"\r"):
            # A CR at a piece boundary may be half of a CRLF split across pieces.
            piece = piece[:-1]
            self._held_cr = True
        return self._encode(piece)

    def finish(self) -> bytes:
        out = self._encode(b"\r") if self._held_cr else b""  # a lone CR at the very end
        self._held_cr = False
        if not self._ends_crlf:
            out += b"\r\n"  # the data must end with CRLF before the "." line
        self._at_line_start, self._ends_crlf = True, True
        return out + _END_OF_DATA

    def _encode(self, piece: bytes) -> bytes:
        if not piece:
            return piece
        crlf = piece.count(b"\r\n")
        if piece.count(b"\r") != crlf or piece.count(b"\n") != crlf:
            piece = _LINE_ENDINGS.sub(b"\r\n", piece)  # RFC 5321 §2.3.8
        # After normalisation every LF ends a line: "\n." is a line starting with a dot.
        if b"\n." in piece:
            piece = piece.replace(b"\n.", b"\n..")  # RFC 5321 §4.5.2
        if self._at_line_start and piece.startswith(b"."):
            piece = b"." + piece
        self._ends_crlf = piece.endswith(b"\r\n")
        self._at_line_start = piece.endswith(b"\n")
        return piece


def encode_data(message: bytes) -> bytes:
    """The whole message as mail data in one piece (tests and small messages)."""
    encoder = DataEncoder()
    return encoder.feed(message) + encoder.finish()


@dataclass(frozen=True, slots=True)
class DataResult:
    """How DATA ended, as far as the reply sequence lets us know.

    `reply` is the reply that decides the message, always one read in sequence: DATA's own
    refusal (4xx, 5xx) or the reply to the final "." (a 2xx among them only if it came
    after the "." was written). `violation` (raw text, not yet a safe line) says how the
    MX broke the sequence; `reply` is then None unless it is that in-sequence 2xx and the
    violation came after it. `body_sent` says whether the final "." was written: the MX
    may then have the message.
    """

    reply: Reply | None
    body_sent: bool
    violation: str | None = None


async def send_data(
    wire: SmtpWire,
    message: bytes,
    *,
    timeout: float,  # noqa: ASYNC109 - per reply and per chunk written
    start: Reply | None = None,
) -> DataResult:
    """DATA's reply (`start`, when DATA went out in a pipelined group; else DATA is sent
    now), then the message in chunks, then the final reply, each reply checked.

    The caller checks that nothing is pending before DATA is written. A reply that cannot
    be parsed is a violation. Raises OSError (ConnectionLost among them) or TimeoutError
    when the connection fails; the connection is then closed (its state is unknown, never
    reused). After a violation the caller closes it.
    """
    try:
        return await _transfer(wire, message, timeout, start)
    except BaseException:
        wire.close()
        raise


async def _transfer(
    wire: SmtpWire, message: bytes, per_step: float, start: Reply | None
) -> DataResult:
    if start is None:
        try:
            start = await wire.command(b"DATA", timeout=per_step)
        except MalformedReply as exc:
            return DataResult(None, False, f"unreadable reply to DATA: {exc}")
    if (problem := data_reply_problem(wire, start)) is not None:
        return DataResult(None, False, problem)
    if start.code != 354:
        return DataResult(start, False)  # an ordinary refusal: 4xx or 5xx
    try:
        final, early = await _stream(wire, message, per_step)
    except MalformedReply as exc:
        return DataResult(None, True, f"unreadable reply to the end of data: {exc}")
    stray = wire.unsolicited()
    if final.code // 100 not in (2, 4, 5):
        return DataResult(None, True, f"MX answered {final.code} to the end of data")
    if early and final.code // 100 == 2:
        # A refusal before the end is tolerated (some servers do); an acceptance is not:
        # the MX had not seen the whole message.
        return DataResult(None, True, f"MX answered {final.code} before the end of data")
    if stray is not None:
        # The 2xx came first and in sequence: the MX took the message (RFC 5321 §6.1) and
        # deferring would send it twice. A refusal followed by more is not trusted.
        accepted = final if final.code // 100 == 2 else None
        return DataResult(accepted, True, f"unsolicited reply after the end of data: {stray}")
    return DataResult(final, True)


def data_reply_problem(wire: SmtpWire, start: Reply) -> str | None:
    """How DATA's reply `start` breaks the sequence (raw text), or None when it stands:
    RFC 5321 §3.3 answers DATA with 354 or a refusal (anything else, a 2xx above all, would
    have a message recorded as sent that never crossed the wire), and nothing may follow."""
    if start.code != 354 and start.code // 100 not in (4, 5):
        return f"MX answered {start.code} to DATA instead of 354"
    if (stray := wire.unsolicited()) is not None:
        return f"unsolicited reply after DATA: {stray}"
    return None


async def _stream(wire: SmtpWire, message: bytes, per_step: float) -> tuple[Reply, bool]:
    """The body and the final ".", then the reply; True with it when that reply (or a part
    of it) had come before the "." was written (the wire keeps what arrives early)."""
    encoder = DataEncoder()
    offset = 0
    with memoryview(message) as view:
        while len(view) - offset > CHUNK:
            wire.write(encoder.feed(bytes(view[offset : offset + CHUNK])))
            offset += CHUNK
            async with asyncio.timeout(per_step):  # RFC 5321 §4.5.3.2.5: a data block
                await wire.drain()  # the transport's buffer stays bounded
        rest = message if offset == 0 else bytes(view[offset:])
    early = wire.unsolicited() is not None
    wire.write(encoder.feed(rest) + encoder.finish())
    return await wire.reply(timeout=per_step), early
