"""Listening sockets: their settings, as read from the [listener.NAME] tables."""

from __future__ import annotations

from dataclasses import dataclass

from relay.schema import Table, parse_hostport

DEFAULT_LISTEN = "127.0.0.1:2525"


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    name: str
    host: str
    port: int


def read_listeners(root: Table) -> tuple[ListenerSettings, ...]:
    listeners = []
    for name, table in root.tables("listener").items():
        address = table.string("address", DEFAULT_LISTEN)
        try:
            host, port = parse_hostport(address)
        except ValueError:
            table.error("address", f'expected "ADDRESS:PORT", got {address!r}')
            host, port = parse_hostport(DEFAULT_LISTEN)
        listeners.append(ListenerSettings(name, host, port))
        table.finish()
    return tuple(listeners)
