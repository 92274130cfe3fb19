"""Conditions: failures that repeat (a full disk, Redis down, an upstream group down) and
states of stress (too many connections),
logged once when they start and once when they end with how often they recurred
meanwhile, never once per message; /readyz and the relay_condition_* metrics show them.

Each part reports what it sees (`failing` on every occurrence, `cleared` on the first
success) and this module alone decides what is logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("relay.conditions")

# The names a condition may have (also the values of the metrics' `condition` label).
DISK_FULL = "disk_full"
SPOOL_UNWRITABLE = "spool_unwritable"
REDIS_DOWN = "redis_down"
UPSTREAM_DOWN = "upstream_down"
# More clients connected than pressure_threshold of max_connections (Postfix's stress
# mode): slow sessions are closed first and idle ones sooner (relay/inbound/connlimits.py).
SMTPD_PRESSURE = "smtpd_pressure"


@dataclass(slots=True)
class Condition:
    """One condition in force: since when, how often it recurred, what it costs."""

    name: str
    subject: str  # what it is about: an upstream group's name, "" for the relay's own parts
    detail: str  # the first failure, as it was logged
    unit: str  # what `count` counts ("refused writes", "deliveries set aside")
    blocks_mail: bool  # whether new mail is refused meanwhile: /readyz says 503
    since: float
    count: int = 0
    reports: int = 0  # calls of failing(): the first one started it

    @property
    def label(self) -> str:
        return f"{self.name} {self.subject}".rstrip()


# Told (condition, in force, occurrences added) at every call of failing and cleared.
Watcher = Callable[[Condition, bool, int], None]


class Conditions:
    """The conditions in force in this process, keyed by (name, subject)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._active: dict[tuple[str, str], Condition] = {}
        # The metrics, and with workers the supervisor.
        self.watchers: list[Watcher] = []

    def __repr__(self) -> str:
        return f"<Conditions {' '.join(c.label for c in self._active.values()) or 'none'}>"

    def failing(
        self, name: str, detail: str, *, subject: str = "", unit: str = "occurrences",
        consequence: str = "", blocks_mail: bool = False, added: int = 1,
    ) -> None:
        """`added` more occurrences of `name` (0: the condition holds, nothing counted
        yet): the first call starts the condition and logs `detail` and its
        `consequence` for mail."""
        condition = self._active.get((name, subject))
        if condition is None:
            condition = Condition(name, subject, detail, unit, blocks_mail, self.clock())
            self._active[(name, subject)] = condition
            log.error("%s started: %s%s", condition.label, detail,
                      f"; {consequence}" if consequence else "")
        condition.count += added
        condition.reports += 1
        for watch in self.watchers:
            watch(condition, True, added)

    def cleared(self, name: str, subject: str = "") -> None:
        """`name` is over (a write, a Redis call, a delivery succeeded): logged once."""
        condition = self._active.pop((name, subject), None)
        if condition is None:
            return
        log.warning("%s ended after %.0fs and %d %s", condition.label,
                    self.clock() - condition.since, condition.count, condition.unit)
        for watch in self.watchers:
            watch(condition, False, 0)

    def active(self, name: str, subject: str = "") -> bool:
        return (name, subject) in self._active

    @property
    def current(self) -> list[Condition]:
        return list(self._active.values())

    def readiness(self) -> tuple[bool, list[str]]:
        """(no condition blocks mail, one line per condition in force) for /readyz."""
        lines = [f"{c.label}: since {self.clock() - c.since:.0f}s, {c.count} {c.unit}"
                 for c in self._active.values()]
        return not any(c.blocks_mail for c in self._active.values()), lines
