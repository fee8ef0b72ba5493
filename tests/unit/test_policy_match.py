"""RFC 8461 §4.1 MX pattern matching and host-name validity (RFC-CHECKLIST 1.5, STS-101)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.match import is_valid_hostname, mx_matches

MATCH_CASES = [
    # (mx host, patterns, expected)
    ("mx1.d.test", ["mx1.d.test"], True),
    ("MX1.D.TEST.", ["mx1.d.test"], True),  # STS-82: case and root dot ignored
    ("mx1.d.test", ["MX1.D.Test"], True),
    ("mx1.d.test.", ["mx1.d.test."], True),
    ("mx1.d.test", ["mx2.d.test"], False),
    ("mx1.d.test", [], False),
    ("mx1.d.test", ["mxa.d.test", "mx1.d.test"], True),  # any pattern
    ("mail.example.com", ["*.example.com"], True),  # STS-81
    ("MAIL.Example.COM.", ["*.example.com"], True),
    ("example.com", ["*.example.com"], False),
    ("foo.bar.example.com", ["*.example.com"], False),
    ("a.b.d.test", ["*.d.test"], False),
    ("a.b.d.test", ["*.b.d.test"], True),
    ("example.com", ["*.com"], True),  # literal rule (a weak policy, §10.4)
    ("xexample.com", ["*.example.com"], False),
    ("mail.example.com.evil.test", ["*.example.com"], False),
    ("mail.example.com", ["example.com"], False),
    ("mail.example.com", ["mail.example"], False),
    ("d.test", ["d.test"], True),  # implicit MX (STS-87)
    ("*.d.test", ["*.d.test"], False),  # STS-101: a wildcard is not a host name
    ("*.d.test", ["x.d.test"], False),
    ("mx_1.d.test", ["*.d.test"], False),
    ("", ["*.d.test"], False),
    (".", ["*."], False),
    ("mx1..d.test", ["mx1..d.test"], False),
    ("xn--mx-lka.example", ["xn--mx-lka.example"], True),
    ("møx.example", ["møx.example"], False),
    ("a.example", ["*.example", "*.*.example"], True),
]


@pytest.mark.parametrize(("host", "patterns", "expected"), MATCH_CASES)
def test_mx_matches(host: str, patterns: list[str], expected: bool) -> None:
    assert mx_matches(host, patterns) is expected


def test_mx_matches_accepts_any_iterable() -> None:
    assert mx_matches("mx1.d.test", (p for p in ["nope.test", "*.d.test"]))


HOSTNAME_CASES = [
    ("mx1.d.test", True),
    ("mx1.d.test.", True),
    ("MX1.D.TEST", True),
    ("localhost", True),
    ("a-b.c-d.test", True),
    ("xn--mx-lka.example", True),
    ("1mx.d.test", True),
    ("a" * 63 + ".test", True),
    ("a" * 64 + ".test", False),
    (".".join(["a" * 49] * 5) + ".test", False),  # over 253 octets
    ("", False),
    (".", False),
    ("mx1.d.test..", False),
    (".mx1.d.test", False),
    ("mx1..d.test", False),
    ("*.d.test", False),
    ("mx*.d.test", False),
    ("-mx.d.test", False),
    ("mx-.d.test", False),
    ("mx_1.d.test", False),
    ("mx 1.d.test", False),
    ("møx.example", False),
    ("[127.0.0.1]", False),
    ("127.0.0.1", False),  # all-numeric last label
    ("mx1.d.test\n", False),
]


@pytest.mark.parametrize(("name", "expected"), HOSTNAME_CASES)
def test_is_valid_hostname(name: str, expected: bool) -> None:
    assert is_valid_hostname(name) is expected


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@given(st.text(max_size=60), st.lists(st.text(max_size=40), max_size=5))
def test_never_raises(host: str, patterns: list[str]) -> None:
    assert isinstance(mx_matches(host, patterns), bool)
    assert isinstance(is_valid_hostname(host), bool)


@given(_label, st.lists(_label, min_size=1, max_size=4))
def test_wildcard_matches_exactly_one_label(first: str, parent_labels: list[str]) -> None:
    parent = ".".join([*parent_labels, "test"])  # an all-numeric TLD is not a host name
    host = f"{first}.{parent}"
    assert mx_matches(host, [f"*.{parent}"])
    assert mx_matches(host.upper() + ".", [f"*.{parent}"])
    assert not mx_matches(parent, [f"*.{parent}"])
    assert not mx_matches(f"x.{host}", [f"*.{parent}"])
    assert mx_matches(host, [host])
