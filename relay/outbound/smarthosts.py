"""Upstream smarthost groups: their settings, as read from the [upstream.NAME] tables."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.inbound.listeners import TLS_MODES
from relay.schema import Table, parse_duration, parse_hostport

DEFAULT_UPSTREAM = "127.0.0.1:25"
AUTH_MECHANISMS = ("auto", "plain", "login", "xoauth2")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\S+)\s*$")


@dataclass(frozen=True, slots=True)
class Smarthost:
    """One host of a group. Lower `priority` is tried first (as with MX preference);
    hosts of one priority share the load in proportion to `weight`."""

    host: str
    port: int
    priority: int = 0
    weight: int = 1

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    name: str
    # Addresses in configured order; `ranks` holds (priority, weight) for each. Kept
    # apart so that `--upstream HOST:PORT` can replace `hosts` alone (see `members`).
    hosts: tuple[tuple[str, int], ...] = (parse_hostport(DEFAULT_UPSTREAM),)
    ranks: tuple[tuple[int, int], ...] = ((0, 1),)
    pool_size: int = 8
    max_messages_per_connection: int = 100
    idle_timeout: float = 60.0
    # A connection idle for longer than this is checked with NOOP before reuse.
    check_after_idle: float = 5.0
    connect_timeout: float = 30.0
    command_timeout: float = 60.0
    # RFC 5321 section 4.5.3.2.6: a client waits 10 minutes for the final-dot reply.
    data_timeout: float = 600.0
    # Circuit breaker: a host failing this many times in a row is skipped for
    # `down_pause`, then probed again with one delivery.
    down_after_failures: int = 3
    down_pause: float = 30.0
    tls: str = "none"
    tls_verify: bool = True
    tls_ca_file: str = ""
    tls_server_name: str = ""
    tls_client_cert: str = ""
    tls_client_key: str = ""
    auth_username: str = ""
    auth_mechanism: str = "auto"
    password_file: str = ""
    # Read from `password_file` at load; never shown by repr() and never logged.
    password: str = field(default="", repr=False)
    # Shaping: 0 means no limit of the group's own.
    max_concurrent: int = 0
    max_rate: float = 0.0  # messages per second

    @property
    def members(self) -> tuple[Smarthost, ...]:
        ranks = self.ranks if len(self.ranks) == len(self.hosts) else [
            (i, 1) for i in range(len(self.hosts))
        ]
        return tuple(
            Smarthost(host, port, priority, weight)
            for (host, port), (priority, weight) in zip(self.hosts, ranks, strict=True)
        )


def parse_rate(value: object) -> float:
    """Messages per second from "14/s", "600/1m", "5000/1h"; "" is no limit (0)."""
    if value == "":
        return 0.0
    if not isinstance(value, str) or not (m := _RATE.match(value)):
        raise ValueError
    period = m.group(2)
    seconds = parse_duration(period if period[0].isdigit() else f"1{period}")
    if seconds <= 0:
        raise ValueError
    return float(m.group(1)) / seconds


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_hosts(table: Table) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[int, int], ...]]:
    """`hosts = ["mx1:587", {address = "mx2:587", priority = 10, weight = 2}]`."""

    def as_list(raw: Any) -> list[Any]:
        if not isinstance(raw, list):
            raise TypeError
        return raw

    items: list[Any] = table.value("hosts", [], as_list, 'a list of "HOST:PORT" strings or tables')
    if table.has("hosts") and isinstance(table.data["hosts"], list) and not items:
        table.error("hosts", "must name at least one host")
    hosts, ranks = [], []
    for index, item in enumerate(items):
        key = f"{table.key('hosts')}[{index}]"
        address, priority, weight = item, index, 1
        if isinstance(item, dict):
            entry = Table(item, key, table.source, table.errors)
            address = entry.string("address", "")
            priority = entry.integer("priority", index, 0, 65535)
            weight = entry.integer("weight", 1, 1, 1000)
            entry.finish()
        try:
            if not isinstance(address, str):
                raise ValueError
            hosts.append(parse_hostport(address, default_port=25))
            ranks.append((priority, weight))
        except ValueError:
            table.errors.add(f'{table.source}: {key}: expected "HOST:PORT", got {address!r}')
    return tuple(hosts), tuple(ranks)


def _readable(table: Table, name: str) -> str:
    path = table.string(name, "")
    if path and not Path(path).is_file():
        table.error(name, f"cannot read {path!r}: no such file")
    return path


def read_upstreams(root: Table) -> dict[str, UpstreamSettings]:
    groups = {}
    for name, table in root.tables("upstream").items():
        base = UpstreamSettings(name)
        hosts, ranks = _read_hosts(table)
        tls = table.string("tls", base.tls, TLS_MODES)
        username = table.string("auth_username", base.auth_username)
        password_file = table.string("password_file", base.password_file)
        password = ""
        if password_file:
            try:
                # One trailing newline is the editor's, not the password's.
                password = Path(password_file).read_text(encoding="utf-8").removesuffix("\n")
            except (OSError, UnicodeDecodeError) as exc:
                why = getattr(exc, "strerror", None) or str(exc)
                table.error("password_file", f"cannot read {password_file!r}: {why}")
        if username and not password_file:
            table.error("password_file", "required when auth_username is set")
        if username and tls == "none" and not all(_is_loopback(h) for h, _ in hosts or base.hosts):
            # RFC 4954 section 4: credentials go only over a protected connection.
            table.error("auth_username", 'AUTH needs tls = "starttls" or "implicit" '
                        "unless every host is on loopback")
        group = UpstreamSettings(
            name=name,
            hosts=hosts or base.hosts,
            ranks=ranks if hosts else base.ranks,
            pool_size=table.integer("pool_size", base.pool_size, 1, 1000),
            max_messages_per_connection=table.integer(
                "max_messages_per_connection", base.max_messages_per_connection, 1, 1_000_000
            ),
            idle_timeout=table.duration("idle_timeout", base.idle_timeout),
            check_after_idle=table.duration("check_after_idle", base.check_after_idle),
            connect_timeout=table.duration("connect_timeout", base.connect_timeout, low=0.1),
            command_timeout=table.duration("command_timeout", base.command_timeout, low=0.1),
            data_timeout=table.duration("data_timeout", base.data_timeout, low=0.1),
            down_after_failures=table.integer(
                "down_after_failures", base.down_after_failures, 1, 1000
            ),
            down_pause=table.duration("down_pause", base.down_pause, low=0.1),
            tls=tls,
            tls_verify=table.boolean("tls_verify", base.tls_verify),
            tls_ca_file=_readable(table, "tls_ca_file"),
            tls_server_name=table.string("tls_server_name", base.tls_server_name),
            tls_client_cert=_readable(table, "tls_client_cert"),
            tls_client_key=_readable(table, "tls_client_key"),
            auth_username=username,
            auth_mechanism=table.string("auth_mechanism", base.auth_mechanism, AUTH_MECHANISMS),
            password_file=password_file,
            password=password,
            max_concurrent=table.integer("max_concurrent", base.max_concurrent, 0, 100_000),
            max_rate=table.value(
                "max_rate", base.max_rate, parse_rate, 'a rate such as "14/s" or "600/1m", or ""'
            ),
        )
        if group.tls_client_key and not group.tls_client_cert:
            table.error("tls_client_key", "needs tls_client_cert")
        groups[name] = group
        table.finish()
    if groups and "default" not in groups:
        root.errors.add(f"{root.source}: upstream: a group named \"default\" is required")
    return groups
