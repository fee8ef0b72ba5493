"""`sts-relay serve` as a subprocess, its JSON log lines parsed as they come."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiosmtplib

Event = dict[str, Any]
# The console command as installed beside this interpreter: the contract being tested.
STS_RELAY = Path(sys.executable).parent / "sts-relay"


class Done:
    """What one `sts-relay` command run printed, and its exit status."""

    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr


async def run_cli(config: Path, *args: str, env: dict[str, str] | None = None) -> Done:
    """Run `sts-relay --config CONFIG ARGS...` to completion (STS_RELAY_* not inherited)."""
    proc = await asyncio.create_subprocess_exec(
        str(STS_RELAY),
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or {k: v for k, v in os.environ.items() if not k.startswith("STS_RELAY_")},
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    return Done(proc.returncode or 0, out.decode(), err.decode())


class RelayProcess:
    """One relay process started from a config dict (the lab's `World.relay_config`)."""

    def __init__(self, config_path: Path, listen: str) -> None:
        self.config_path = config_path
        host, _, port = listen.rpartition(":")
        self.host, self.port = host, int(port)
        self.events: list[Event] = []
        self.stderr = b""
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay",
            "--config",
            str(self.config_path),
            "serve",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if not k.startswith("STS_RELAY_")},
        )
        self._reader = asyncio.create_task(self._read())
        await self.wait_for(lambda e: e["event"] == "listening", within=20)

    async def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        async for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                self.events.append(json.loads(line))
            except json.JSONDecodeError:
                self.events.append({"event": "unparsed", "line": line})
            self._changed.set()

    async def wait_for(self, predicate: Callable[[Event], bool], within: float = 15.0) -> Event:
        """The first event matching `predicate`, waiting up to `within` seconds for it."""
        async with asyncio.timeout(within):
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                if self._proc is not None and self._proc.returncode is not None:
                    raise AssertionError(f"relay exited: {self._proc.returncode} {self.stderr!r}")
                self._changed.clear()
                await self._changed.wait()

    def find(self, **fields: Any) -> list[Event]:
        return [e for e in self.events if all(e.get(k) == v for k, v in fields.items())]

    async def delivery(self, rcpt: str, status: str, within: float = 15.0) -> Event:
        return await self.wait_for(
            lambda e: e["event"] == "delivery" and e["rcpt"] == rcpt and e["status"] == status,
            within,
        )

    async def send(
        self,
        rcpts: Sequence[str],
        *,
        sender: str = "app@src.test",
        body: bytes = b"Subject: test\r\n\r\nhello\r\n",
    ) -> str:
        """Submit one message; return the relay's 250 reply text."""
        client = aiosmtplib.SMTP(hostname=self.host, port=self.port, start_tls=False, timeout=10)
        async with client:
            _, reply = await client.sendmail(sender, list(rcpts), body)
        return reply

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs (a crash, a power cut for the process)."""
        assert self._proc is not None
        if self._proc.returncode is None:
            self._proc.kill()
        await self._proc.wait()

    async def stop(self) -> int:
        if self._proc is None:
            return 0
        if self._proc.returncode is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await self._proc.wait()
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._proc.stderr is not None:
            self.stderr = await self._proc.stderr.read()
        return self._proc.returncode or 0
