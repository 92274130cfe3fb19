"""Value matchers: one policy condition's values compiled into a fast membership test."""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any, Protocol

from relay.schema import parse_size

# RFC 7208 section 2.6 result names, and RFC 8601 section 2.7.1 for DKIM.
SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
DMARC_RESULTS = ("pass", "fail", "none", "temperror", "permerror")
DMARC_POLICIES = ("none", "quarantine", "reject")
DKIM_RESULTS = ("pass", "fail", "none", "policy", "neutral", "temperror", "permerror")

_GLOB_CHARS = frozenset("*?[")
_COMPARISON = re.compile(r"^\s*(>=|<=|>|<|=)?\s*(\S+)\s*$")


def parse_ip(text: str) -> tuple[int, int] | None:
    """(4 or 6, address as an integer), or None for anything that is not an IP address.

    inet_pton is several times cheaper than ipaddress.ip_address, and this runs per RCPT.
    An IPv4-mapped IPv6 address (::ffff:192.0.2.1) is the IPv4 client it stands for.
    """
    try:
        if ":" not in text:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, text.partition("%")[0]), "big")
    except (OSError, ValueError):
        return None
    if value >> 32 == 0xFFFF:
        return 4, value & 0xFFFFFFFF
    return 6, value


def _pattern(value: str) -> re.Pattern[str]:
    """`re:...` or a glob, compiled case-insensitively (mail names are case-insensitive).

    Raises ValueError with re's own explanation for an invalid regular expression.
    """
    if value.startswith("re:"):
        try:
            return re.compile(value[3:], re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None
    return re.compile(fnmatch.translate(value), re.IGNORECASE)


def _is_pattern(value: str) -> bool:
    return value.startswith("re:") or not _GLOB_CHARS.isdisjoint(value)


@dataclass(frozen=True, slots=True)
class TextMatcher:
    """helo_name, listener, sasl_username, header values: exact, glob or `re:`.

    Exact values are a set lookup on the lower-cased subject; patterns are tried after.
    `present` ("*" in a header condition) matches any value of a header that exists.
    """

    exact: frozenset[str]
    patterns: tuple[re.Pattern[str], ...]
    present: bool

    def matches(self, value: str) -> bool:
        if self.present:
            return True
        if value.lower() in self.exact:
            return True
        return any(p.search(value) for p in self.patterns)


@dataclass(frozen=True, slots=True)
class DomainMatcher:
    """Domains: "example.com" matches exactly that domain; ".example.com" matches its
    subdomains only (not example.com itself: Postfix with parent_domain_matches_subdomains
    empty). List both to match both. Globs and `re:` match the whole domain."""

    exact: frozenset[str]
    parents: frozenset[str]  # ".example.com" entries, lower-case with the leading dot
    patterns: tuple[re.Pattern[str], ...]

    def matches(self, domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        if domain in self.exact:
            return True
        if self.parents:
            # Walk the parent suffixes: a.b.example.com -> .b.example.com, .example.com, .com
            dot = domain.find(".")
            while dot != -1:
                if domain[dot:] in self.parents:
                    return True
                dot = domain.find(".", dot + 1)
        return any(p.search(domain) for p in self.patterns)


@dataclass(frozen=True, slots=True)
class AddressMatcher:
    """sender / recipient: "user@example.com" exactly, "<>" the null sender, "example.com"
    any address in that domain, ".example.com" any address in a subdomain, globs
    ("*@example.com") and `re:` against the whole address. All case-insensitive."""

    exact: frozenset[str]
    domains: DomainMatcher
    patterns: tuple[re.Pattern[str], ...]
    null: bool

    def matches(self, address: str) -> bool:
        if not address:
            # RFC 5321 section 4.5.5: the null reverse-path "<>" only matches "<>" (or a
            # pattern that accepts the empty string, such as "*").
            return self.null or any(p.search(address) for p in self.patterns)
        lowered = address.lower()
        if lowered in self.exact:
            return True
        at = lowered.rfind("@")
        if at != -1 and self.domains.matches(lowered[at + 1 :]):
            return True
        return any(p.search(address) for p in self.patterns)


@dataclass(frozen=True, slots=True)
class NetworkMatcher:
    """client_address: IP addresses and CIDR networks, v4 and v6.

    Networks are grouped by prefix length as sets of masked integers, so a list of
    thousands of entries costs one set lookup per distinct prefix length.
    """

    v4: tuple[tuple[int, frozenset[int]], ...]  # (bits to shift away, network numbers)
    v6: tuple[tuple[int, frozenset[int]], ...]
    everything: bool  # both 0.0.0.0/0 and ::/0 are listed: matches any client

    def matches(self, address: tuple[int, int] | None) -> bool:
        """`address` as returned by parse_ip."""
        if address is None:
            return False
        version, value = address
        for shift, networks in self.v4 if version == 4 else self.v6:
            if value >> shift in networks:
                return True
        return False


@dataclass(frozen=True, slots=True)
class NumberMatcher:
    """recipient_count and size: any-of comparisons (">10", ">=25M", "<5", "=3", 3)."""

    tests: tuple[tuple[str, int], ...]

    def matches(self, value: int) -> bool:
        for op, limit in self.tests:
            if (
                (op == ">" and value > limit)
                or (op == ">=" and value >= limit)
                or (op == "<" and value < limit)
                or (op == "<=" and value <= limit)
                or (op == "=" and value == limit)
            ):
                return True
        return False


@dataclass(frozen=True, slots=True)
class ChoiceMatcher:
    """spf, dkim, tls: membership in a small set of exact values."""

    values: frozenset[object]

    def matches(self, value: object) -> bool:
        return value in self.values


class Matcher(Protocol):
    """A compiled condition: does one value of its field match?"""

    def matches(self, value: Any) -> bool: ...


# --- building -------------------------------------------------------------------------------
# Each builder takes the values one by one and returns an error message (or None) for each,
# so the loader can report every bad value with its origin (rule key, list file and line).


class TextBuilder:
    def __init__(self, field: str) -> None:
        self.field = field
        self.exact: set[str] = set()
        self.patterns: list[re.Pattern[str]] = []
        self.present = False

    def add(self, value: object) -> str | None:
        if not isinstance(value, str):
            return f"expected a string, got {value!r}"
        if value == "*" and self.field == "header":
            self.present = True
        elif value == "*" and self.field == "sasl_username":
            # Any authenticated client: a non-empty name (a glob "*" would match "" too).
            self.patterns.append(re.compile(r"."))
        elif _is_pattern(value):
            try:
                self.patterns.append(_pattern(value))
            except ValueError as exc:
                return f'"{value}": {exc}'
        else:
            self.exact.add(value.lower())
        return None

    def build(self) -> TextMatcher:
        return TextMatcher(frozenset(self.exact), tuple(self.patterns), self.present)


class DomainBuilder:
    def __init__(self) -> None:
        self.exact: set[str] = set()
        self.parents: set[str] = set()
        self.patterns: list[re.Pattern[str]] = []

    def add(self, value: object) -> str | None:
        if not isinstance(value, str) or not value:
            return f"expected a domain, got {value!r}"
        if _is_pattern(value):
            try:
                self.patterns.append(_pattern(value))
            except ValueError as exc:
                return f'"{value}": {exc}'
            return None
        if "@" in value or " " in value:
            return f'expected a domain such as "example.com" or ".example.com", got "{value}"'
        domain = value.lower().rstrip(".")
        if domain.startswith("."):
            self.parents.add(domain)
        else:
            self.exact.add(domain)
        return None

    def build(self) -> DomainMatcher:
        return DomainMatcher(frozenset(self.exact), frozenset(self.parents), tuple(self.patterns))


class AddressBuilder:
    def __init__(self, *, null_allowed: bool) -> None:
        self.null_allowed = null_allowed
        self.exact: set[str] = set()
        self.domains = DomainBuilder()
        self.patterns: list[re.Pattern[str]] = []
        self.null = False

    def add(self, value: object) -> str | None:
        if not isinstance(value, str) or not value:
            return f"expected an address, got {value!r}"
        if value == "<>":
            if not self.null_allowed:
                return '"<>" (the null sender) is only meaningful for sender'
            self.null = True
        elif _is_pattern(value):
            try:
                self.patterns.append(_pattern(value))
            except ValueError as exc:
                return f'"{value}": {exc}'
        elif "@" in value:
            if value.startswith("@"):
                return f'"{value}": write "*{value}" for every address in a domain'
            self.exact.add(value.lower())
        else:
            return self.domains.add(value)
        return None

    def build(self) -> AddressMatcher:
        return AddressMatcher(
            frozenset(self.exact), self.domains.build(), tuple(self.patterns), self.null
        )


class NetworkBuilder:
    def __init__(self) -> None:
        self.v4: dict[int, set[int]] = {}
        self.v6: dict[int, set[int]] = {}

    def add(self, value: object) -> str | None:
        try:
            if not isinstance(value, str):
                raise ValueError
            network = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            return f"expected an IP address or CIDR network, got {value!r}"
        table, bits = (self.v4, 32) if network.version == 4 else (self.v6, 128)
        shift = bits - network.prefixlen
        table.setdefault(shift, set()).add(int(network.network_address) >> shift)
        return None

    def build(self) -> NetworkMatcher:
        def freeze(table: dict[int, set[int]]) -> tuple[tuple[int, frozenset[int]], ...]:
            # Most specific first: a host entry is the likeliest exact hit.
            return tuple((shift, frozenset(nets)) for shift, nets in sorted(table.items()))

        everything = 32 in self.v4 and 128 in self.v6
        return NetworkMatcher(freeze(self.v4), freeze(self.v6), everything)


class NumberBuilder:
    def __init__(self, *, sizes: bool) -> None:
        self.sizes = sizes
        self.tests: list[tuple[str, int]] = []

    def add(self, value: object) -> str | None:
        example = '">25M"' if self.sizes else '">10"'
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            self.tests.append(("=", value))
            return None
        m = _COMPARISON.match(value) if isinstance(value, str) else None
        try:
            if m is None:
                raise ValueError
            number = parse_size(m.group(2)) if self.sizes else int(m.group(2))
            if number < 0:
                raise ValueError
        except ValueError:
            units = " (K, M, G suffixes allowed)" if self.sizes else ""
            return f"expected a comparison such as {example}{units} or a number, got {value!r}"
        self.tests.append((m.group(1) or "=", number))
        return None

    def build(self) -> NumberMatcher:
        return NumberMatcher(tuple(self.tests))


class ChoiceBuilder:
    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices
        self.values: set[object] = set()

    def add(self, value: object) -> str | None:
        if not isinstance(value, str) or value.lower() not in self.choices:
            return f"expected one of {', '.join(self.choices)}, got {value!r}"
        self.values.add(value.lower())
        return None

    def build(self) -> ChoiceMatcher:
        return ChoiceMatcher(frozenset(self.values))


class BoolBuilder:
    def __init__(self) -> None:
        self.values: set[object] = set()

    def add(self, value: object) -> str | None:
        if not isinstance(value, bool):
            return f"expected true or false, got {value!r}"
        self.values.add(value)
        return None

    def build(self) -> ChoiceMatcher:
        return ChoiceMatcher(frozenset(self.values))


Builder = (
    TextBuilder
    | DomainBuilder
    | AddressBuilder
    | NetworkBuilder
    | NumberBuilder
    | ChoiceBuilder
    | BoolBuilder
)
