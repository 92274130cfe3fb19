"""Typed reading of TOML tables that collects every error with its file and dotted key."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from relay.ipaddr import IPNetwork

T = TypeVar("T")

# Strict on purpose: "5 min", "25MB" or "1.5.3" are errors, never read as something else.
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"^(\d+)([KMG]?)$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}



class ConfigError(Exception):
    """Raised with every error found, one per line, when settings cannot be loaded."""

    def __init__(self, messages: list[str], partial: Any = None) -> None:
        super().__init__("\n".join(messages))
        self.messages = messages
        # What could be read despite the errors (config.Settings), so that `check` can
        # go on to the policies and report their errors in the same run.
        self.partial = partial


@dataclass
class Errors:
    """Every problem found while loading, each already prefixed with file and key."""

    messages: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.messages.append(message)

    def __bool__(self) -> bool:
        return bool(self.messages)


def parse_duration(value: object) -> float:
    """Seconds from 30, "30s", "5m", "1h", "5d" or "250ms"."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError


def parse_size(value: object) -> int:
    """Bytes from 1048576, "512K", "25M" or "1G"."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    raise ValueError


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """("::1", 25) from "[::1]:25", ("mx.example", 587) from "mx.example:587"."""
    host, sep, port = value.rpartition(":")
    if value.startswith("[") and "]" in value:
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        sep = ":" if port else ""
    elif not sep or ":" in host:
        host, port = value, ""
    if not port:
        if default_port is None:
            raise ValueError
        return host, default_port
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError
    return host, int(port)


class Table:
    """A view of one TOML table that reads typed keys and remembers what it read.

    Each getter returns a usable value even on error (the default), so loading goes
    on and every mistake in the file is reported in one run.
    """

    def __init__(self, data: dict[str, Any], path: str, source: str, errors: Errors) -> None:
        self.data = data
        self.path = path
        self.source = source
        self.errors = errors
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> None:
        self.errors.add(f"{self.source}: {self.key(name)}: {message}")

    def has(self, name: str) -> bool:
        return name in self.data

    def value(self, name: str, default: T, convert: Callable[[Any], T], expected: str) -> T:
        """`name` converted by `convert` (which raises ValueError or TypeError on a bad
        value, reported as "expected <expected>"), or `default`."""
        self._seen.add(name)
        if name not in self.data:
            return default
        raw = self.data[name]
        try:
            return convert(raw)
        except (ValueError, TypeError):
            self.error(name, f"expected {expected}, got {raw!r}")
            return default

    def string(self, name: str, default: str, choices: tuple[str, ...] = ()) -> str:
        def convert(raw: Any) -> str:
            if not isinstance(raw, str):
                raise TypeError
            return raw

        value = self.value(name, default, convert, "a string")
        if choices and value not in choices:
            self.error(name, f"must be one of {', '.join(choices)}, got {value!r}")
            return default
        return value

    def boolean(self, name: str, default: bool) -> bool:
        def convert(raw: Any) -> bool:
            if not isinstance(raw, bool):
                raise TypeError
            return raw

        return self.value(name, default, convert, "true or false")

    def integer(self, name: str, default: int, low: int, high: int | None) -> int:
        """An integer in low..high (high None: no upper bound)."""
        def convert(raw: Any) -> int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise TypeError
            return raw

        value = self.value(name, default, convert, "an integer")
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"{low}..{high}"
            self.error(name, f"must be {bounds}, got {value}")
            return default
        return value

    def duration(self, name: str, default: float, low: float = 0.0) -> float:
        value = self.value(name, default, parse_duration,
                           'a duration: seconds, or a number with ms, s, m, h or d ("30s", '
                           '"5m", "1h")')
        if value < low:
            self.error(name, f"must be at least {low:g}s, got {value:g}s")
            return default
        return value

    def size(self, name: str, default: int, low: int = 0) -> int:
        value = self.value(name, default, parse_size,
                           'a size: bytes, or a number with K, M or G (1024-based: "512K", '
                           '"25M"; no "B")')
        if value < low:
            self.error(name, f"must be at least {low} bytes, got {value}")
            return default
        return value

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        def convert(raw: Any) -> tuple[str, ...]:
            if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
                raise TypeError
            return tuple(raw)

        return self.value(name, default, convert, "a list of strings")

    def networks(self, name: str, default: tuple[IPNetwork, ...]) -> tuple[IPNetwork, ...]:
        result = []
        for item in self.strings(name, ()) if self.has(name) else ():
            try:
                result.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.error(name, f"expected an IP address or CIDR network, got {item!r}")
        return tuple(result) if self.has(name) else default

    def table(self, name: str) -> Table:
        self._seen.add(name)
        raw = self.data.get(name, {})
        if not isinstance(raw, dict):
            self.error(name, f"expected a table, got {raw!r}")
            raw = {}
        return Table(raw, self.key(name), self.source, self.errors)

    def table_list(self, name: str) -> list[Table]:
        """The entries of an array of tables ([[dkim.key]] ...), each named `name[i]`."""
        self._seen.add(name)
        raw = self.data.get(name, [])
        if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
            self.error(name, f"expected [[{self.key(name)}]] tables, got {raw!r}")
            return []
        return [
            Table(item, f"{self.key(name)}[{index}]", self.source, self.errors)
            for index, item in enumerate(raw)
        ]

    def tables(self, name: str) -> dict[str, Table]:
        """The named sub-tables of `name` ([upstream.default], [upstream.bulk], ...)."""
        outer = self.table(name)
        result = {}
        for sub in list(outer.data):
            result[sub] = outer.table(sub)
        return result

    def finish(self) -> None:
        """Report the keys nobody asked for: a typo must not be silently ignored."""
        for name in self.data:
            if name not in self._seen:
                self.error(name, "unknown key")
