"""What the sessions of one listener share: its settings and the relay's running parts."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.checks.services import CheckServices
from relay.inbound.budget import DataBudget
from relay.inbound.connlimits import ConnectionLimits
from relay.inbound.listeners import ListenerSettings
from relay.inbound.users import CheckGate
from relay.ops.metrics import Metrics
from relay.queue.content import Content
from relay.queue.spool import Envelope, Spool
from relay.runtime import Runtime


@dataclass(frozen=True, slots=True)
class ListenerContext:
    """Handed to every session of a listener (relay.app builds one per listener).

    current and services return what is in force now: a reload swaps them, and each
    new transaction picks up the new ones.
    """

    listener: ListenerSettings
    current: Callable[[], Runtime]
    services: Callable[[], CheckServices]
    spool: Spool
    on_queued: Callable[[str, Envelope, Content], None]
    metrics: Metrics
    limits: ConnectionLimits
    budget: DataBudget
    tls: ssl.SSLContext | None = None
    clock: Callable[[], float] = field(default=time.time)
    # Shared by every listener of the process (relay.app passes one in).
    passwords: CheckGate = field(default_factory=CheckGate)
