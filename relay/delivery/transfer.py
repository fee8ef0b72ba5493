"""The DATA transfer: a stored message sent as SMTP mail data, in bounded chunks.

Owns the on-the-wire form of the message body (RFC 5321 §4.5.2 transparency, §2.3.8 line
endings) and streaming it over an open aiosmtplib connection after the 354 reply, with
flow control, so that a large message is never copied whole again on its way out
(aiosmtplib's `data()` makes about three copies). Knows nothing about recipients,
outcomes or TLS requirements; `session` calls it and turns what it raises into values.

The order matters (RFC-CHECKLIST SMUG-06): line endings are normalised first (a bare CR
or LF becomes CRLF, SMTP-15), and only then are lines starting with "." doubled (SMTP-14),
so that no "\\r\\n.\\r\\n" can appear inside the data. The listener refuses bare CR and LF,
so normalising should never change stored mail; it is done anyway, defensively.
"""

from __future__ import annotations

import asyncio
import re

import aiosmtplib
from aiosmtplib import SMTPResponse, SMTPServerDisconnected

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


async def send_data(
    smtp: aiosmtplib.SMTP,
    message: bytes,
    *,
    timeout: float,  # noqa: ASYNC109 - per reply and per chunk written, like aiosmtplib's
) -> SMTPResponse:
    """DATA, then the message in chunks, then the final reply.

    Returns the reply that decides the message: a DATA reply other than 354, or the reply
    after the final ".". Raises aiosmtplib's SMTPException subclasses, OSError or
    TimeoutError when the connection fails; the connection is then closed (its state is
    unknown, never reused).
    """
    try:
        start = await smtp.execute_command(b"DATA", timeout=timeout)
        if start.code != 354:
            return start
        return await _stream(smtp, message, timeout)
    except BaseException:
        smtp.close()
        raise


async def _stream(smtp: aiosmtplib.SMTP, message: bytes, per_step: float) -> SMTPResponse:
    protocol = smtp.protocol
    if protocol is None:
        raise SMTPServerDisconnected("Connection lost")
    # aiosmtplib drops bytes that arrive while no reply is awaited; a server may answer
    # (552, 421) before the last chunk is written, so say a reply is expected first, as
    # its own execute_data_command does.
    protocol._response_pending = True
    encoder = DataEncoder()
    offset = 0
    with memoryview(message) as view:
        while len(view) - offset > CHUNK:
            protocol.write(encoder.feed(bytes(view[offset : offset + CHUNK])))
            offset += CHUNK
            async with asyncio.timeout(per_step):  # RFC 5321 §4.5.3.2.5: a data block
                await protocol._drain_helper()  # the transport's buffer stays bounded
        rest = message if offset == 0 else bytes(view[offset:])
    protocol.write(encoder.feed(rest) + encoder.finish())
    return await protocol.read_response(timeout=per_step)
