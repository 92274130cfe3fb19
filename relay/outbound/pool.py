"""Persistent connections to the upstream smarthosts: which to reuse, when to close.

HostPool is bookkeeping only (synchronous, testable without sockets): which idle
connection to hand out, whether it needs a NOOP first, which to close. Host wires it to
the Connector (I/O) and the HostHealth (circuit breaker) of one host; HostGroup orders
the hosts of an upstream group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from relay.outbound.connector import Connection, Connector
from relay.outbound.health import HostHealth
from relay.outbound.smarthosts import Smarthost, UpstreamSettings
from relay.outbound.transaction import CONNECTION_ERRORS

log = logging.getLogger("relay.outbound")


class HostPool:
    """The connections to one host: reused for many messages, closed after
    `max_messages_per_connection` messages or `idle_timeout` idle, checked with NOOP
    before reuse once idle past `check_after_idle`, and never reused after an error
    inside a transaction (the caller discards it instead of checking it in)."""

    def __init__(self, settings: UpstreamSettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock
        self._idle: deque[Connection] = deque()
        self.busy = 0

    @property
    def idle(self) -> int:
        return len(self._idle)

    def checkout(self) -> tuple[Connection | None, bool, list[Connection]]:
        """(an idle connection to reuse or None, whether to NOOP it first, the idle
        connections found expired on the way, to close). Counts the borrower busy."""
        now = self.clock()
        expired: list[Connection] = []
        self.busy += 1
        while self._idle:
            conn = self._idle.pop()  # most recently used first: the likeliest to be alive
            idle_for = now - conn.last_used
            if idle_for > self.settings.idle_timeout or not conn.client.is_connected:
                expired.append(conn)
                continue
            return conn, idle_for > self.settings.check_after_idle, expired
        return None, False, expired

    def checkin(self, conn: Connection) -> bool:
        """A transaction ended well on `conn`: True if it goes back to the idle set,
        False if it is to be closed (used up, or left in an unknown state)."""
        self.busy -= 1
        conn.messages += 1
        conn.last_used = self.clock()
        if conn.broken or conn.messages >= self.settings.max_messages_per_connection:
            return False
        self._idle.append(conn)
        return True

    def discard(self) -> None:
        """The borrowed connection is thrown away (an error, or it went stale)."""
        self.busy -= 1

    def expired(self) -> list[Connection]:
        """Idle connections past `idle_timeout`, taken out of the pool to be closed."""
        now = self.clock()
        stale = [c for c in self._idle if now - c.last_used > self.settings.idle_timeout]
        for conn in stale:
            self._idle.remove(conn)
        return stale

    def drain(self) -> list[Connection]:
        idle, self._idle = list(self._idle), deque()
        return idle


class Host:
    """One upstream host: its connections, how to open new ones, and its health."""

    def __init__(
        self,
        member: Smarthost,
        settings: UpstreamSettings,
        local_hostname: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.member = member
        self.settings = settings
        self.clock = clock
        self.health = HostHealth(str(member), settings.down_after_failures,
                                 settings.down_pause, clock)
        self.connector = Connector(member, settings, local_hostname, self.health)
        self.pool = HostPool(settings, clock)
        self._slots = asyncio.Semaphore(settings.pool_size)
        # Smooth weighted round-robin counter (nginx), kept by the group.
        self.current_weight = 0

    def __repr__(self) -> str:
        down = " down" if self.health.is_down else ""
        return f"<Host {self.member} idle={self.pool.idle} busy={self.pool.busy}{down}>"

    @property
    def idle(self) -> int:
        return self.pool.idle

    @property
    def busy(self) -> int:
        return self.pool.busy

    @contextlib.asynccontextmanager
    async def borrow(self) -> AsyncIterator[Connection]:
        """A connection for one transaction; discarded if the body raises."""
        async with self._slots:
            conn = await self._checkout()
            try:
                yield conn
            except BaseException:
                self.pool.discard()
                await _close(conn)
                raise
            if not self.pool.checkin(conn):
                await _close(conn)

    async def _checkout(self) -> Connection:
        while True:
            conn, needs_check, expired = self.pool.checkout()
            for old in expired:
                asyncio.get_running_loop().create_task(old.close())
            if conn is None:
                try:
                    return await self.connector.connect(self.clock())
                except BaseException:
                    self.pool.discard()
                    raise
            if not needs_check:
                return conn
            try:
                await conn.client.noop(timeout=self.settings.command_timeout)
            except CONNECTION_ERRORS:
                # Upstreams close idle connections; that costs a reconnect, not a message.
                log.debug("%r: idle connection went stale, reconnecting", self)
                self.pool.discard()
                await _close(conn)
                continue
            return conn

    async def prune(self) -> None:
        """Close connections idle longer than `idle_timeout`."""
        await asyncio.shield(asyncio.gather(*(c.close() for c in self.pool.expired())))

    async def close(self) -> None:
        await asyncio.shield(asyncio.gather(*(c.close() for c in self.pool.drain())))


async def _close(conn: Connection) -> None:
    # Closing is shielded: a cancelled delivery must not leave a half-closed socket.
    await asyncio.shield(conn.close())


class HostGroup:
    """The hosts of one upstream group and the order in which to try them."""

    def __init__(
        self,
        settings: UpstreamSettings,
        local_hostname: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.hosts = [Host(m, settings, local_hostname, clock) for m in settings.members]

    def __repr__(self) -> str:
        return f"<HostGroup {self.settings.name} {' '.join(map(repr, self.hosts))}>"

    @property
    def up(self) -> bool:
        """A group is up while any of its hosts is."""
        return any(h.health.up for h in self.hosts)

    def candidates(self) -> list[Host]:
        """Every host, best first: by priority level; within a level, the first pick
        rotates in proportion to weight (nginx's smooth weighted round-robin) among the
        hosts that are not down, and the others follow as failover."""
        order: list[Host] = []
        for level in sorted({h.member.priority for h in self.hosts}):
            members = [h for h in self.hosts if h.member.priority == level]
            usable = [h for h in members if not h.health.is_down] or members
            total = sum(h.member.weight for h in usable)
            for host in usable:
                host.current_weight += host.member.weight
            first = max(usable, key=lambda h: h.current_weight)
            first.current_weight -= total
            rest = sorted((h for h in members if h is not first),
                          key=lambda h: (h.health.is_down, -h.member.weight))
            order += [first, *rest]
        return order

    async def prune(self) -> None:
        for host in self.hosts:
            await host.prune()

    async def close(self) -> None:
        await asyncio.gather(*(host.close() for host in self.hosts))
