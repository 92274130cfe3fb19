"""[metrics] and [control]: how operators and monitoring reach a running relay."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from relay.schema import Table, parse_hostport


@dataclass(frozen=True, slots=True)
class OpsSettings:
    """[metrics] and [control]: how operators and monitoring reach a running relay."""

    metrics_listen: str = "127.0.0.1:9725"  # "" = no metrics endpoint
    control_socket: str = ""
    control_group: str = ""

    @property
    def control_socket_path(self) -> Path:
        return resolve_control_socket(self.control_socket)


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


def read_ops(root: Table) -> OpsSettings:
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
