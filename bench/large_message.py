"""A 50 MiB message through `sts-relay serve`: peak memory beside the idle footprint.

    python -m bench.large_message              # 50 MiB
    python -m bench.large_message --mib 20

The relay runs as a subprocess; this process plays the client, a DNS server (the lab's,
tests/support/dns.py) and the receiving MX (aiosmtpd, plain SMTP, recording only the size
and a SHA-256 of what it got). Printed: VmRSS at idle, VmHWM (peak resident) after the
250 and during the delivery (the peak is reset after the 250), and the peak above idle as
a multiple of the message size.
Target (issue 3): peak above idle < 3x the message size.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support.dns import DnsServer

MIB = 1 << 20


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak(pid: int) -> None:
    """Reset VmHWM (proc(5) clear_refs "5") so that the delivery's own peak shows apart."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_message(size: int) -> bytes:
    head = b"From: app@src.test\r\nTo: u@big.test\r\nSubject: large\r\n\r\n"
    line = b"0123456789abcdef" * 4 + b"0123456789ab\r\n"  # 78 bytes
    body = line * ((size - len(head)) // len(line))
    return head + body + b"x" * (size - len(head) - len(body) - 2) + b"\r\n"


class Sink:
    def __init__(self) -> None:
        self.got: list[tuple[int, str]] = []
        self.arrived = asyncio.Event()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        body = memoryview(data)[data.find(b"\r\n\r\n") + 4 :]
        self.got.append((len(data), hashlib.sha256(body).hexdigest()))
        self.arrived.set()
        return "250 2.0.0 OK"


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if line[3:4] != b"-":
            return line


async def submit(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _reply(reader)
    for line in (b"EHLO bench.test", b"MAIL FROM:<app@src.test>", b"RCPT TO:<u@big.test>"):
        writer.write(line + b"\r\n")
        await _reply(reader)
    writer.write(b"DATA\r\n")
    await _reply(reader)
    view = memoryview(data)
    for start in range(0, len(view), MIB):
        writer.write(view[start : start + MIB])
        await writer.drain()
    writer.write(b".\r\n")
    reply = await _reply(reader)
    writer.close()
    return reply


def relay_config(work: Path, port: int, dns: str, mx_port: int, max_size: int) -> Path:
    path = work / "relay.toml"
    path.write_text(
        f'[listen]\naddresses = ["127.0.0.1:{port}"]\nmax_message_size = {max_size}\n\n'
        f'[state]\npath = "{work / "state"}"\n\n'
        f'[delivery]\nhostname = "relay.bench.test"\nport = {mx_port}\n'
        "allow_loopback_mx = true\n\n"
        f'[dns]\nnameservers = ["{dns}"]\n\n[metrics]\naddress = ""\n\n'
        "[tlsrpt]\nenabled = false\n",
        encoding="utf-8",
    )
    return path


async def run(mib: int, work: Path) -> None:
    dns = DnsServer()
    await dns.start()
    mx_port = free_port()
    dns.add("big.test", "MX", "10 mx.big.test.")
    dns.add("mx.big.test", "A", "127.0.0.1")
    sink = Sink()
    loop = asyncio.get_running_loop()
    mx = await loop.create_server(
        lambda: SMTP(sink, decode_data=False, data_size_limit=None, loop=loop),
        "127.0.0.1",
        mx_port,
    )
    port = free_port()
    data = make_message(mib * MIB)
    config = relay_config(work, port, dns.nameserver, mx_port, (mib + 10) * MIB)
    log = work / "relay.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STS_RELAY_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: S603, ASYNC220 (own interpreter; before any load)
            [sys.executable, "-m", "relay", "--config", str(config), "serve"],
            stdout=out,
            stderr=out,
            env=env,
        )
    try:
        while b'"listening"' not in log.read_bytes():
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()[-2000:])
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        idle = _status_kib(proc.pid, "VmRSS")
        started = time.perf_counter()
        reply = await submit(port, data)
        accepted = time.perf_counter() - started
        hwm_accept = _status_kib(proc.pid, "VmHWM")
        _reset_peak(proc.pid)
        async with asyncio.timeout(120):
            await sink.arrived.wait()
        delivered = time.perf_counter() - started
        await asyncio.sleep(0.5)  # the relay records the outcome
        hwm = _status_kib(proc.pid, "VmHWM")
    finally:
        proc.kill()
        proc.wait()
        mx.close()
        await dns.stop()
    size_kib = len(data) / 1024
    ((got_len, got_sha),) = sink.got
    sent_body = memoryview(data)[data.find(b"\r\n\r\n") + 4 :]
    intact = got_sha == hashlib.sha256(sent_body).hexdigest()
    print(f"message {len(data) / MIB:.1f} MiB: reply {reply.decode().strip()!r}")
    print(f"  accepted in {accepted:.2f} s, delivered {delivered:.2f} s after the start")
    print(f"  MX got {got_len / MIB:.2f} MiB (body {'intact' if intact else 'ALTERED'})")
    print(f"  idle RSS            {idle / 1024:7.1f} MiB")
    print(
        f"  peak after the 250  {hwm_accept / 1024:7.1f} MiB"
        f"  = idle + {(hwm_accept - idle) / size_kib:.2f}x message"
    )
    print(
        f"  peak overall        {max(hwm, hwm_accept) / 1024:7.1f} MiB"
        f"  = idle + {(max(hwm, hwm_accept) - idle) / size_kib:.2f}x message   (target < 3x)"
    )
    print(
        f"  peak in delivery    {hwm / 1024:7.1f} MiB"
        f"  = idle + {(hwm - idle) / size_kib:.2f}x message   (after the 250, peak reset)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(args.mib, Path(tmp)))


if __name__ == "__main__":
    main()
