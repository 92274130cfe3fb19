"""Listening sockets: their settings, as read from the [listener.NAME] tables."""

from __future__ import annotations

from dataclasses import dataclass

from relay.inbound.tls import load_problem
from relay.ipaddr import LOOPBACK_NETWORKS, IPNetwork
from relay.schema import Table, parse_hostport

DEFAULT_LISTEN = "127.0.0.1:2525"
# RFC 3207 STARTTLS, or RFC 8314 implicit TLS from the first byte (port 465 style); the
# upstream settings take the same modes.
TLS_MODES = ("none", "starttls", "implicit")
AUTH_MODES = ("off", "optional", "required")


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    name: str
    host: str
    port: int
    # "starttls" offers STARTTLS (RFC 3207); "implicit" speaks TLS from the first byte
    # (RFC 8314, port 465 style).
    tls: str = "none"
    tls_cert: str = ""
    tls_key: str = ""
    # RFC 3207 section 4: refuse everything but EHLO, NOOP, STARTTLS and QUIT before TLS.
    require_tls: bool = False
    auth: str = "off"
    users_file: str = ""
    # AUTH in plaintext is allowed only when this is set and the client is on loopback.
    auth_plaintext_loopback: bool = False
    proxy_protocol: bool = False
    # Peers allowed to send a PROXY header (the load balancers); others are hung up on.
    proxy_networks: tuple[IPNetwork, ...] = LOOPBACK_NETWORKS
    proxy_timeout: float = 5.0

    @property
    def implicit_tls(self) -> bool:
        return self.tls == "implicit"


def read_listeners(root: Table) -> tuple[ListenerSettings, ...]:
    listeners = []
    for name, table in root.tables("listener").items():
        base = ListenerSettings(name, *parse_hostport(DEFAULT_LISTEN))
        address = table.string("address", DEFAULT_LISTEN)
        try:
            host, port = parse_hostport(address)
        except ValueError:
            table.error("address", f'expected "ADDRESS:PORT", got {address!r}')
            host, port = base.host, base.port
        listener = ListenerSettings(
            name,
            host,
            port,
            tls=table.string("tls", base.tls, TLS_MODES),
            tls_cert=table.string("tls_cert", base.tls_cert),
            tls_key=table.string("tls_key", base.tls_key),
            require_tls=table.boolean("require_tls", base.require_tls),
            auth=table.string("auth", base.auth, AUTH_MODES),
            users_file=table.string("users_file", base.users_file),
            auth_plaintext_loopback=table.boolean(
                "auth_plaintext_loopback", base.auth_plaintext_loopback
            ),
            proxy_protocol=table.boolean("proxy_protocol", base.proxy_protocol),
            proxy_networks=table.networks("proxy_networks", base.proxy_networks),
            proxy_timeout=table.duration("proxy_timeout", base.proxy_timeout, low=0.1),
        )
        _check(table, listener)
        listeners.append(listener)
        table.finish()
    return tuple(listeners)


def unreadable(path: str) -> str | None:
    """Why this process cannot open `path` for reading, or None if it can."""
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def _check(table: Table, listener: ListenerSettings) -> None:
    if listener.tls != "none":
        if not listener.tls_cert or not listener.tls_key:
            table.error("tls", f'"{listener.tls}" needs tls_cert and tls_key')
        elif problem := load_problem(listener.tls_cert, listener.tls_key):
            table.error("tls_cert", f"cannot load {listener.tls_cert} / {listener.tls_key}: "
                                    f"{problem}")
    if listener.require_tls and listener.tls != "starttls":
        table.error("require_tls", 'only meaningful with tls = "starttls"')
    if listener.auth != "off" and not listener.users_file:
        table.error("auth", f'"{listener.auth}" needs users_file')
    elif listener.auth != "off" and (problem := unreadable(listener.users_file)):
        # Read at every AUTH: a file the relay's user cannot open would answer every
        # AUTH 454, so `check` (ExecStartPre, as the service user) says so first.
        table.error("users_file", f"cannot read {listener.users_file}: {problem}")
    if listener.auth == "required" and listener.tls == "none" and (
        not listener.auth_plaintext_loopback
    ):
        table.error("auth", '"required" needs TLS (or auth_plaintext_loopback for loopback)')
