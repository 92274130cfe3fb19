"""Whether an upstream host is worth trying: a circuit breaker, plain state on a clock.

After `down_after` failures in a row the host is down for `pause` seconds; then one
delivery may probe it (the others wait without an attempt), and the probe's success
brings it back at once. Only what says the host itself is unwell counts as a failure:
connection errors, timeouts, TLS or AUTH trouble, 421, and a 4xx to the greeting,
EHLO, MAIL or DATA. A recipient refused at RCPT (greylisting, an unknown mailbox) or a
5xx to DATA says nothing about the host.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

log = logging.getLogger("relay.outbound")


class HostHealth:
    """The circuit breaker of one upstream host."""

    def __init__(
        self,
        name: str,
        down_after: int,
        pause: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.down_after = down_after
        self.pause = pause
        self.clock = clock
        self.wall = wall
        self.failures = 0
        self.last_failure = ""
        self.down_until = -math.inf
        self.down_since = 0.0  # wall-clock time it was marked down, for the log
        self.probing = False
        self.verdicts = 0  # how many failures and successes were reported, in all
        # Set while a connection has been open a while without the greeting: a
        # blackhole upstream shows here before the connect timeout ends the attempt.
        self.stalled = False
        # Called when a down host answers again (the delivery loop releases what waits).
        self.on_recovery: Callable[[], None] | None = None

    def __repr__(self) -> str:
        state = "down" if self.is_down else "up"
        return f"<HostHealth {self.name} {state} failures={self.failures}>"

    @property
    def is_down(self) -> bool:
        return self.failures >= self.down_after

    @property
    def up(self) -> bool:
        """What the upstream_up metric says: not marked down, and not stalled."""
        return not self.is_down and not self.stalled

    def admits(self) -> bool:
        """May a delivery use this host now? A host that is down admits one probe once
        its pause is over; until the probe reports, the others wait."""
        if not self.is_down:
            return True
        if self.probing or self.clock() < self.down_until:
            return False
        self.probing = True
        return True

    def probe_now(self) -> None:
        """An operator asked to retry now (`queue flush`): end the pause."""
        if self.is_down:
            self.down_until = self.clock()

    def failed(self, reason: str) -> None:
        self.verdicts += 1
        self.failures += 1
        self.last_failure = reason
        self.probing = False
        if self.failures >= self.down_after:
            self.down_until = self.clock() + self.pause
            if self.failures == self.down_after:
                self.down_since = self.wall()
                log.warning("upstream %s marked down for %gs after %d failures: %s",
                            self.name, self.pause, self.failures, reason)

    def succeeded(self) -> None:
        self.verdicts += 1
        was_down = self.is_down
        self.failures = 0
        self.probing = False
        self.stalled = False
        if was_down:
            log.warning("upstream %s is back up", self.name)
            if self.on_recovery is not None:
                self.on_recovery()

    def released(self) -> None:
        """A delivery that was admitted ended without a verdict on the host (it had
        nothing to send there, or was cancelled): let another probe."""
        self.probing = False
