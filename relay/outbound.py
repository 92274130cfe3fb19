"""Persistent connections to upstream smarthosts, and one SMTP transaction over them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import aiosmtplib

from relay.smarthosts import UpstreamSettings

log = logging.getLogger("relay.outbound")


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What the upstream said about one recipient (code 0: no reply, connection trouble)."""

    code: int
    reply: str

    @property
    def accepted(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return self.code >= 500


class StaleConnection(Exception):
    """A reused connection died before the transaction began; retry on a fresh one."""


class Connection:
    """One connected aiosmtplib client and how much it has been used."""

    def __init__(self, client: aiosmtplib.SMTP, now: float) -> None:
        self.client = client
        self.messages = 0
        self.last_used = now
        # Set when a reply left the session in a state we cannot vouch for.
        self.broken = False

    async def close(self) -> None:
        # QUIT politely, but never wait long or let a broken socket raise.
        with contextlib.suppress(Exception):
            if self.client.is_connected:
                await asyncio.wait_for(self.client.quit(), timeout=2)
        self.client.close()


class HostPool:
    """A bounded set of persistent connections to one upstream host.

    Deciding which connection to use is plain synchronous bookkeeping; the I/O
    (connect, NOOP, QUIT) happens apart. A connection is reused for many messages,
    closed after `max_messages_per_connection` messages or `idle_timeout` idle,
    checked with NOOP before reuse once it idled past `check_after_idle`, and thrown
    away after any error inside a transaction: it is never reused half-way through
    MAIL/RCPT/DATA.
    """

    def __init__(
        self,
        host: str,
        port: int,
        settings: UpstreamSettings,
        local_hostname: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.port = port
        self.settings = settings
        self.local_hostname = local_hostname
        self.clock = clock
        self._idle: deque[Connection] = deque()
        self._busy = 0
        self._slots = asyncio.Semaphore(settings.pool_size)
        self.connections_opened = 0

    def __repr__(self) -> str:
        return f"<HostPool {self.host}:{self.port} idle={len(self._idle)} busy={self._busy}>"

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def busy(self) -> int:
        return self._busy

    @contextlib.asynccontextmanager
    async def borrow(self) -> AsyncIterator[Connection]:
        """A connection for one transaction; discarded if the body raises."""
        async with self._slots:
            conn = await self._checkout()
            self._busy += 1
            try:
                yield conn
            except BaseException:
                self._busy -= 1
                await asyncio.shield(conn.close())
                raise
            self._busy -= 1
            conn.messages += 1
            conn.last_used = self.clock()
            if conn.broken or conn.messages >= self.settings.max_messages_per_connection:
                await asyncio.shield(conn.close())
            else:
                self._idle.append(conn)

    async def _checkout(self) -> Connection:
        while True:
            conn, needs_check = self._pick_idle()
            if conn is None:
                return await self._connect()
            if not needs_check:
                return conn
            try:
                await conn.client.noop(timeout=self.settings.command_timeout)
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                # Upstreams close idle connections; that costs a reconnect, not a message.
                log.debug("%r: idle connection went stale, reconnecting", self)
                await conn.close()
                continue
            return conn

    def _pick_idle(self) -> tuple[Connection | None, bool]:
        now = self.clock()
        while self._idle:
            conn = self._idle.pop()  # most recently used first: the likeliest to be alive
            idle_for = now - conn.last_used
            if idle_for > self.settings.idle_timeout or not conn.client.is_connected:
                asyncio.get_running_loop().create_task(conn.close())
                continue
            return conn, idle_for > self.settings.check_after_idle
        return None, False

    async def _connect(self) -> Connection:
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            local_hostname=self.local_hostname,
            timeout=self.settings.command_timeout,
            start_tls=False,
        )
        await client.connect(timeout=self.settings.connect_timeout)
        self.connections_opened += 1
        return Connection(client, self.clock())

    async def prune(self) -> None:
        """Close connections idle longer than `idle_timeout`."""
        now = self.clock()
        stale = [c for c in self._idle if now - c.last_used > self.settings.idle_timeout]
        for conn in stale:
            self._idle.remove(conn)
        await asyncio.gather(*(c.close() for c in stale))

    async def close(self) -> None:
        idle, self._idle = list(self._idle), deque()
        await asyncio.shield(asyncio.gather(*(c.close() for c in idle)))


async def transmit(
    conn: Connection,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    settings: UpstreamSettings,
) -> list[RecipientResult]:
    """Run MAIL, RCPT... and DATA on `conn`; one result per recipient, in order.

    Replies (2xx/4xx/5xx) become results. Anything else (timeouts, a dropped
    connection, a protocol error) raises, and the pool then discards the connection.
    """
    client = conn.client
    timeout = settings.command_timeout
    try:
        await client.mail(sender, timeout=timeout)
    except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
        # An upstream may drop an idle connection just as we reuse it (F8).
        if conn.messages > 0:
            raise StaleConnection(str(exc)) from exc
        raise
    except aiosmtplib.SMTPSenderRefused as exc:
        if exc.code == 421:
            conn.broken = True
        else:
            await _reset(conn, timeout)
        return [RecipientResult(exc.code, f"{exc.code} {exc.message}")] * len(recipients)

    results: list[RecipientResult | None] = []
    for rcpt in recipients:
        try:
            await client.rcpt(rcpt, timeout=timeout)
        except aiosmtplib.SMTPRecipientRefused as exc:
            results.append(RecipientResult(exc.code, f"{exc.code} {exc.message}"))
        else:
            results.append(None)  # accepted for now; the final-dot reply decides

    if all(r is not None for r in results):
        await _reset(conn, timeout)
        return [r for r in results if r is not None]

    try:
        response = await client.data(data, timeout=settings.data_timeout)
        final = RecipientResult(response.code, f"{response.code} {response.message}")
    except aiosmtplib.SMTPDataError as exc:
        final = RecipientResult(exc.code, f"{exc.code} {exc.message}")
        await _reset(conn, timeout)
    return [final if r is None else r for r in results]


async def _reset(conn: Connection, timeout: float) -> None:
    # After a refused transaction the connection is clean only once RSET succeeded;
    # otherwise the pool throws it away after this message.
    try:
        response = await conn.client.rset(timeout=timeout)
    except (aiosmtplib.SMTPException, OSError):
        conn.broken = True
        return
    if response.code != 250:
        conn.broken = True
