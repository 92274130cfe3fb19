"""[queue]: where the spool lives and how long and how often delivery is retried."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from relay.schema import Table, parse_duration


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
    _spool_path: Path | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def spool_path(self) -> Path:
        """Resolved at first use and kept: it is asked at every MAIL (free space)."""
        path = self._spool_path
        if path is None:
            path = resolve_spool_dir(self.spool_dir)
            object.__setattr__(self, "_spool_path", path)
        return path


def resolve_spool_dir(configured: str) -> Path:
    """The configured directory, else systemd's StateDirectory, else a per-user state dir."""
    if configured:
        return Path(configured)
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0]) / "spool"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "policy-relay" / "spool"


def read_queue(table: Table) -> QueueSettings:
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
