"""Persistent connections to upstream smarthosts, and one SMTP transaction over them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from relay.outbound.smarthosts import Smarthost, UpstreamSettings

log = logging.getLogger("relay.outbound")

# What can go wrong while talking to an upstream, short of a reply: the pool throws the
# connection away and the caller tries the next host (ssl.SSLError is an OSError).
CONNECTION_ERRORS = (TimeoutError, aiosmtplib.SMTPException, OSError)


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What the upstream said about one recipient (code 0: no reply, connection trouble).

    `again` marks a recipient the upstream did not take in this transaction only
    because it had too many (452 after others were accepted): send it in a new one.
    """

    code: int
    reply: str
    again: bool = False

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
    """A bounded set of persistent connections to one upstream host, and its health.

    Deciding which connection to use is plain synchronous bookkeeping; the I/O
    (connect, NOOP, QUIT) happens apart. A connection is reused for many messages,
    closed after `max_messages_per_connection` messages or `idle_timeout` idle,
    checked with NOOP before reuse once it idled past `check_after_idle`, and thrown
    away after any error inside a transaction: it is never reused half-way through
    MAIL/RCPT/DATA.

    Health is a circuit breaker: after `down_after_failures` failures in a row the host
    is down for `down_pause`; then one delivery probes it, and a success brings it back.
    """

    def __init__(
        self,
        member: Smarthost,
        settings: UpstreamSettings,
        local_hostname: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.member = member
        self.host = member.host
        self.port = member.port
        self.settings = settings
        self.local_hostname = local_hostname
        self.clock = clock
        self._idle: deque[Connection] = deque()
        self._busy = 0
        self._slots = asyncio.Semaphore(settings.pool_size)
        self._tls: ssl.SSLContext | None = None
        self.connections_opened = 0
        self.failures = 0
        self.last_failure = ""
        self.down_until = -math.inf
        # Smooth weighted round-robin counter (nginx), kept by the group.
        self.current_weight = 0

    def __repr__(self) -> str:
        down = " down" if self.is_down(self.clock()) else ""
        return f"<HostPool {self.member} idle={len(self._idle)} busy={self._busy}{down}>"

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def busy(self) -> int:
        return self._busy

    # -- health -------------------------------------------------------------------------

    def is_down(self, now: float) -> bool:
        return self.failures >= self.settings.down_after_failures and now < self.down_until

    def admits(self, now: float) -> bool:
        """May a delivery use this host now? Once the pause is over, the first caller
        gets it as the probe, and the host counts as down again until that one reports."""
        if self.failures < self.settings.down_after_failures:
            return True
        if now < self.down_until:
            return False
        self.down_until = now + self.settings.down_pause
        return True

    def failed(self, reason: str) -> None:
        self.failures += 1
        self.last_failure = reason
        if self.failures >= self.settings.down_after_failures:
            self.down_until = self.clock() + self.settings.down_pause
            if self.failures == self.settings.down_after_failures:
                log.warning("upstream %s marked down for %gs after %d failures: %s",
                            self.member, self.settings.down_pause, self.failures, reason)

    def succeeded(self) -> None:
        if self.failures >= self.settings.down_after_failures:
            log.warning("upstream %s is back up", self.member)
        self.failures = 0

    # -- connections --------------------------------------------------------------------

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
            except CONNECTION_ERRORS:
                # Upstreams close idle connections; that costs a reconnect, not a message.
                log.debug("%r: idle connection went stale, reconnecting", self)
                await asyncio.shield(conn.close())
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
        s = self.settings
        if s.tls != "none" and self._tls is None:
            self._tls = await asyncio.to_thread(tls_context, s)
        server_name = s.tls_server_name or self.host
        if s.tls == "implicit":
            # aiosmtplib verifies an implicit-TLS certificate against the name it
            # dials; to check `tls_server_name` instead, hand it a connected socket.
            sock = await asyncio.wait_for(_open_socket(self.host, self.port), s.connect_timeout)
            client = aiosmtplib.SMTP(
                hostname=server_name, sock=sock, use_tls=True, tls_context=self._tls,
                local_hostname=self.local_hostname, timeout=s.command_timeout,
            )
        else:
            client = aiosmtplib.SMTP(
                hostname=self.host, port=self.port, local_hostname=self.local_hostname,
                timeout=s.command_timeout, start_tls=False,
            )
        try:
            await client.connect(timeout=s.connect_timeout)
            if s.tls == "starttls":
                # RFC 3207 section 4: when TLS is required and STARTTLS is missing or
                # the certificate does not verify, the message must not go in plaintext;
                # aiosmtplib raises and the delivery is deferred (no downgrade to plaintext).
                await client.starttls(
                    server_hostname=server_name, tls_context=self._tls,
                    timeout=s.command_timeout,
                )
            if s.auth_username:
                await self._authenticate(client)
            if client.is_ehlo_or_helo_needed:
                # transmit() sends its commands itself, so it does not say EHLO lazily.
                try:
                    await client.ehlo(timeout=s.command_timeout)
                except aiosmtplib.SMTPHeloError:
                    await client.helo(timeout=s.command_timeout)
        except BaseException:
            client.close()
            if s.tls == "implicit":
                sock.close()
            raise
        self.connections_opened += 1
        return Connection(client, self.clock())

    async def _authenticate(self, client: aiosmtplib.SMTP) -> None:
        s = self.settings
        timeout = s.command_timeout
        # RFC 4954 section 4: AUTH follows EHLO (again after STARTTLS, RFC 3207 4.2).
        if client.is_ehlo_or_helo_needed:
            await client.ehlo(timeout=timeout)
        if s.auth_mechanism == "xoauth2":
            # OAuth access tokens expire within hours: an outside agent refreshes the
            # file, so it is read for every new connection.
            token = (await asyncio.to_thread(Path(s.password_file).read_text)).strip()
            await client.auth_xoauth2(s.auth_username, token, timeout=timeout)
        elif s.auth_mechanism == "plain":
            await client.auth_plain(s.auth_username, s.password, timeout=timeout)
        elif s.auth_mechanism == "login":
            await client.auth_login(s.auth_username, s.password, timeout=timeout)
        else:
            await client.login(s.auth_username, s.password, timeout=timeout)

    async def prune(self) -> None:
        """Close connections idle longer than `idle_timeout`."""
        now = self.clock()
        stale = [c for c in self._idle if now - c.last_used > self.settings.idle_timeout]
        for conn in stale:
            self._idle.remove(conn)
        await asyncio.shield(asyncio.gather(*(c.close() for c in stale)))

    async def close(self) -> None:
        idle, self._idle = list(self._idle), deque()
        await asyncio.shield(asyncio.gather(*(c.close() for c in idle)))


def tls_context(settings: UpstreamSettings) -> ssl.SSLContext:
    """The client TLS context of a group: verifying by default, TLS 1.2 at least."""
    context = ssl.create_default_context(cafile=settings.tls_ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not settings.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.tls_client_cert:
        context.load_cert_chain(settings.tls_client_cert, settings.tls_client_key or None)
    return context


async def _open_socket(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    error: OSError = OSError(f"cannot resolve {host}")
    for family, kind, proto, _, address in await loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ):
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error


class HostGroup:
    """The pools of one upstream group and the order in which to try its hosts."""

    def __init__(
        self,
        settings: UpstreamSettings,
        local_hostname: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.pools = [HostPool(m, settings, local_hostname, clock) for m in settings.members]

    def __repr__(self) -> str:
        return f"<HostGroup {self.settings.name} {' '.join(map(repr, self.pools))}>"

    def candidates(self) -> list[HostPool]:
        """Every host, best first: by priority level; within a level, the first pick
        rotates in proportion to weight (nginx's smooth weighted round-robin) among the
        hosts that are not down, and the others follow as failover."""
        now = self.clock()
        order: list[HostPool] = []
        for level in sorted({p.member.priority for p in self.pools}):
            members = [p for p in self.pools if p.member.priority == level]
            usable = [p for p in members if not p.is_down(now)] or members
            total = sum(p.member.weight for p in usable)
            for pool in usable:
                pool.current_weight += pool.member.weight
            first = max(usable, key=lambda p: p.current_weight)
            first.current_weight -= total
            rest = sorted((p for p in members if p is not first),
                          key=lambda p: (p.is_down(now), -p.member.weight))
            order += [first, *rest]
        return order

    async def prune(self) -> None:
        for pool in self.pools:
            await pool.prune()

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self.pools))


async def transmit(
    conn: Connection,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    settings: UpstreamSettings,
    smtputf8: bool = False,
) -> list[RecipientResult]:
    """Run MAIL, RCPT... and DATA on `conn`; one result per recipient, in order.

    Replies (2xx/4xx/5xx) become results. Anything else (timeouts, a dropped
    connection, a protocol error) raises, and the pool then discards the connection.
    `sender` is "" for the null reverse-path.

    The commands go out through aiosmtplib's execute_command with the addresses as
    they were accepted (its mail()/rcpt() re-parse them with email.utils), and the
    content with one bytes.replace for the transparency dots (its data() runs two
    regexes over every message and copies it to append the final dot).
    """
    client = conn.client
    timeout = settings.command_timeout
    mail = b"MAIL FROM:<%s>" % sender.encode("utf-8")
    if smtputf8:
        if not client.supports_extension("smtputf8"):
            # RFC 6531 section 3.2: never downgrade; the sender gets a non-delivery notice.
            failed = RecipientResult(553, "553 5.6.7 upstream does not support SMTPUTF8")
            return [failed] * len(recipients)
        mail += b" SMTPUTF8"
    try:
        reply = await client.execute_command(mail, timeout=timeout)
    except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
        # An upstream may drop an idle connection just as we reuse it (a race with its
        # idle timeout): that is a stale connection, not a failed delivery.
        if conn.messages > 0:
            raise StaleConnection(str(exc)) from exc
        raise
    if reply.code != 250:
        if reply.code == 421:
            conn.broken = True
        else:
            await _reset(conn, timeout)
        return [RecipientResult(reply.code, f"{reply.code} {reply.message}")] * len(recipients)

    results: list[RecipientResult | None] = []
    for index, rcpt in enumerate(recipients):
        reply = await client.execute_command(b"RCPT TO:<%s>" % rcpt.encode("utf-8"),
                                             timeout=timeout)
        if reply.code in (250, 251):
            results.append(None)  # accepted for now; the final-dot reply decides
            continue
        text = f"{reply.code} {reply.message}"
        if reply.code == 452 and None in results:
            # RFC 5321 section 4.5.3.1.10: "too many recipients" is no failure; the
            # client sends the rest in a new transaction after this one.
            results += [RecipientResult(452, text, again=True)] * (len(recipients) - index)
            break
        results.append(RecipientResult(reply.code, text))

    if None not in results:
        await _reset(conn, timeout)
        return [r for r in results if r is not None]

    reply = await client.execute_command(b"DATA", timeout=timeout)
    if reply.code == 354:
        protocol = client.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost")
        try:
            # No await between the writes and read_response: the reply cannot come
            # before aiosmtplib waits for it.
            protocol.write(dot_stuffed(data))
            protocol.write(b".\r\n")
            reply = await protocol.read_response(timeout=settings.data_timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            client.close()  # what aiosmtplib's data() does: never reuse a desynced session
            raise
    final = RecipientResult(reply.code, f"{reply.code} {reply.message}")
    if reply.code != 250:
        await _reset(conn, timeout)
    return [final if r is None else r for r in results]


_BARE_LINE_ENDING = re.compile(rb"\r\n|\n|\r(?!\n)")


def dot_stuffed(data: bytes) -> bytes:
    """The message as DATA sends it: CRLF line ends, ending in CRLF, and a dot added to
    every line that starts with one (RFC 5321 section 4.5.2)."""
    if data.count(b"\n") != data.count(b"\r\n") or data.count(b"\r") != data.count(b"\n"):
        # Never for mail from our listener (it refuses bare CR and LF); kept for safety.
        data = _BARE_LINE_ENDING.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b".") or b"\r\n." in data:
        data = (b"\r\n" + data).replace(b"\r\n.", b"\r\n..")[2:]
    return data


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
