"""Upstream sinks that speak TLS, require AUTH or answer slowly; relays with any upstream table."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from conftest import RelayProcess, Sink, SinkHandler, _CountingSMTP, free_port


@dataclass
class RecordingHandler(SinkHandler):
    """SinkHandler that also notes every MAIL command (and whether it came over TLS),
    every successful AUTH login, and can hold the final-dot reply back for a while."""

    mail_commands: list[tuple[str, bool]] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    data_delay: float = 0.0
    data_started: int = 0

    async def handle_MAIL(self, server, session, envelope, address, mail_options):  # type: ignore[no-untyped-def]
        tls = session.ssl is not None or server.transport.get_extra_info("sslcontext") is not None
        self.mail_commands.append((address, tls))
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.data_started += 1
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        return await super().handle_DATA(server, session, envelope)


class UpstreamSink(Sink):
    """The test sink, optionally with STARTTLS, implicit TLS, or required AUTH."""

    def __init__(
        self,
        port: int | None = None,
        *,
        starttls: ssl.SSLContext | None = None,
        implicit: ssl.SSLContext | None = None,
        users: dict[str, str] | None = None,
    ) -> None:
        super().__init__(port)
        self.handler = RecordingHandler()
        self.starttls = starttls
        self.ssl_context = implicit
        self.users = users

    def factory(self) -> SMTP:
        kwargs: dict[str, Any] = {}
        if self.starttls is not None:
            kwargs["tls_context"] = self.starttls
        if self.users is not None:
            kwargs.update(authenticator=self._authenticate, auth_required=True,
                          auth_require_tls=False)
        return _CountingSMTP(self.handler, hostname="sink.test", decode_data=False, **kwargs)

    def _authenticate(self, server, session, envelope, mechanism, auth_data):  # type: ignore[no-untyped-def]
        assert self.users is not None
        if isinstance(auth_data, LoginPassword):
            user, password = auth_data.login.decode(), auth_data.password.decode()
            if self.users.get(user) == password:
                self.handler.logins.append(f"{mechanism}:{user}")
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)


class CertAuthority:
    """A throwaway CA (trustme) that issues server certificates for the sinks."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.pem = directory / f"ca-{id(self)}.pem"
        self.ca.cert_pem.write_to_path(str(self.pem))

    def server_context(self, *names: str) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*names).configure_cert(context)
        return context


def config_text(
    spool: Path, port: int, hosts: str, upstream: str = "", queue: str = ""
) -> str:
    return f"""
[server]
hostname = "relay.test"
workers = 1  # one spool.db to look into

[listener.smtp]
address = "127.0.0.1:{port}"

[upstream.default]
hosts = {hosts}
connect_timeout = "2s"
command_timeout = "5s"
data_timeout = "10s"
{upstream}

[queue]
spool_dir = "{spool}"
minimal_backoff = "0.3s"
maximal_backoff = "1s"
{queue}

[metrics]
listen = ""

[control]
socket = "{spool.parent / 'control.sock'}"
"""


class Relays:
    """Relay processes with any upstream table; each test stops what it started."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[RelayProcess] = []

    def start(self, hosts: str, upstream: str = "", queue: str = "") -> RelayProcess:
        port = free_port()
        text = config_text(self.directory / "spool", port, hosts, upstream, queue)
        relay = RelayProcess(self.directory, text, port)
        self.started.append(relay)
        return relay.start()

    def stop_all(self) -> None:
        for relay in self.started:
            relay.stop()


def spread(times: list[float], window: float) -> int:
    """The most arrivals inside any `window` seconds."""
    times = sorted(times)
    return max(sum(1 for t in times[i:] if t - start < window) for i, start in enumerate(times))
