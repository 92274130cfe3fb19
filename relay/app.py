"""The running relay: listeners, spool and delivery wired together, with signals."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from relay import config
from relay.config import Settings
from relay.connlimits import ConnectionLimits
from relay.delivery import Delivery, Upstreams
from relay.inbound import InboundHandler, start_listener
from relay.runtime import Runtime
from relay.spool import Spool
from relay.tlsconfig import ListenerTLS

log = logging.getLogger("relay")

# How long SIGTERM lets in-flight deliveries finish before they are cut off (and left
# in the spool to be sent again after restart).
STOP_DEADLINE = 10.0


class Relay:
    """Everything one `policy-relay serve` process runs."""

    def __init__(self, loaded: Runtime, reload: Callable[[], Runtime] | None = None) -> None:
        self.runtime = loaded
        settings = loaded.settings
        self._reload = reload
        self.spool = Spool(settings.spool_path)
        self.upstreams = Upstreams(settings)
        self.delivery = Delivery(self.spool, settings, self.upstreams)
        self.servers: list[asyncio.Server] = []
        self._stop = asyncio.Event()

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    def current(self) -> Settings:
        """The settings snapshot a new session starts with (swapped whole on reload)."""
        return self.runtime.settings

    async def start(self) -> None:
        # One set of connection counters for all listeners: the caps are per process.
        self.limits = ConnectionLimits()
        self.tls: dict[str, ListenerTLS] = {}
        await self.spool.open()
        queued = await self.spool.count()
        for listener in self.settings.listeners:
            handler = InboundHandler(
                listener, self.current, self.spool, lambda _id: self.delivery.wake()
            )
            if listener.tls != "none":
                self.tls[listener.name] = ListenerTLS(listener.tls_cert, listener.tls_key)
            tls = self.tls.get(listener.name)
            server = await start_listener(
                listener, handler, self.limits, tls.context if tls else None
            )
            self.servers.append(server)
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                log.info("listening on %s:%d (listener %s)", host, port, listener.name)
        log.info("spool %s holds %d messages", self.settings.spool_path, queued)

    def reload(self) -> None:
        """SIGHUP: load and validate everything anew; keep the old settings on any error."""
        if self._reload is None:
            return
        try:
            new = self._reload()
        except config.ConfigError as exc:
            for line in exc.messages:
                log.error("reload failed: %s", line)
            return
        self.runtime = new
        log.info("reloaded configuration from %s and policies from %s (%d rules)",
                 new.settings.source, new.policies_dir, len(new.policy.rules))

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)

        def hangup() -> None:
            self.reload()
            # Certificates renewed in place (certbot and the like) take effect now.
            for tls in self.tls.values():
                tls.reload()

        loop.add_signal_handler(signal.SIGHUP, hangup)
        await self.start()
        delivery = asyncio.create_task(self.delivery.run())
        try:
            await self._stop.wait()
        finally:
            log.info("stopping")
            for server in self.servers:
                server.close()
            # F20: clients between commands get 421 4.3.2 now, busy ones after their
            # current command; whoever is still there at the deadline gets it anyway.
            left = await self.limits.drain(STOP_DEADLINE)
            if left:
                log.info("closed %d SMTP sessions still busy at the deadline", left)
            await self.delivery.stop(STOP_DEADLINE)
            delivery.cancel()
            await asyncio.gather(delivery, return_exceptions=True)
            await self.upstreams.close()
            await self.spool.close()
            log.info("stopped")


def serve(loaded: Runtime, reload: Callable[[], Runtime]) -> None:
    asyncio.run(Relay(loaded, reload).run())
