"""Which queued messages may start delivery now: plain state on injected clocks.

The delivery loop (relay.outbound.delivery) does the I/O; it asks the scheduler which
messages to leave out of its next pick from the spool, whether a message it picked may
start, and tells it how each delivery ended. A message is out of the picks while it is

* in flight;
* parked: its upstream group's shaping (concurrency, rate, backing off after throttling)
  does not admit another delivery yet;
* set aside: every host of its group is down, so it is not tried (no attempt counted);
  it comes back when a host's pause ends, or at once when a host answers again;
* resting: its delivery crashed; after MAX_CRASHES in a row it is quarantined (held);
* unrecorded: the upstream answered but the spool has not taken the result yet. While
  any result is unrecorded no delivery starts at all (`paused`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from relay.outbound.shaping import Shaper

# A message whose delivery crashed this many times in a row is put on hold, so one
# poison message cannot keep a worker busy forever.
MAX_CRASHES = 5


class Scheduler:
    """The delivery loop's bookkeeping: what may start, what waits and until when."""

    def __init__(
        self,
        workers: int,
        shaper: Callable[[str], Shaper],
        rest: float,
        clock: Callable[[], float] = time.monotonic,
        unrecorded: Collection[str] = frozenset(),
    ) -> None:
        self.workers = workers
        self.shaper = shaper
        self.rest = rest  # how long a crashed delivery rests before it is picked again
        self.clock = clock
        self.in_flight: dict[str, str] = {}  # queue id -> group
        self.parked: dict[str, tuple[str, float]] = {}  # queue id -> (group, until)
        self.aside: dict[str, tuple[str, float]] = {}
        self.resting: dict[str, float] = {}
        self.crashes: dict[str, int] = {}
        # The ids whose results wait for the spool; the delivery loop owns the results.
        self.unrecorded = unrecorded

    def __repr__(self) -> str:
        return (f"<Scheduler in_flight={len(self.in_flight)} parked={len(self.parked)} "
                f"aside={len(self.aside)} resting={len(self.resting)} "
                f"unrecorded={len(self.unrecorded)}>")

    @property
    def paused(self) -> bool:
        return bool(self.unrecorded)

    @property
    def free(self) -> int:
        """How many deliveries may start now."""
        return 0 if self.paused else max(0, self.workers - len(self.in_flight))

    def excluded(self) -> list[str]:
        """The ids to leave out of the next pick (expired waits are dropped first)."""
        now = self.clock()
        self.parked = {k: v for k, v in self.parked.items() if v[1] > now}
        self.aside = {k: v for k, v in self.aside.items() if v[1] > now}
        self.resting = {k: t for k, t in self.resting.items() if t > now}
        return [*self.in_flight, *self.parked, *self.aside, *self.resting, *self.unrecorded]

    def next_wakeup(self, default: float) -> float:
        """Seconds until something set aside comes back (at most `default`)."""
        if not self.aside:
            return default
        return max(0.0, min(default, min(t for _, t in self.aside.values()) - self.clock()))

    def admit(self, queue_id: str, group: str) -> float:
        """0 when `queue_id` may start now (it is then in flight); else it is parked and
        this is how long until its group may admit one."""
        now = self.clock()
        wait = self.shaper(group).admit(now)
        if wait > 0:
            self.parked[queue_id] = (group, now + min(wait, 1.0))
            return wait
        self.in_flight[queue_id] = group
        return 0.0

    def finished(self, queue_id: str, crashed: bool) -> bool:
        """A delivery ended; True when the message is to be quarantined (held)."""
        group = self.in_flight.pop(queue_id, None)
        # The group has a free place again: its parked messages may try now.
        self.parked = {k: v for k, v in self.parked.items() if v[0] != group}
        if not crashed:
            self.crashes.pop(queue_id, None)
            return False
        self.resting[queue_id] = self.clock() + self.rest
        self.crashes[queue_id] = self.crashes.get(queue_id, 0) + 1
        if self.crashes[queue_id] < MAX_CRASHES:
            return False
        del self.crashes[queue_id]
        return True

    def set_aside(self, queue_id: str, group: str, until: float) -> bool:
        """Every host of `group` is down; True the first time for this message."""
        first = queue_id not in self.aside
        self.aside[queue_id] = (group, until)
        return first

    def recovered(self, group: str) -> int:
        """A host of `group` answers again: what waited for it comes back now."""
        released = [k for k, (g, _) in self.aside.items() if g == group]
        for queue_id in released:
            del self.aside[queue_id]
        return len(released)

    def flush(self) -> None:
        """The operator's `queue flush`: nothing waits for a down host any more."""
        self.aside.clear()
