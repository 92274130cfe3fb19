"""systemd's sd_notify protocol, by hand.

API:

    notifier = Notifier.from_environment()   # NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID
    notifier.ready("12 queued, 2/2 upstreams up")   # READY=1 + STATUS=
    notifier.reloading()                      # RELOADING=1 + MONOTONIC_USEC=; then ready()
    notifier.status("...")                    # STATUS=
    notifier.stopping()                       # STOPPING=1
    notifier.watchdog()                       # WATCHDOG=1
    task = asyncio.create_task(watchdog_task(notifier))   # returns at once if disabled

Without NOTIFY_SOCKET every call is a no-op. No call ever raises: a broken notify socket
must not take the relay down, so the first failure is logged and later ones are not.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

from relay.ops.logs import flush_waiting

log = logging.getLogger("relay.notify")


class Notifier:
    """Sends state changes to the service manager over its datagram socket."""

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        # "@name" is a Linux abstract-namespace socket: the name starts with a NUL byte.
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        self.watchdog_usec = watchdog_usec
        self._failed = False

    def __repr__(self) -> str:
        target = "off" if self.address is None else repr(self.address)
        return f"<Notifier {target} watchdog={self.watchdog_usec}us>"

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec = 0
        try:
            usec = int(env.get("WATCHDOG_USEC", "0"))
        except ValueError:
            log.warning("ignoring malformed WATCHDOG_USEC=%r", env.get("WATCHDOG_USEC"))
        # sd_watchdog_enabled(3): the watchdog is meant for WATCHDOG_PID only, so a
        # child that inherited the environment does not ping on its parent's behalf.
        pid = env.get("WATCHDOG_PID")
        if pid is not None and pid != str(os.getpid()):
            usec = 0
        return cls(address, max(0, usec))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WATCHDOG_USEC, as sd_watchdog_enabled advises)."""
        if not self.enabled or self.watchdog_usec <= 0:
            return None
        return self.watchdog_usec / 2_000_000

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # Type=notify-reload (systemd >= 253) wants MONOTONIC_USEC with RELOADING=1 so it
        # can tell this reload from an earlier one; older systemd ignores it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def send(self, *assignments: str) -> bool:
        """Send one datagram of newline-separated assignments; True if it went out."""
        if self.address is None:
            return False
        message = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        flush_waiting()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never wait on the manager: a full socket buffer drops this message.
                sock.setblocking(False)
                sock.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify service manager at %r: %s (further failures "
                            "not logged)", self.address, exc)
            return False
        return True


async def watchdog_task(notifier: Notifier) -> None:
    """Ping the watchdog from the event loop, so a stuck loop stops the pings."""
    interval = notifier.watchdog_interval
    if interval is None:
        return
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)
