"""The event catalogue: README's log table, relay/events.py's EVENTS, the EventLog methods,
the code that emits them, and the two line formats all agree."""

from __future__ import annotations

import ast
import inspect
import io
import json
import re
import shlex
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from relay.events import EVENTS, EventLog

ROOT = Path(__file__).resolve().parents[2]
_ROW = re.compile(r"^\|\s*`([a-z_]+)`\s*\|([^|]*)\|(.*)\|\s*$")


def readme_log_table() -> dict[str, set[str]]:
    """{event: documented fields} from the table under README's "## Logs" heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Logs", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        row = _ROW.match(line)
        if row:
            # Parenthesised notes name values (`sent`/`deferred`), not fields.
            fields_text = re.sub(r"\([^)]*\)", "", row.group(3))
            table[row.group(1)] = set(re.findall(r"`([a-z_0-9]+)`", fields_text))
    return table


def emitted_names() -> set[str]:
    """Names called as methods anywhere in relay/ except the catalogue itself."""
    names: set[str] = set()
    for path in (ROOT / "relay").rglob("*.py"):
        if path.name == "events.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                names.add(node.func.attr)
    return names


def test_readme_documents_exactly_the_catalogue() -> None:
    documented = readme_log_table()
    assert set(documented) == set(EVENTS), "README log table and EVENTS differ"
    for event, fields in EVENTS.items():
        assert documented[event] == set(fields), f"README fields of {event} differ"


@pytest.mark.parametrize("event", sorted(EVENTS))
def test_each_event_is_emitted_by_the_code_with_its_fields(event: str) -> None:
    method = getattr(EventLog, event)
    params = inspect.signature(method).parameters
    kw_only = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert kw_only == list(EVENTS[event]), f"EventLog.{event} parameters differ from EVENTS"
    assert event in emitted_names(), f"nothing in relay/ emits {event}"

    out = io.StringIO()
    log = EventLog(out, level="debug")
    getattr(log, event)(**{name: f"<{name}>" for name in kw_only})
    record = json.loads(out.getvalue())
    assert list(record) == ["ts", "level", "event", *EVENTS[event]]
    assert record["event"] == event
    assert record["level"] in ("debug", "info", "warning", "error")


def _fixed_clock() -> datetime:
    return datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def test_text_format_is_one_readable_line_of_key_value_pairs() -> None:
    out = io.StringIO()
    log = EventLog(out, fmt="text", clock=_fixed_clock)
    log.rejected(
        client="192.0.2.1",
        stage="RCPT",
        code="554 5.7.1",
        reason='relay denied\r\nevent=forged "x"',
        sender=None,
        rcpt="u@d.test",
    )
    log.listening(addresses=["127.0.0.1:25", "[::1]:25"])
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # a CR/LF in a value never starts a new (forged) line
    parts = shlex.split(lines[0])
    assert parts[:3] == ["2025-01-02T03:04:05.678Z", "info", "rejected"]
    pairs: dict[str, Any] = dict(p.split("=", 1) for p in parts[3:])
    assert pairs["client"] == "192.0.2.1"
    assert pairs["code"] == "554 5.7.1"
    assert pairs["reason"].startswith("relay denied")
    assert "event=forged" in pairs["reason"]  # stays inside the quoted value
    assert pairs["sender"] == "-"
    assert pairs["rcpt"] == "u@d.test"
    assert lines[1] == "2025-01-02T03:04:05.678Z info listening addresses=127.0.0.1:25,[::1]:25"


def test_json_format_is_one_object_per_line_with_rfc3339_utc_time() -> None:
    out = io.StringIO()
    EventLog(out, clock=_fixed_clock).stopping(reason="line\nbreak")
    (line,) = out.getvalue().splitlines()
    assert json.loads(line) == {
        "ts": "2025-01-02T03:04:05.678Z",
        "level": "info",
        "event": "stopping",
        "reason": "line\nbreak",
    }


def test_level_filter_hides_lines_but_observers_see_every_event() -> None:
    out = io.StringIO()
    seen: list[str] = []
    log = EventLog(out, level="error")
    log.subscribe(lambda event, fields: seen.append(event))
    log.stopping(reason="x")
    assert out.getvalue() == ""
    assert seen == ["stopping"]
