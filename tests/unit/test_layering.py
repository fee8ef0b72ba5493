"""CONVENTIONS.md's import rule: `policy` and `mailqueue` never import `relay` or each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "policy": {"relay", "mailqueue", "tlsrpt", "posture"},
    "mailqueue": {"relay", "policy", "tlsrpt", "posture"},
    "tlsrpt": {"relay", "mailqueue", "posture"},
    # The TLS posture knows only its own values and tables; relay/posture.py feeds it.
    "posture": {"relay", "mailqueue", "policy", "tlsrpt"},
    # PostgreSQL plumbing only: the stores of policy, tlsrpt and posture use it, it knows
    # none of them.
    "pgstate": {"relay", "mailqueue", "policy", "tlsrpt", "posture"},
}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_forbidden_layers(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    offenders = {
        str(f.relative_to(ROOT)): sorted(_imported_packages(f) & FORBIDDEN[package]) for f in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_tlsrpt_uses_only_the_policy_model() -> None:
    """`tlsrpt` may speak MTA-STS values (policy.model), never policy's machinery."""
    used: set[str] = set()
    for path in sorted((ROOT / "tlsrpt").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                used.add(node.module)
            elif isinstance(node, ast.Import):
                used.update(alias.name for alias in node.names)
    assert {m for m in used if m.split(".")[0] == "policy"} <= {"policy.model"}


def test_no_top_level_module_shadows_the_standard_library() -> None:
    import sys

    top_level = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert not top_level & set(sys.stdlib_module_names)


# The two SMTP sides of `relay/` meet only in the wiring (relay/app.py) and the command line:
# the inbound side (sessions with submitting applications) and the delivery side (conversations
# with recipient MX hosts) never import each other.
SIDES = {"relay.inbound": "relay.delivery", "relay.delivery": "relay.inbound"}


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("side", sorted(SIDES))
def test_inbound_and_delivery_sides_do_not_import_each_other(side: str) -> None:
    folder = ROOT / side.replace(".", "/")
    files = sorted(folder.rglob("*.py"))
    assert files, f"{side} has no modules"
    other = SIDES[side]
    offenders = {
        str(f.relative_to(ROOT)): sorted(
            m for m in _imported_modules(f) if m == other or m.startswith(other + ".")
        )
        for f in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_relay_root_holds_only_wiring_and_shared_parts() -> None:
    """Inbound, delivery and command-line modules live in their own folders."""
    flat = {p.stem for p in (ROOT / "relay").glob("*.py")}
    assert flat <= {
        "__init__",
        "__main__",
        "app",
        "config",
        "event_loop",
        "events",
        "metrics",
        "posture",
        "reporting",
        "state",
        "users",
    }
