"""The event loop `serve` runs on: `serve.event_loop`, uvloop by default.

uvloop (libuv underneath) implements the same asyncio interfaces the relay uses (servers,
start_tls, signal handlers, to_thread) with less CPU per connection and per read; the
standard library's loop stays one setting away for ruling the loop out of a problem.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, T], kind: str) -> T:
    """Run `main` to completion on a new loop of `kind` ("uvloop" or "asyncio")."""
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.SelectorEventLoop
    if kind == "uvloop":
        import uvloop  # only the serving process needs it

        factory = uvloop.new_event_loop
    # Explicitly, not through the loop policy: whatever installed a policy (uvloop.install
    # in a wrapper, a test) the supervisor keeps the standard loop it needs (uvloop takes
    # SIGCHLD for itself and refuses a handler for it).
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
