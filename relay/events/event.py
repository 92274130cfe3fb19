"""One outcome of a message or an SMTP command, as sinks and `policy-relay trace` see it."""

from __future__ import annotations

import itertools
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

# Every event type, in the order a message usually meets them.
TYPES = (
    "received", "refused", "held", "released", "discarded", "deferred", "sent", "bounced",
    "expired", "deleted",
)


# A random tag drawn once per process and a counter: with the time, an id is unique across
# workers, restarts and relays (a receiver deduplicates on it), without asking the kernel
# for random bytes at every event.
_PROCESS = secrets.token_hex(5)
_COUNTER = itertools.count()


def _new_process() -> None:
    global _PROCESS
    _PROCESS = secrets.token_hex(5)


os.register_at_fork(after_in_child=_new_process)  # each worker draws its own tag


def new_event_id() -> str:
    return f"{time.time_ns() // 1000:013x}{_PROCESS}{next(_COUNTER) & 0xFFFFFF:06x}"


@dataclass(frozen=True, slots=True)
class Event:
    """One event. `message_id` None: the spool fills it in from the message's
    `received` event (delivery and operator events know only the queue id)."""

    type: str
    queue_id: str
    sender: str | None
    recipient: str | None = None
    client_address: str = ""
    sasl_username: str = ""
    listener: str = ""
    received_at: float | None = None
    message_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)
    id: str = field(default_factory=new_event_id)

    def record(self, message_id: str) -> dict[str, Any]:
        """The event as a JSON object, with `message_id` the one the spool found."""
        return {
            "id": self.id, "type": self.type, "time": round(self.time, 6),
            "queue_id": self.queue_id, "message_id": message_id, "sender": self.sender,
            "recipient": self.recipient, "client_address": self.client_address,
            "sasl_username": self.sasl_username, "listener": self.listener,
            "received_at": self.received_at, **self.details,
        }
