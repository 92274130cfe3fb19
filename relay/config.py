"""The relay's settings: embedded defaults, config.toml, command-line overrides, all validated.

Each package reads its own section (relay/inbound/settings.py, relay/queue/settings.py,
relay/checks/settings.py, ...) through the one schema reader; this module assembles them.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from relay.address import problem
from relay.checks.settings import CheckSettings, read_check_settings
from relay.events.settings import (
    EventSettings,
    SuppressionSettings,
    read_events,
    read_suppression,
)
from relay.inbound.listeners import DEFAULT_LISTEN, ListenerSettings, read_listeners
from relay.inbound.settings import InboundSettings, read_inbound
from relay.ipaddr import LOOPBACK_NETWORKS, IPNetwork
from relay.ops.settings import OpsSettings, read_ops
from relay.outbound.smarthosts import UpstreamSettings, read_upstreams
from relay.queue.settings import QueueSettings, read_queue
from relay.schema import ConfigError as ConfigError
from relay.schema import Errors, Table, parse_hostport


@dataclass(frozen=True, slots=True)
class Settings:
    hostname: str = ""
    relay_networks: tuple[IPNetwork, ...] = LOOPBACK_NETWORKS
    qualify_domain: str = ""
    inbound: InboundSettings = field(default_factory=InboundSettings)
    workers: int = 0  # 0: "auto", one per CPU core
    policies_dir: str = ""
    listeners: tuple[ListenerSettings, ...] = (
        ListenerSettings("smtp", *parse_hostport(DEFAULT_LISTEN)),
    )
    upstreams: dict[str, UpstreamSettings] = field(
        default_factory=lambda: {"default": UpstreamSettings("default")}
    )
    queue: QueueSettings = field(default_factory=QueueSettings)
    checks: CheckSettings = field(default_factory=CheckSettings)
    ops: OpsSettings = field(default_factory=OpsSettings)
    events: EventSettings = field(default_factory=EventSettings)
    suppression: SuppressionSettings = field(default_factory=SuppressionSettings)
    log_level: str = "info"
    log_format: str = "text"
    source: str = "<embedded defaults>"

    @property
    def spool_path(self) -> Path:
        return self.queue.spool_path

    @property
    def worker_count(self) -> int:
        """The worker processes to run: `workers`, or one per usable CPU core for "auto"."""
        return self.workers or len(os.sched_getaffinity(0)) or 1

    @property
    def smtp_hostname(self) -> str:
        return self.hostname or system_fqdn()


@functools.cache
def system_fqdn() -> str:
    """The machine's fully qualified name as `hostname -f` gives it: the canonical name
    of gethostname() (getaddrinfo with AI_CANONNAME), else the plain host name.

    socket.getfqdn() differs: it takes the first alias of a reverse lookup, "localhost"
    on machines whose /etc/hosts lists it first. Looked up once per process.
    """
    name = socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, None, flags=socket.AI_CANONNAME)
    except OSError:
        return name
    return next((info[3] for info in infos if info[3]), name)


def is_localhost(name: str) -> bool:
    """A name no other host can use to reach this one (RFC 6761 section 6.3)."""
    name = name.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost") or name.startswith("localhost.")


@dataclass(frozen=True, slots=True)
class Overrides:
    """The `serve` flags that replace settings, so a quick start needs no file."""

    listen: tuple[str, ...] = ()
    upstream: str | None = None
    spool_dir: str | None = None
    policies_dir: str | None = None
    hostname: str | None = None
    allow: tuple[str, ...] = ()
    metrics: str | None = None
    control_socket: str | None = None


def load(path: str | Path | None, overrides: Overrides | None = None) -> Settings:
    """Read settings from `path` (None: the embedded defaults), then apply `overrides`."""
    errors = Errors()
    data: dict[str, Any] = {}
    source = "<embedded defaults>"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([f"{source}: cannot read: {exc.strerror}"]) from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{source}: {exc}"]) from exc
    settings = _read(Table(data, "", source, errors), source)
    if overrides is not None:
        settings = _apply(settings, overrides, errors)
    if errors:
        raise ConfigError(errors.messages, partial=settings)
    return settings


def _read(root: Table, source: str) -> Settings:
    base = Settings()
    server = root.table("server")
    log = root.table("log")
    settings = Settings(
        hostname=server.string("hostname", base.hostname),
        relay_networks=server.networks("relay_networks", base.relay_networks),
        qualify_domain=read_qualify_domain(server, base.qualify_domain),
        inbound=read_inbound(server),
        workers=read_workers(server, base.workers),
        policies_dir=server.string("policies_dir", base.policies_dir),
        listeners=read_listeners(root) or base.listeners,
        upstreams=read_upstreams(root) or base.upstreams,
        queue=read_queue(root.table("queue")),
        checks=read_check_settings(root),
        ops=read_ops(root),
        events=read_events(root),
        suppression=read_suppression(root),
        log_level=log.string("level", base.log_level, ("debug", "info", "warning", "error")),
        log_format=log.string("format", base.log_format, ("text", "json")),
        source=source,
    )
    server.finish()
    log.finish()
    root.finish()
    return settings


def read_qualify_domain(server: Table, default: str) -> str:
    """[server] qualify_domain: "" or a domain that makes "user@domain" a valid address."""

    def convert(raw: Any) -> str:
        if not isinstance(raw, str) or (raw and problem(f"postmaster@{raw}")):
            raise ValueError
        return raw.lower()

    return server.value("qualify_domain", default, convert, 'a domain name such as "example.com"')


def read_workers(server: Table, default: int) -> int:
    """[server] workers: "auto" (0 here) or 1..64."""

    def convert(raw: Any) -> int:
        if raw == "auto":
            return 0
        if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 64:
            raise ValueError
        return raw

    return server.value("workers", default, convert, '"auto" or an integer 1..64')


def _apply(settings: Settings, flags: Overrides, errors: Errors) -> Settings:
    changes: dict[str, Any] = {}
    if flags.listen:
        listeners = []
        for index, item in enumerate(flags.listen, start=1):
            try:
                host, port = parse_hostport(item)
            except ValueError:
                errors.add(f'--listen: expected "ADDRESS:PORT", got {item!r}')
                continue
            listeners.append(ListenerSettings("smtp" if index == 1 else f"smtp{index}", host, port))
        changes["listeners"] = tuple(listeners)
    if flags.upstream is not None:
        try:
            host, port = parse_hostport(flags.upstream, default_port=25)
        except ValueError:
            errors.add(f'--upstream: expected "HOST:PORT", got {flags.upstream!r}')
        else:
            default = replace(settings.upstreams["default"], hosts=((host, port),))
            changes["upstreams"] = {**settings.upstreams, "default": default}
    if flags.spool_dir is not None:
        changes["queue"] = replace(settings.queue, spool_dir=flags.spool_dir)
    if flags.policies_dir is not None:
        changes["policies_dir"] = flags.policies_dir
    if flags.hostname is not None:
        changes["hostname"] = flags.hostname
    if flags.metrics is not None or flags.control_socket is not None:
        changes["ops"] = replace(
            settings.ops,
            metrics_listen=settings.ops.metrics_listen if flags.metrics is None else flags.metrics,
            control_socket=settings.ops.control_socket
            if flags.control_socket is None else flags.control_socket,
        )
    if flags.allow:
        networks = []
        for item in flags.allow:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                errors.add(f"--allow: expected an IP address or CIDR network, got {item!r}")
        changes["relay_networks"] = tuple(networks)
    return replace(settings, **changes)
