"""A real browser for tests: Debian's Chromium, headless, turning a page into its DOM.

Owns finding the binary (skip when it is missing, fail under CI_REQUIRE_CHROMIUM, which
.ci/run sets after installing it), running it with a throwaway profile and a deadline, and
a small reader of the resulting DOM (stdlib html.parser). Knows nothing of the relay.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

_DEADLINE_S = 60.0


def chromium_binary() -> str:
    """The Chromium command; skips the test when there is none (fails under CI)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        why = "Chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI_REQUIRE_CHROMIUM"):
            pytest.fail(why)
        pytest.skip(why)
    return found


async def dump_dom(page: Path, profile: Path) -> str:
    """The DOM Chromium builds from `page` (a local file), serialised after load."""
    args = [
        chromium_binary(),
        "--headless",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        f"--user-data-dir={profile}",
        "--dump-dom",
        page.as_uri(),  # an absolute path
    ]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(_DEADLINE_S):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    parents: tuple[str, ...]  # ids and classes of the enclosing elements, outermost first
    text: str = ""


class DomReader(HTMLParser):
    """Every element with its attributes and the ids/classes of its ancestors."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self._stack: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        parents = tuple(label for _, label in self._stack)
        self.elements.append(Element(tag, values, parents))
        if tag not in ("meta", "br", "img", "input", "link", "hr"):  # HTML void elements
            label = "#" + values["id"] if "id" in values else "." + values.get("class", tag)
            self._stack.append((tag, label))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                return

    def handle_data(self, data: str) -> None:
        if self.elements:
            self.elements[-1].text += data

    def find(self, tag: str, *, cls: str | None = None, inside: str | None = None) -> list[Element]:
        return [
            e
            for e in self.elements
            if e.tag == tag
            and (cls is None or cls in e.attrs.get("class", "").split())
            and (inside is None or inside in e.parents)
        ]


def read_dom(text: str) -> DomReader:
    reader = DomReader()
    reader.feed(text)
    reader.close()
    return reader
