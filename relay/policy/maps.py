"""Address maps: what `rewrite_sender`, `rewrite_recipient` and `rewrite_header_from`
look an address up in, compiled and checked at load.

A map's keys are, in the order they are tried (as Postfix canonical maps, then regexp
tables):

* an exact address, `www-data@app1.internal`;
* `@domain`, every address in that domain (not its subdomains);
* `re:PATTERN`, a regular expression searched in the address (case-insensitive), tried in
  the order written; the value may use its groups as `$1` .. `$9`.

A value is an address, or `@domain`: the same local part in another domain. Keys match
regardless of case. A map is applied once, never to its own output: the loader refuses a
map whose result it would rewrite again (a loop, or a chain that should be written as its
final address).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from relay.address import domain_problem, problem

_GROUP = re.compile(r"\$(\d)")


class MapError(ValueError):
    """A map produced an address that is not one (a `re:` value with an unlucky group)."""


@dataclass(frozen=True, slots=True)
class _Pattern:
    pattern: re.Pattern[str]
    value: str
    origin: str


@dataclass(frozen=True, slots=True, eq=False)
class AddressMap:
    """A compiled map; `name` is how traces and logs refer to it ("@name" or "inline")."""

    name: str
    exact: dict[str, str]
    domains: dict[str, str]
    patterns: tuple[_Pattern, ...]

    def lookup(self, address: str) -> str | None:
        """The address `address` becomes, or None when no key matches it.

        Raises MapError when a `re:` value expands to something that is not an address.
        """
        if not address:
            return None  # RFC 5321 section 4.5.5: the null sender stays null
        key = address.lower()
        local, _, domain = address.rpartition("@")
        value = self.exact.get(key)
        if value is None:
            value = self.domains.get("@" + domain.lower())
        if value is not None:
            return local + value if value.startswith("@") else value
        for entry in self.patterns:
            found = entry.pattern.search(address)
            if found is None:
                continue
            result = _expand(found, entry.value)
            if entry.value.startswith("@"):
                result = local + result
            if why := problem(result, utf8=True):
                where = f" ({entry.origin})" if entry.origin else ""
                raise MapError(f"map {self.name}{where}: re:{entry.pattern.pattern}: "
                               f"<{address}> became <{result}>: {why}")
            return result
        return None

    def __len__(self) -> int:
        return len(self.exact) + len(self.domains) + len(self.patterns)


def _expand(found: re.Match[str], value: str) -> str:
    """`value` with $1 .. $9 replaced by the groups of `found` ("" for one that did not
    take part in the match)."""
    return _GROUP.sub(lambda g: found.group(int(g.group(1))) or "", value)


def compile_map(
    name: str, entries: Iterable[tuple[str, str, str]], fail: Callable[[str], None]
) -> AddressMap | None:
    """A map from (key, value, origin) entries; `origin` says where each was written (a
    file and line, or the TOML key) for the messages given to `fail`. None on any error."""
    exact: dict[str, str] = {}
    domains: dict[str, str] = {}
    patterns: list[_Pattern] = []
    origins: dict[str, str] = {}  # lower-case key -> where it was written
    written: list[tuple[str, str]] = []
    ok = True
    for key, value, origin in entries:
        why = _entry_problem(key, value)
        if why is None and key.lower() in origins:
            why = "already mapped" + (f" at {origins[key.lower()]}" if origins[key.lower()]
                                      else " (keys match regardless of case)")
        if why is not None:
            fail(_where(origin, key, why))
            ok = False
            continue
        origins[key.lower()] = origin
        written.append((key, origin))
        if key.startswith("re:"):
            patterns.append(_Pattern(re.compile(key[3:], re.IGNORECASE), value, origin))
        elif key.startswith("@"):
            domains[key.lower()] = value
        else:
            exact[key.lower()] = value
    if not ok:
        return None
    compiled = AddressMap(name, exact, domains, tuple(patterns))
    for key, origin in written:
        if loop := _rewritten_again(compiled, key):
            fail(_where(origin, key, loop))
            ok = False
    return compiled if ok else None


def _where(origin: str, key: str, why: str) -> str:
    return (f"{origin}: " if origin else "") + f'"{key}": {why}'


def _entry_problem(key: str, value: str) -> str | None:
    if key.startswith("re:"):
        try:
            groups = re.compile(key[3:], re.IGNORECASE).groups
        except re.error as exc:
            return f"invalid regular expression: {exc}"
        for number in _GROUP.findall(value):
            if int(number) > groups:
                return f"${number} in {value!r}: the expression has {groups} group(s)"
        # The value with every group filled in must still be an address.
        value = _GROUP.sub("x", value)
    elif "$" in value and _GROUP.search(value):
        return f"{value!r}: $1 .. $9 only in the value of a re: key"
    elif key.startswith("@"):
        if why := domain_problem(key[1:]):
            return why
    elif why := problem(key, utf8=True):
        return why
    # A value must be ASCII: the result goes into every message's envelope.
    why = domain_problem(value[1:]) if value.startswith("@") else problem(value)
    return f"value {value!r}: {why}" if why else None


def _rewritten_again(compiled: AddressMap, key: str) -> str | None:
    """Why the entry `key` is a loop or a chain: its result would be rewritten again."""
    if key.startswith("re:"):
        entry = next(p for p in compiled.patterns if p.pattern.pattern == key[3:])
        if _GROUP.search(entry.value):
            return None  # its results depend on the address: nothing fixed to test
        value = entry.value
    else:
        value = compiled.exact.get(key.lower()) or compiled.domains[key.lower()]
    sample = ("user" + value) if value.startswith("@") else value
    try:
        again = compiled.lookup(sample)
    except MapError:
        return None
    if again is None or again.lower() == sample.lower():
        return None
    return (f'rewrites to "{value}", which the map rewrites again to "{again}" (a map '
            "is applied once: write the final address)")
