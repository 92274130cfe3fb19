"""Real parts for the tests: an upstream sink, the relay as a subprocess, small helpers."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from relay import config
from relay.outbound.delivery import Delivery, Upstreams
from relay.queue.spool import Spool

ROOT = Path(__file__).resolve().parent.parent


# Ports free_port() handed out in this process.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on now, and never one handed out before: the
    kernel may offer a port again as soon as the probe closed it, and a relay given one
    port for two of its listeners does not start."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise AssertionError("no loopback port left that was not handed out before")


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
    poll: float = 0.05,
) -> Any:
    """Poll `predicate` until it returns something truthy; bounded in time."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- upstream sink -------------------------------------------------------------------


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    at: float
    mail_options: list[str] = field(default_factory=list)


@dataclass
class SinkHandler:
    """An upstream smarthost whose replies the test scripts."""

    messages: list[Received] = field(default_factory=list)
    connections: int = 0
    # Recipient address -> reply to RCPT (default 250).
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    # Replies to the final dot, used up one by one before answering 250.
    data_replies: collections.deque[str] = field(default_factory=collections.deque)
    data_attempts: int = 0
    transports: list[Any] = field(default_factory=list)
    # EHLO keywords this upstream does not offer ("8BITMIME", "SIZE", ...).
    without: set[str] = field(default_factory=set)
    # Offer PIPELINING as real upstreams do (RFC 2920; aiosmtpd reads pipelined commands
    # but does not say so).
    pipelining: bool = True
    # Reply to MAIL instead of accepting it ("" accepts).
    mail_reply: str = ""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
        session.host_name = hostname  # aiosmtpd leaves it to the hook
        kept = [r for r in responses if r[4:].split(" ")[0].upper() not in self.without]
        if self.pipelining:
            kept.insert(1, "250-PIPELINING")
        return kept

    async def handle_MAIL(self, server, session, envelope, address, options):  # type: ignore[no-untyped-def]
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, options):  # type: ignore[no-untyped-def]
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.data_attempts += 1
        if self.data_replies:
            return self.data_replies.popleft()
        self.messages.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content,
                     time.monotonic(), list(envelope.mail_options))
        )
        return "250 2.0.0 Ok: stored"


class _CountingSMTP(SMTP):
    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        if self._original_transport is None and self.transport is None:
            self.event_handler.connections += 1
            self.event_handler.transports.append(transport)
        super().connection_made(transport)


class Sink(Controller):
    """aiosmtpd in a thread of the test process, playing the upstream smarthost."""

    def __init__(self, port: int | None = None, utf8: bool = False) -> None:
        self.utf8 = utf8
        self.handler = SinkHandler()
        super().__init__(self.handler, hostname="127.0.0.1", port=port or free_port(),
                         ready_timeout=5)

    def start(self) -> None:
        super().start()
        # Controller.start() connects once itself to see the server answer; not a client.
        self.handler.connections = 0
        self.handler.transports.clear()

    def factory(self) -> SMTP:
        return _CountingSMTP(self.handler, hostname="sink.test", decode_data=False,
                             enable_SMTPUTF8=self.utf8)

    def close_connections(self) -> None:
        """Drop every client connection, as an upstream's idle timeout does."""
        def close() -> None:
            for transport in self.handler.transports:
                transport.close()

        self.loop.call_soon_threadsafe(close)

    def wait_messages(self, count: int, timeout: float = 15.0) -> list[Received]:
        wait_until(lambda: len(self.handler.messages) >= count, timeout,
                   f"{count} message(s) at the sink")
        return self.handler.messages


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    s.start()
    yield s
    s.stop()


# -- the relay as a real process ------------------------------------------------------


def relay_config(
    upstream_port: int,
    listen_port: int,
    spool: Path,
    extra: str = "",
    upstream_extra: str = "",
    metrics: str = "",
) -> str:
    # One worker unless the test asks for more: its spool is then the one spool.db.
    workers = "" if "workers" in extra else "workers = 1"
    return f"""
[server]
hostname = "relay.test"
{workers}
{extra}

[listener.smtp]
address = "127.0.0.1:{listen_port}"

[upstream.default]
hosts = ["127.0.0.1:{upstream_port}"]
connect_timeout = "2s"
command_timeout = "5s"
data_timeout = "10s"
{upstream_extra}

[queue]
spool_dir = "{spool}"
minimal_backoff = "0.3s"
maximal_backoff = "1s"

[metrics]
listen = "{metrics}"

[control]
socket = "{spool.parent / 'control.sock'}"
"""


class RelayProcess:
    """`python -m relay serve` on a loopback port, with its log in a file."""

    def __init__(
        self, directory: Path, config_text: str, port: int, env: dict[str, str] | None = None
    ) -> None:
        self.env = {**os.environ, **(env or {})}
        self.directory = directory
        self.port = port
        self.config = directory / "config.toml"
        self.config.write_text(config_text)
        self.log = directory / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def control_socket(self) -> Path:
        return self.directory / "control.sock"

    @property
    def spool_db(self) -> Path:
        return self.directory / "spool" / "spool.db"

    def start(self, wait: bool = True) -> RelayProcess:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.directory, env=self.env,
            )
        if not wait:
            return self
        wait_until(lambda: self.proc is not None and (self.proc.poll() is not None
                                                      or port_open(self.port)),
                   10, "the relay to listen")
        assert self.proc.poll() is None, self.log.read_text()
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=15)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def queue_rows(self) -> list[tuple[str, str]]:
        """(message id, state) of everything in the spool, read straight from disk."""
        if not self.spool_db.exists():
            return []
        with sqlite3.connect(self.spool_db) as db:
            return list(db.execute("SELECT id, state FROM message"))

    def recipient_rows(self) -> list[tuple[str, str, str]]:
        with sqlite3.connect(self.spool_db) as db:
            return list(db.execute("SELECT address, state, reply FROM recipient"))


@contextlib.contextmanager
def relay_with_sink(directory: Path, extra: str = "") -> Iterator[tuple[RelayProcess, Sink]]:
    """A relay and its own upstream sink, for a module of tests that share them."""
    sink = Sink()
    sink.start()
    port = free_port()
    relay = RelayProcess(directory, relay_config(sink.port, port, directory / "spool", extra),
                         port)
    try:
        yield relay.start(), sink
    finally:
        relay.stop()
        sink.stop()


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    started: list[RelayProcess] = []

    def start(
        upstream_port: int,
        extra: str = "",
        upstream_extra: str = "",
        port: int | None = None,
        sections: str = "",
        env: dict[str, str] | None = None,
        metrics: str = "",
        wait: bool = True,
    ) -> RelayProcess:
        port = port or free_port()
        text = relay_config(
            upstream_port, port, tmp_path / "spool", extra, upstream_extra, metrics
        )
        relay = RelayProcess(tmp_path, text + sections, port, env)
        started.append(relay)
        relay.start(wait)
        if wait and metrics:
            # The relay opens its metrics endpoint after its SMTP listeners.
            wait_until(lambda: port_open(int(metrics.rsplit(":", 1)[1])), 10,
                       "the metrics endpoint to listen")
        return relay

    yield start
    for relay in started:
        relay.stop()


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd or ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def send_raw(port: int, chunks: list[bytes], read_timeout: float = 5.0) -> bytes:
    """Speak SMTP byte by byte: send each chunk, return everything the server said."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        received = s.recv(4096)
        for chunk in chunks:
            s.sendall(chunk)
            time.sleep(0.05)
            with contextlib.suppress(TimeoutError):
                received += s.recv(65536)
        return received



@contextlib.asynccontextmanager
async def delivering(
    sink_port: int, directory: Path, make_spool: Callable[[Path], Spool] = Spool,
    upstream_extra: str = "",
) -> AsyncIterator[tuple[Spool, Delivery]]:
    """A real spool and its Delivery, the delivery loop running, sending to `sink_port`;
    stopped and closed at the end."""
    path = directory / "config.toml"
    path.write_text(relay_config(sink_port, 2525, directory / "spool",
                                 upstream_extra=upstream_extra))
    settings = config.load(path)
    spool = make_spool(settings.spool_path)
    await spool.open()
    upstreams = Upstreams(settings)
    delivery = Delivery(spool, settings, upstreams)
    loop = asyncio.create_task(delivery.run())
    try:
        yield spool, delivery
    finally:
        await delivery.stop(1.0)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await upstreams.close()
        await spool.close()
