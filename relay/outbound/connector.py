"""Opening a connection to one upstream host: TCP, greeting, TLS, EHLO and AUTH."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib

from relay.outbound.health import HostHealth
from relay.outbound.smarthosts import Smarthost, UpstreamSettings

log = logging.getLogger("relay.outbound")

# A host that has not greeted after this long (capped at half the connect timeout) is
# reported as stalled while the attempt goes on: a blackhole shows at once, not after
# the whole connect timeout.
STALL_REPORT = 5.0


@dataclass
class Connection:
    """One connected aiosmtplib client, what we learned of the server, and its use."""

    client: aiosmtplib.SMTP
    last_used: float
    server_name: str = ""  # the name the server gave in its greeting
    tls: str = ""  # "TLSv1.3 TLS_AES_256_GCM_SHA384", "" in plaintext
    messages: int = 0
    # Set when a reply left the session in a state we cannot vouch for.
    broken: bool = field(default=False)

    async def close(self) -> None:
        # QUIT politely, but never wait long or let a broken socket raise.
        with contextlib.suppress(Exception):
            if self.client.is_connected:
                await asyncio.wait_for(self.client.quit(), timeout=2)
        self.client.close()


class Connector:
    """Makes new connections to one upstream host, as its group's settings say."""

    def __init__(
        self, member: Smarthost, settings: UpstreamSettings, local_hostname: str,
        health: HostHealth,
    ) -> None:
        self.member = member
        self.settings = settings
        self.local_hostname = local_hostname
        self.health = health
        self._tls: ssl.SSLContext | None = None

    async def connect(self, now: float) -> Connection:
        s = self.settings
        host, port = self.member.host, self.member.port
        if s.tls != "none" and self._tls is None:
            self._tls = await asyncio.to_thread(tls_context, s)
        server_name = s.tls_server_name or host
        sock: socket.socket | None = None
        client: aiosmtplib.SMTP | None = None
        stall = asyncio.get_running_loop().call_later(
            min(STALL_REPORT, s.connect_timeout / 2), self._stalled
        )
        try:
            if s.tls == "implicit":
                # aiosmtplib verifies an implicit-TLS certificate against the name it
                # dials; to check `tls_server_name` instead, hand it a connected socket.
                sock = await asyncio.wait_for(_open_socket(host, port), s.connect_timeout)
                client = aiosmtplib.SMTP(
                    hostname=server_name, sock=sock, use_tls=True, tls_context=self._tls,
                    local_hostname=self.local_hostname, timeout=s.command_timeout,
                )
            else:
                client = aiosmtplib.SMTP(
                    hostname=host, port=port, local_hostname=self.local_hostname,
                    timeout=s.command_timeout, start_tls=False,
                )
            try:
                greeting = await client.connect(timeout=s.connect_timeout)
            finally:
                stall.cancel()
            self.health.stalled = False
            await self._session(client, server_name)
        except BaseException:
            stall.cancel()
            if client is not None:
                client.close()
            if sock is not None:
                sock.close()
            raise
        return Connection(client, now, server_name=_greeting_name(greeting.message),
                          tls=_tls_of(client))

    def _stalled(self) -> None:
        self.health.stalled = True
        log.warning("upstream %s: no greeting after %gs (still waiting, connect_timeout %gs)",
                    self.member, min(STALL_REPORT, self.settings.connect_timeout / 2),
                    self.settings.connect_timeout)

    async def _session(self, client: aiosmtplib.SMTP, server_name: str) -> None:
        """STARTTLS, AUTH and EHLO on a client that has just been greeted."""
        s = self.settings
        if s.tls == "starttls":
            # RFC 3207 section 4: when TLS is required and STARTTLS is missing or the
            # certificate does not verify, the message must not go in plaintext;
            # aiosmtplib raises and the delivery is deferred (no downgrade to plaintext).
            await client.starttls(
                server_hostname=server_name, tls_context=self._tls, timeout=s.command_timeout,
            )
        if s.auth_username:
            await self._authenticate(client)
        if client.is_ehlo_or_helo_needed:
            # The transaction sends its commands itself, so it does not say EHLO lazily.
            try:
                await client.ehlo(timeout=s.command_timeout)
            except aiosmtplib.SMTPHeloError:
                await client.helo(timeout=s.command_timeout)

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


def _greeting_name(message: str) -> str:
    """The server's own name: the first word of its greeting (RFC 5321 section 4.3.1)."""
    words = message.split()
    return words[0] if words and "." in words[0] and words[0].isascii() else ""


def _tls_of(client: aiosmtplib.SMTP) -> str:
    transport = client.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()} {cipher[0]}" if cipher else str(ssl_object.version())


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
