"""The relay's settings: embedded defaults, config.toml, command-line overrides, all validated."""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from relay.checks.settings import CheckSettings, read_check_settings
from relay.inbound.listeners import DEFAULT_LISTEN, ListenerSettings, read_listeners
from relay.ipaddr import LOOPBACK_NETWORKS, IPNetwork
from relay.outbound.smarthosts import UpstreamSettings, read_upstreams
from relay.schema import ConfigError as ConfigError
from relay.schema import Errors, Table, parse_duration, parse_hostport


@dataclass(frozen=True, slots=True)
class QueueSettings:
    spool_dir: str = ""
    delivery_workers: int = 20
    minimal_backoff: float = 60.0
    maximal_backoff: float = 3600.0
    max_lifetime: float = 5 * 86400.0
    # Waits after the 1st, 2nd, ... failed attempt (the last one repeats); empty means
    # exponential from minimal_backoff to maximal_backoff.
    retry_schedule: tuple[float, ...] = ()
    on_permanent_failure: str = "bounce"  # "bounce" (RFC 3464 DSN) or "hold"


@dataclass(frozen=True, slots=True)
class OpsSettings:
    """[metrics] and [control]: how operators and monitoring reach a running relay."""

    metrics_listen: str = "127.0.0.1:9725"  # "" = no metrics endpoint
    control_socket: str = ""
    control_group: str = ""

    @property
    def control_socket_path(self) -> Path:
        return resolve_control_socket(self.control_socket)


@dataclass(frozen=True, slots=True)
class Settings:
    hostname: str = ""
    relay_networks: tuple[IPNetwork, ...] = LOOPBACK_NETWORKS
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 1000
    # Inbound limits (relay/smtpserver.py, relay/inbound.py, relay/connlimits.py).
    max_line_length: int = 998
    max_header_size: int = 100 * 1024
    max_hops: int = 50
    max_connections: int = 100
    max_connections_per_client: int = 20
    idle_timeout: float = 300.0
    session_timeout: float = 1800.0
    max_errors: int = 20
    max_auth_failures: int = 5
    min_free_space: int = 100 * 1024 * 1024
    max_data_memory: int = 256 * 1024 * 1024
    workers: int = 1
    policies_dir: str = ""
    listeners: tuple[ListenerSettings, ...] = (
        ListenerSettings("smtp", *parse_hostport(DEFAULT_LISTEN)),
    )
    upstreams: dict[str, UpstreamSettings] = field(
        default_factory=lambda: {"default": UpstreamSettings("default")}
    )
    queue: QueueSettings = QueueSettings()
    checks: CheckSettings = field(default_factory=CheckSettings)
    ops: OpsSettings = OpsSettings()
    log_level: str = "info"
    log_format: str = "text"
    source: str = "<embedded defaults>"

    @property
    def spool_path(self) -> Path:
        return resolve_spool_dir(self.queue.spool_dir)

    @property
    def smtp_hostname(self) -> str:
        return self.hostname or socket.getfqdn()


def resolve_spool_dir(configured: str) -> Path:
    """The configured directory, else systemd's StateDirectory, else a per-user state dir."""
    if configured:
        return Path(configured)
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0]) / "spool"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "policy-relay" / "spool"


def resolve_control_socket(configured: str) -> Path:
    """The configured path, else systemd's RuntimeDirectory (also where root's shell
    finds it), else a per-user runtime directory: the server and the queue CLI, run the
    same way, agree on it without configuration."""
    if configured:
        return Path(configured)
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return Path(runtime.split(":")[0]) / "control.sock"
    if os.geteuid() == 0:
        return Path("/run/policy-relay/control.sock")
    base = os.environ.get("XDG_RUNTIME_DIR") or str(Path.home() / ".local" / "state")
    return Path(base) / "policy-relay" / "control.sock"


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
        raise ConfigError(errors.messages)
    return settings


def _read(root: Table, source: str) -> Settings:
    base = Settings()
    server = root.table("server")
    log = root.table("log")
    settings = Settings(
        hostname=server.string("hostname", base.hostname),
        relay_networks=server.networks("relay_networks", base.relay_networks),
        max_message_size=server.size("max_message_size", base.max_message_size, low=1024),
        max_recipients=server.integer("max_recipients", base.max_recipients, 1, 100000),
        max_line_length=server.integer("max_line_length", base.max_line_length, 998, 1000000),
        max_header_size=server.size("max_header_size", base.max_header_size, low=1024),
        max_hops=server.integer("max_hops", base.max_hops, 1, 1000),
        max_connections=server.integer("max_connections", base.max_connections, 1, 100000),
        max_connections_per_client=server.integer(
            "max_connections_per_client", base.max_connections_per_client, 1, 100000
        ),
        idle_timeout=server.duration("idle_timeout", base.idle_timeout, low=1.0),
        session_timeout=server.duration("session_timeout", base.session_timeout, low=1.0),
        max_errors=server.integer("max_errors", base.max_errors, 1, 10000),
        max_auth_failures=server.integer("max_auth_failures", base.max_auth_failures, 1, 10000),
        min_free_space=server.size("min_free_space", base.min_free_space),
        max_data_memory=server.size("max_data_memory", base.max_data_memory, low=1024),
        workers=server.integer("workers", base.workers, 1, 64),
        policies_dir=server.string("policies_dir", base.policies_dir),
        listeners=read_listeners(root) or base.listeners,
        upstreams=read_upstreams(root) or base.upstreams,
        queue=_read_queue(root.table("queue")),
        checks=read_check_settings(root),
        ops=_read_ops(root),
        log_level=log.string("level", base.log_level, ("debug", "info", "warning", "error")),
        log_format=log.string("format", base.log_format, ("text", "json")),
        source=source,
    )
    server.finish()
    log.finish()
    root.finish()
    return settings


def _read_ops(root: Table) -> OpsSettings:
    base = OpsSettings()
    metrics, control = root.table("metrics"), root.table("control")
    listen = metrics.string("listen", base.metrics_listen)
    if listen:
        try:
            parse_hostport(listen)
        except ValueError:
            metrics.error("listen", f'expected "ADDRESS:PORT" or "", got {listen!r}')
            listen = base.metrics_listen
    ops = OpsSettings(
        metrics_listen=listen,
        control_socket=control.string("socket", base.control_socket),
        control_group=control.string("group", base.control_group),
    )
    metrics.finish()
    control.finish()
    return ops


def _read_queue(table: Table) -> QueueSettings:
    base = QueueSettings()
    schedule = []
    for item in table.strings("retry_schedule", ()):
        try:
            schedule.append(parse_duration(item))
        except ValueError:
            table.error("retry_schedule", f'expected durations such as "5m", got {item!r}')
    queue = QueueSettings(
        spool_dir=table.string("spool_dir", base.spool_dir),
        delivery_workers=table.integer("delivery_workers", base.delivery_workers, 1, 10000),
        minimal_backoff=table.duration("minimal_backoff", base.minimal_backoff, low=0.1),
        maximal_backoff=table.duration("maximal_backoff", base.maximal_backoff, low=0.1),
        max_lifetime=table.duration("max_lifetime", base.max_lifetime),
        retry_schedule=tuple(schedule),
        on_permanent_failure=table.string(
            "on_permanent_failure", base.on_permanent_failure, ("bounce", "hold")
        ),
    )
    if queue.maximal_backoff < queue.minimal_backoff:
        table.error("maximal_backoff", "must not be shorter than minimal_backoff")
    table.finish()
    return queue


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
