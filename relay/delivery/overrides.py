"""Per-domain TLS overrides set by the operator (`tls.overrides`): what each entry means.

Owns the entries' meaning and the set in force (swapped on SIGHUP). The decision itself is
`relay/delivery/decision.py`'s pure function, which takes an entry as one of its inputs;
nothing here rewrites a domain's published policy, and nothing here reads DNS.

- `require-verified match=P1:P2`: verified TLS (STARTTLS, a certificate that chains to a
  trusted root, is in date and names the MX host) to MX hosts whose names match the
  entry's own patterns (MTA-STS pattern syntax), for a domain without an enforce policy:
  a local policy, like Postfix's `secure match=`. The patterns come from the operator,
  never from unsigned DNS, so a DNS spoofer cannot choose the names.
- `opportunistic`: the escape hatch for a receiver whose TLS is broken while its policy
  says `enforce`: delivery goes on whatever the certificate, and TLS reports still count
  the failure against the published policy.

Domains are keyed by their A-label form (IDNA): an entry written `bücher.example` applies to
mail for `xn--bcher-kva.example` and the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from relay.config import a_label


class TlsOverride(StrEnum):
    REQUIRE_VERIFIED = "require-verified"
    OPPORTUNISTIC = "opportunistic"


@dataclass(frozen=True, slots=True)
class OverrideRule:
    """One domain's override: the action and, for require-verified, the MX patterns."""

    action: TlsOverride
    mx: tuple[str, ...] = ()


def parse_override(entry: str) -> tuple[str, OverrideRule]:
    """(domain, rule) from an entry config has validated: "domain=action[ match=P:P]".
    The domain and the patterns come out as A-labels, whichever form the entry used."""
    domain, _, rest = entry.partition("=")
    action, _, option = rest.strip().partition(" ")
    patterns = option.strip().removeprefix("match=")
    mx = tuple(_key(p) for p in patterns.split(":") if p) if option else ()
    return _key(domain), OverrideRule(TlsOverride(action.lower()), mx)


def parse_overrides(entries: Sequence[str]) -> dict[str, OverrideRule]:
    """{"domain": OverrideRule} from the validated entries of `tls.overrides`."""
    return dict(parse_override(entry) for entry in entries)


class TlsOverrides:
    """The overrides in force; `replace()` swaps them (SIGHUP) without a restart."""

    def __init__(self, entries: Sequence[str]) -> None:
        self._by_domain = parse_overrides(entries)

    def replace(self, entries: Sequence[str]) -> None:
        self.install(parse_overrides(entries))

    def install(self, parsed: dict[str, OverrideRule]) -> None:
        """Put entries parsed beforehand (`parse_overrides`) in force; cannot fail, so a
        reload can parse everything first and then apply all of it or nothing."""
        self._by_domain = dict(parsed)

    def get(self, domain: str) -> OverrideRule | None:
        """The entry for `domain`, given as A-labels or U-labels (mail may use either)."""
        return self._by_domain.get(_key(domain))


def _key(name: str) -> str:
    """The A-label form of a domain or pattern: IDNA is one name in two spellings."""
    try:
        return a_label(name)
    except ValueError:
        return name.strip().lower().removesuffix(".")  # matches no entry config accepted
