"""How every `sts-relay` command answers: exit statuses, JSON, and the one-line error.

A failure is one line on stderr (`sts-relay: ...`), never a traceback; with `--json` the
same failure is also a JSON object on stdout (`{"error": "...", ...}`), so a script that
parses the output parses errors too. Knows nothing of what the commands do.
"""

from __future__ import annotations

import json
import sys
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and the answer is "no" (not found, nothing matched, ...)
EXIT_USAGE = 2  # bad arguments or configuration


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def fail(text: str, status: int = EXIT_FAILURE, *, as_json: bool = False, **fields: Any) -> int:
    """Say what went wrong (stderr; with `as_json` also as JSON on stdout); return `status`."""
    print(f"sts-relay: {text}", file=sys.stderr)
    if as_json:
        print_json({**fields, "error": text})
    return status
