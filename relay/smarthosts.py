"""Upstream smarthost groups: their settings, as read from the [upstream.NAME] tables."""

from __future__ import annotations

from dataclasses import dataclass

from relay.schema import Table, parse_hostport

DEFAULT_UPSTREAM = "127.0.0.1:25"


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    name: str
    hosts: tuple[tuple[str, int], ...] = (parse_hostport(DEFAULT_UPSTREAM),)
    pool_size: int = 4
    max_messages_per_connection: int = 100
    idle_timeout: float = 60.0
    # A connection idle for longer than this is checked with NOOP before reuse.
    check_after_idle: float = 5.0
    connect_timeout: float = 30.0
    command_timeout: float = 60.0
    # RFC 5321 section 4.5.3.2.6: a client waits 10 minutes for the final-dot reply.
    data_timeout: float = 600.0


def read_upstreams(root: Table) -> dict[str, UpstreamSettings]:
    groups = {}
    for name, table in root.tables("upstream").items():
        base = UpstreamSettings(name)
        hosts = []
        for item in table.strings("hosts", ()):
            try:
                hosts.append(parse_hostport(item, default_port=25))
            except ValueError:
                table.error("hosts", f'expected "HOST:PORT", got {item!r}')
        if table.has("hosts") and not table.strings("hosts", ()):
            table.error("hosts", "must name at least one host")
        groups[name] = UpstreamSettings(
            name=name,
            hosts=tuple(hosts) or base.hosts,
            pool_size=table.integer("pool_size", base.pool_size, 1, 1000),
            max_messages_per_connection=table.integer(
                "max_messages_per_connection", base.max_messages_per_connection, 1, 1_000_000
            ),
            idle_timeout=table.duration("idle_timeout", base.idle_timeout),
            check_after_idle=table.duration("check_after_idle", base.check_after_idle),
            connect_timeout=table.duration("connect_timeout", base.connect_timeout, low=0.1),
            command_timeout=table.duration("command_timeout", base.command_timeout, low=0.1),
            data_timeout=table.duration("data_timeout", base.data_timeout, low=0.1),
        )
        table.finish()
    if groups and "default" not in groups:
        root.errors.add(f"{root.source}: upstream: a group named \"default\" is required")
    return groups
