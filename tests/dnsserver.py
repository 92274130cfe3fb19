"""A real dnsmasq on a loopback port, serving the TXT records a test hands it."""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

import dns.exception
import dns.message
import dns.query
import dns.rcode

DNSMASQ = "/usr/sbin/dnsmasq"
# Names under this zone are forwarded to a socket that never answers, so every lookup
# there times out: the "DNS is down" case (RFC 7208 temperror, DKIM key temperror).
TEMPFAIL_ZONE = "tempfail.test"
# Names under this zone get REFUSED at once (a forward to "the usual servers", of which
# there are none): the "server failure" case, without waiting for a timeout.
REFUSED_ZONE = "refused.test"
READY_TIMEOUT = 5.0
START_TRIES = 3

# One TXT record: a string, or a tuple of character-strings (each at most 255 octets)
# that a reader joins; RFC 6376 section 3.6.2.2 keys longer than 255 octets need several.
TxtValue = str | tuple[str, ...]
# Name -> record, or (name, record) pairs when one name carries several records.
Records = Mapping[str, TxtValue] | Sequence[tuple[str, TxtValue]]


@dataclass(frozen=True, slots=True)
class DnsServer:
    port: int
    stop: Callable[[], None]

    @property
    def nameservers(self) -> tuple[tuple[str, int], ...]:
        return (("127.0.0.1", self.port),)


def split_txt(value: str, size: int = 255) -> tuple[str, ...]:
    """Cut one long TXT value into character-strings of at most ``size`` octets."""
    return tuple(value[i : i + size] for i in range(0, len(value), size)) or ("",)


def start_dnsmasq(
    records: Records, *, local_ttl: int = 0, extra: Callable[[int], Sequence[str]] | None = None
) -> DnsServer:
    """Start dnsmasq answering the TXT ``records`` and wait until it answers.

    Unknown ``.test`` names are NXDOMAIN; names under ``tempfail.test`` time out, names
    under ``refused.test`` are refused. ``local_ttl`` is the TTL of the records served
    (dnsmasq's default, 0, keeps them out of every cache). ``extra`` gives further
    dnsmasq options, given the port of the socket that never answers."""
    blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blackhole.bind(("127.0.0.1", 0))  # bound, never read: queries to it are simply lost
    last_error = ""
    for _ in range(START_TRIES):
        port = _free_port()
        # A file, not a pipe: nobody reads dnsmasq's log while it runs.
        log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        proc = subprocess.Popen(
            _command(port, records, blackhole.getsockname()[1], local_ttl)
            + list(extra(blackhole.getsockname()[1]) if extra else ()),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if _wait_ready(port, proc):
            return DnsServer(port=port, stop=_stopper(proc, log, blackhole))
        _terminate(proc)
        log.seek(0)
        last_error = log.read().decode(errors="replace")
        log.close()
    blackhole.close()
    raise RuntimeError(f"dnsmasq did not start: {last_error}")


@contextlib.contextmanager
def dnsmasq(
    records: Records, *, local_ttl: int = 0, extra: Callable[[int], Sequence[str]] | None = None
) -> Iterator[DnsServer]:
    server = start_dnsmasq(records, local_ttl=local_ttl, extra=extra)
    try:
        yield server
    finally:
        server.stop()


def _command(port: int, records: Records, dead_port: int, local_ttl: int) -> list[str]:
    cmd = [
        DNSMASQ,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        f"--port={port}",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--pid-file=",
        f"--user={pwd.getpwuid(os.getuid()).pw_name}",
        "--log-facility=-",
        "--local=/test/",
        f"--server=/{TEMPFAIL_ZONE}/127.0.0.1#{dead_port}",
        f"--server=/{REFUSED_ZONE}/#",
        f"--local-ttl={local_ttl}",
    ]
    pairs = records.items() if isinstance(records, Mapping) else records
    for name, value in pairs:
        strings = (value,) if isinstance(value, str) else value
        # On dnsmasq's command line a comma always separates character-strings (quotes
        # are taken literally, a backslash does not escape it), so a comma inside a
        # string cannot be expressed.
        if any("," in s for s in strings):
            raise ValueError(f"dnsmasq cannot serve a comma inside a TXT string: {name}")
        cmd.append(f"--txt-record={name},{','.join(strings)}")
    return cmd


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free loopback port")


def _wait_ready(port: int, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT
    probe = dns.message.make_query("ready.test.", "TXT")
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            reply = dns.query.udp(probe, "127.0.0.1", port=port, timeout=0.2)
        except (dns.exception.DNSException, OSError):
            time.sleep(0.05)
            continue
        return reply.rcode() == dns.rcode.NXDOMAIN
    return False


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _stopper(
    proc: subprocess.Popen[bytes], log: IO[bytes], blackhole: socket.socket
) -> Callable[[], None]:
    def stop() -> None:
        _terminate(proc)
        log.close()
        blackhole.close()

    return stop
