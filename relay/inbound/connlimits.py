"""Connection accounting for the listeners: caps overall and per client, AUTH failures, drain."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import time
from collections.abc import Callable
from typing import Protocol

from relay.ipaddr import client_ip
from relay.workers.link import Link, LinkDown

# AUTH failures of a client are forgotten after this long without a new one.
AUTH_FAILURE_MEMORY = 900.0
# Bound on the clients remembered for AUTH failures (anvil keeps a bounded table too).
MAX_REMEMBERED = 10000


class Drainable(Protocol):
    def drain(self, force: bool) -> None: ...


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
        self, clock: Callable[[], float] = time.monotonic, link: Link | None = None
    ) -> None:
        self.clock = clock
        self.link = link
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

    async def enter(self, address: str, max_total: int, max_per_client: int) -> str | None:
        """admit(), against the global counts when there is a hub."""
        if self.link is None:
            return self.admit(address, max_total, max_per_client)
        try:
            why = await self.link.admit(client_key(address), max_total, max_per_client)
        except LinkDown as exc:
            return str(exc)
        if why is None:
            self.admit(address, max_total=2**62, max_per_client=2**62)
        return why

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
