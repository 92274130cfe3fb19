"""Loading of the rewrite actions: `[maps]` and the keys of `rewrite_sender`,
`rewrite_recipient`, `rewrite_header_from`, `archive` and `strip` rules, validated with
file, rule, key (and a map file's line)."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from pathlib import Path

from relay.address import problem
from relay.policy.maps import AddressMap, compile_map
from relay.policy.rewrite import Archive, Edit, MapEdit, Strip
from relay.schema import Errors, Table

MAP_ACTIONS = ("rewrite_sender", "rewrite_recipient", "rewrite_header_from")
REWRITE_ACTIONS = (*MAP_ACTIONS, "archive", "strip")
_KEY_ACTIONS: dict[str, tuple[str, ...]] = {
    "map": MAP_ACTIONS,
    "reply_to": ("rewrite_header_from",),
    "archive_to": ("archive",),
    "archive_route": ("archive",),
    "archive_sender": ("archive",),
    "strip_headers": ("strip",),
    "strip_received": ("strip",),
}
EDIT_KEYS = frozenset(_KEY_ACTIONS)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 section 2.2 ftext
_MAP_FORMS = '"@name" of a [maps] entry, an inline table, or "file:PATH"'


def content_lines(path: Path) -> list[tuple[int, str]]:
    """The numbered lines of a `file:` list or map that say something: "#" starts a
    comment at the start of a line or after white space (a local part may itself contain
    "#"), blank lines are skipped. Raises ValueError saying why the file cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(exc.strerror if isinstance(exc, OSError) else str(exc)) from exc
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*", "", line).strip()
        if line:
            lines.append((number, line))
    return lines


class MapSource:
    """The named maps of `[maps]` and the maps rules write inline, compiled once per load.

    A map is a table of `"key" = "value"` or `"file:PATH"` (relative to the policies
    directory, re-read on every load, so SIGHUP picks up an edited file): one
    `key value` pair per line.
    """

    def __init__(self, directory: Path, name_of: Callable[[Path], str], errors: Errors) -> None:
        self.directory = directory
        self.name_of = name_of
        self.errors = errors
        self.raw: dict[str, tuple[object, str]] = {}
        self.named: dict[str, AddressMap] = {}
        self.used: set[str] = set()

    def add(self, name: str, value: object, source: str) -> None:
        key = f"{source}: maps.{name}"
        if name in self.raw:
            self.errors.add(f"{key}: already defined in {self.raw[name][1]}")
        elif not _NAME.match(name):
            self.errors.add(f"{key}: map names use letters, digits, '_', '-', '.' and ':'")
        else:
            self.raw[name] = (value, source)

    def compile_named(self) -> None:
        for name, (value, source) in self.raw.items():
            def fail(message: str, prefix: str = f"{source}: maps.{name}") -> None:
                self.errors.add(f"{prefix}: {message}")

            compiled = self.compile(f"@{name}", value, fail)
            if compiled is not None:
                self.named[name] = compiled

    def compile(self, name: str, value: object, fail: Callable[[str], None]) -> AddressMap | None:
        if isinstance(value, dict):
            entries = []
            for key, target in value.items():
                if not isinstance(target, str):
                    fail(f'"{key}": expected an address or "@domain", got {target!r}')
                    return None
                entries.append((key, target, ""))
            return compile_map(name, entries, fail)
        if not isinstance(value, str) or not value.startswith("file:"):
            fail(f"expected {_MAP_FORMS}, got {value!r}")
            return None
        path = self.directory / value[5:]
        try:
            lines = content_lines(path)
        except ValueError as exc:
            fail(f'cannot read "{value[5:]}": {exc}')
            return None
        origin = self.name_of(path)
        entries = []
        ok = True
        for number, line in lines:
            words = line.split()
            if len(words) != 2:
                fail(f"{origin}:{number}: expected \"key value\" (two words), got {line!r}")
                ok = False
                continue
            entries.append((words[0], words[1], f"{origin}:{number}"))
        compiled = compile_map(name, entries, fail)
        return compiled if ok else None

    def for_rule(self, t: Table) -> AddressMap | None:
        value = t.data["map"]
        if isinstance(value, str) and value.startswith("@"):
            name = value[1:]
            if name not in self.raw:
                t.error("map", f'unknown map "{value}" (known: {", ".join(self.raw) or "none"})')
                return None
            self.used.add(name)
            return self.named.get(name)  # None: its own errors are reported already
        return self.compile("inline", value, lambda m: t.error("map", m))

    def unused(self) -> list[str]:
        return [f"{source}: maps.{name}: not used by any rule"
                for name, (_, source) in self.raw.items() if name not in self.used]


def read_edit(
    t: Table, action: str, maps: MapSource, upstream_groups: Collection[str]
) -> Edit | None:
    """What a rewrite rule changes, or None (for other actions, or on errors, which are
    reported to `t`)."""
    for key, actions in _KEY_ACTIONS.items():
        if key in t.data and action not in actions:
            names = " or ".join(f'"{a}"' for a in actions)
            t.error(key, f"only used with action = {names}")
    if action in MAP_ACTIONS:
        reply_to = None
        if "reply_to" in t.data:
            reply_to = t.string("reply_to", "")
            if why := problem(reply_to):
                t.error("reply_to", f"{reply_to!r}: {why}")
        if "map" not in t.data:
            t.error("map", f'required with action = "{action}" ({_MAP_FORMS})')
            return None
        compiled = maps.for_rule(t)
        return MapEdit(compiled, reply_to) if compiled is not None else None
    if action == "archive":
        return _archive(t, upstream_groups)
    if action == "strip":
        return _strip(t)
    return None


def _archive(t: Table, upstream_groups: Collection[str]) -> Archive | None:
    if "archive_to" not in t.data:
        t.error("archive_to", 'required with action = "archive" (an address, or a list)')
        return None
    raw = t.data["archive_to"]
    to = [raw] if isinstance(raw, str) else raw
    if not isinstance(to, list) or not to or not all(isinstance(a, str) for a in to):
        t.error("archive_to", f"expected an address or a list of addresses, got {raw!r}")
        return None
    for address in to:
        if why := problem(address):
            t.error("archive_to", f"{address!r}: {why}")
    route = None
    if "archive_route" in t.data:
        route = t.string("archive_route", "")
        if upstream_groups and route not in upstream_groups:
            known = ", ".join(sorted(upstream_groups))
            t.error("archive_route", f'unknown upstream group "{route}" (known: {known})')
    sender = t.string("archive_sender", "")
    sender = "" if sender == "<>" else sender
    if sender and (why := problem(sender)):
        t.error("archive_sender", f"{sender!r}: {why}")
    return Archive(tuple(dict.fromkeys(to)), route, sender)


def _strip(t: Table) -> Strip | None:
    if "strip_headers" not in t.data and "strip_received" not in t.data:
        t.error("strip_headers", 'strip_headers or strip_received required with action = "strip"')
        return None
    names: set[str] = set()
    patterns: list[re.Pattern[str]] = []
    written = t.strings("strip_headers", ())
    for item in written:
        if item.startswith("re:"):
            try:
                patterns.append(re.compile(item[3:], re.IGNORECASE))
            except re.error as exc:
                t.error("strip_headers", f"{item!r}: invalid regular expression: {exc}")
                continue
        elif not _HEADER_NAME.match(item):
            t.error("strip_headers", f"{item!r}: not a valid header field name")
            continue
        else:
            names.add(item.lower())
        if "from" in names or any(p.search("from") for p in patterns):
            # RFC 5322 section 3.6: From: is required; without it no receiver takes the mail.
            t.error("strip_headers", f"{item!r}: would remove From:, which every message needs")
            names.discard("from")
            patterns = [p for p in patterns if not p.search("from")]
    internal = False
    if "strip_received" in t.data:
        internal = t.string("strip_received", "", ("internal",)) == "internal"
    spec = ", ".join(written)
    if internal:
        spec += ("; " if spec else "") + "Received: naming internal addresses"
    return Strip(frozenset(names), tuple(patterns), internal, spec)
