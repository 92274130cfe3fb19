"""Traffic shaping per upstream group: concurrency, message rate, and backing off when throttled.

The decisions here are plain synchronous arithmetic on a clock; the delivery loop asks
`admit()` before it takes a message out of the spool, so a message that may not start
yet stays in the spool rather than waiting in memory.
"""

from __future__ import annotations

import math

from relay.replies import UpstreamReply

# Multiplicative decrease, additive increase (as TCP congestion control does): one
# throttle reply halves the group's speed, each later success gives back a tenth.
DECREASE = 0.5
INCREASE = 0.1
LOWEST = 1 / 64
# After a throttle reply the group pauses: 1 s, then doubling with each further
# throttle in a row, at most a minute.
FIRST_PAUSE = 1.0
LONGEST_PAUSE = 60.0


def is_throttle(reply: UpstreamReply) -> bool:
    """True for 421 and 4xx replies with an X.7.x enhanced status: the upstream tells us
    to slow down (RFC 5321 section 4.2.2 for 421; RFC 3463 section 3.8: X.7.x is
    security or policy status, which providers use for rate limits, e.g. "451 4.7.1 ...
    rate limited")."""
    return reply.code == 421 or (reply.is_temporary and reply.code > 0
                                 and reply.status.startswith("4.7."))


class Shaper:
    """When the next message of one upstream group may start.

    `max_concurrent` 0 falls back to `workers` (the queue-wide limit), so that a throttle
    reply has something to scale down; `max_rate` 0 means no rate limit until the
    upstream throttles us.
    """

    def __init__(self, max_concurrent: int, max_rate: float, workers: int) -> None:
        self.concurrency = max_concurrent or workers
        self.rate = max_rate
        self.active = 0
        self.factor = 1.0
        self.next_start = -math.inf
        self.paused_until = -math.inf
        self.throttles = 0

    def __repr__(self) -> str:
        return (f"<Shaper active={self.active}/{self.limit} factor={self.factor:.3g}"
                f"{' paused' if self.throttles else ''}>")

    @property
    def limit(self) -> int:
        return max(1, math.floor(self.concurrency * self.factor))

    @property
    def interval(self) -> float:
        """Seconds between message starts (0: no spacing)."""
        if self.rate:
            return 1 / (self.rate * self.factor)
        return 0.0

    def admit(self, now: float) -> float:
        """Take a slot and return 0.0, or return how long to wait (math.inf: until a
        running delivery of this group finishes)."""
        if now < self.paused_until:
            return self.paused_until - now
        if self.active >= self.limit:
            return math.inf
        if now < self.next_start:
            return self.next_start - now
        self.active += 1
        self.next_start = now + self.interval
        return 0.0

    def release(self, now: float, throttled: bool, succeeded: bool) -> None:
        """A delivery of this group ended; `throttled` if the upstream asked us to slow down."""
        self.active = max(0, self.active - 1)
        if throttled:
            self.throttles += 1
            self.factor = max(LOWEST, self.factor * DECREASE)
            pause = min(LONGEST_PAUSE, FIRST_PAUSE * 2 ** (self.throttles - 1))
            self.paused_until = max(self.paused_until, now + pause)
        elif succeeded:
            self.throttles = 0
            self.factor = min(1.0, self.factor + INCREASE)
