"""Connection accounting for the listeners: caps overall and per client, pressure, AUTH
failures, drain.

Pressure is Postfix's stress mode for slowloris: a few hundred clients that connect and
then send a byte now and then hold every session a relay allows. From
`pressure_threshold` percent of max_connections on (counted where the cap is counted:
the hub with workers), two things change until the count falls below it again:
- a new client that finds the cap reached takes the place of the session that has kept
  the server waiting longest, if that is longer than `pressure_grace` (a session whose
  client has the turn: no complete command, or no DATA line, since its last reply),
  waiting up to that grace for one (it is not greeted meanwhile). A client that holds
  such a stalled session, or one that has not completed a command yet, takes no one's
  place, so slow clients cannot take turns pushing each other out while real clients
  wait;
- the idle timeout shrinks to `pressure_idle_timeout` (Postfix: smtpd_timeout 10s).
Entering and leaving pressure are logged once each (the smtpd_pressure condition), with
the count of sessions closed meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import time
from collections.abc import Callable
from typing import Protocol

from relay.inbound.settings import InboundSettings
from relay.ipaddr import client_ip
from relay.ops.conditions import SMTPD_PRESSURE, Conditions
from relay.workers.link import Link, LinkDown

# AUTH failures of a client are forgotten after this long without a new one.
AUTH_FAILURE_MEMORY = 900.0
# Bound on the clients remembered for AUTH failures (anvil keeps a bounded table too).
MAX_REMEMBERED = 10000


# How often sessions are looked at under pressure (and the count for leaving it).
PRESSURE_SWEEP = 1.0
# How often a client waiting for a place at the cap looks again.
PRESSURE_POLL = 0.05


class Drainable(Protocol):
    """What the limits ask of a session."""

    @property
    def client(self) -> str | None:
        """The client address counted for it; None before admission."""

    def drain(self, force: bool) -> None: ...

    def stalled_for(self) -> float:
        """Seconds the session has waited for its client; 0 while the server has the turn."""

    def silent(self) -> bool:
        """Its client has not completed a command yet."""

    def evict(self, why: str) -> None:
        """Close it under pressure ("421 4.7.0") and give its place back at once."""


def client_key(address: str) -> str:
    """The unit a per-client cap counts: the IPv4 address, or the IPv6 /64 (one host's
    share of a LAN; Postfix anvil aggregates IPv6 clients by prefix too)."""
    ip = client_ip(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ConnectionLimits:
    """In-memory counters shared by every listener of one process.

    With workers, `link` makes the caps global: the hub (relay/workers/hub.py) counts
    every worker's sessions, and this process only counts its own for the drain.
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, link: Link | None = None,
        conditions: Conditions | None = None,
    ) -> None:
        self.clock = clock
        self.link = link
        self.conditions = conditions or Conditions()
        self._sweeper: asyncio.Task[None] | None = None
        self.total = 0
        self.per_client: collections.Counter[str] = collections.Counter()
        self.sessions: set[Drainable] = set()
        self._auth_failures: collections.OrderedDict[str, tuple[int, float]] = (
            collections.OrderedDict()
        )
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    def __repr__(self) -> str:
        return f"<ConnectionLimits total={self.total} clients={len(self.per_client)}>"

    def admit(self, address: str, max_total: int, max_per_client: int) -> str | None:
        """Count a new session in; or say why not (and count nothing)."""
        key = client_key(address)
        if self.total >= max_total:
            return f"too many connections ({self.total} of {max_total})"
        if self.per_client[key] >= max_per_client:
            return f"too many connections from {key} ({self.per_client[key]} of {max_per_client})"
        self.total += 1
        self.per_client[key] += 1
        return None

    async def enter(self, address: str, settings: InboundSettings) -> str | None:
        """Count a new session in, against the global counts when there is a hub; under
        pressure, make room by closing a stalled session. Or say why not."""
        why, total = await self._enter(address, settings)
        # At the cap, wait up to pressure_grace for a place: by then every session that
        # was open when this client came, and still waits for its own, has stalled
        # longer than the grace (a flood of slow clients has just taken every place).
        grace = settings.pressure_grace
        deadline = self.clock() + grace
        key = client_key(address)
        while why is not None and total >= settings.max_connections and not self.draining:
            mine = [s for s in self.sessions if client_key(s.client or "") == key]
            if any(s.stalled_for() > grace for s in mine):
                break  # it holds a stalled session itself: no place for another
            # Nor while one of its sessions has not said a command yet: slow clients
            # would otherwise push each other out, keeping every session young.
            stalled = [] if any(s.silent() for s in mine) else self._stalled(grace)
            if stalled:
                longest = max(stalled, key=lambda s: s.stalled_for())
                longest.evict(f"under pressure, stalled for {longest.stalled_for():.1f}s; "
                              f"its place goes to [{address}]")
                self._closed_under_pressure(settings)
            elif self.clock() >= deadline:
                break
            else:
                await asyncio.sleep(PRESSURE_POLL)
            why, total = await self._enter(address, settings)
        if total >= settings.pressure_connections and self._sweeper is None:
            self._sweeper = asyncio.create_task(self._pressure(settings))
        return why

    async def _enter(self, address: str, settings: InboundSettings) -> tuple[str | None, int]:
        """(why not, sessions open now) from the counts the cap is checked against."""
        cap, per_client = settings.max_connections, settings.max_connections_per_client
        if self.link is None:
            return self.admit(address, cap, per_client), self.total
        try:
            why, total = await self.link.admit(client_key(address), cap, per_client)
        except LinkDown as exc:
            return str(exc), 0
        if why is None:
            self.admit(address, max_total=2**62, max_per_client=2**62)
        return why, total

    async def _count(self) -> int:
        if self.link is None:
            return self.total
        try:
            return await self.link.count()
        except LinkDown:
            return self.total

    def _stalled(self, grace: float) -> list[Drainable]:
        """The admitted sessions that have waited for their client over `grace`."""
        return [s for s in self.sessions if s.client is not None and s.stalled_for() > grace]

    def _closed_under_pressure(self, settings: InboundSettings, count: int = 1) -> None:
        self.conditions.failing(
            SMTPD_PRESSURE, self._pressure_detail(settings), unit="stalled sessions closed",
            added=count)

    @staticmethod
    def _pressure_detail(settings: InboundSettings) -> str:
        return (f"{settings.pressure_connections} of max_connections "
                f"{settings.max_connections} sessions open: a client that finds no room "
                f"takes the place of a session stalled over {settings.pressure_grace:g}s, "
                f"idle timeout {settings.pressure_idle_timeout:g}s")

    async def _pressure(self, settings: InboundSettings) -> None:
        """Under pressure until the count falls below the threshold: close sessions idle
        over the shrunk timeout, once a PRESSURE_SWEEP."""
        self._closed_under_pressure(settings, count=0)
        try:
            while not self.draining and await self._count() >= settings.pressure_connections:
                idle = self._stalled(settings.pressure_idle_timeout)
                for session in idle:
                    session.evict(f"under pressure, idle for {session.stalled_for():.1f}s")
                if idle:
                    self._closed_under_pressure(settings, len(idle))
                await asyncio.sleep(PRESSURE_SWEEP)
        finally:
            self._sweeper = None
            self.conditions.cleared(SMTPD_PRESSURE)

    def release(self, address: str) -> None:
        key = client_key(address)
        if self.link is not None:
            self.link.send("release", client=key)
        self.total -= 1
        self.per_client[key] -= 1
        if self.per_client[key] <= 0:
            del self.per_client[key]

    def register(self, session: Drainable) -> None:
        self.sessions.add(session)
        self._idle.clear()

    def unregister(self, session: Drainable) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._idle.set()

    async def drain(self, deadline: float) -> int:
        """SIGTERM: every session says 421 as soon as it is between commands; wait up to
        `deadline` seconds for them to end, then close the rest. Returns how many that was."""
        self.draining = True
        for session in list(self.sessions):
            session.drain(force=False)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), deadline)
        left = list(self.sessions)
        for session in left:
            session.drain(force=True)
        return len(left)

    def auth_blocked(self, address: str, limit: int) -> bool:
        self._forget_old()
        count, _ = self._auth_failures.get(client_key(address), (0, 0.0))
        return count >= limit

    def auth_failed(self, address: str, limit: int) -> bool:
        """Count one failure; True when the client has now reached `limit`."""
        self._forget_old()
        key = client_key(address)
        count, _ = self._auth_failures.pop(key, (0, 0.0))
        self._auth_failures[key] = (count + 1, self.clock())
        while len(self._auth_failures) > MAX_REMEMBERED:
            self._auth_failures.popitem(last=False)
        return count + 1 >= limit

    def auth_succeeded(self, address: str) -> None:
        self._auth_failures.pop(client_key(address), None)

    def _forget_old(self) -> None:
        horizon = self.clock() - AUTH_FAILURE_MEMORY
        while self._auth_failures:
            key, (_, last) = next(iter(self._auth_failures.items()))
            if last >= horizon:
                break
            del self._auth_failures[key]
