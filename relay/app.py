"""The running relay: listeners, spool, delivery and the operator's endpoints, with signals."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from relay import config
from relay.checks.services import CheckServices
from relay.config import Settings
from relay.events.drain import Drain
from relay.events.suppression import SuppressionError, create_list, open_list
from relay.inbound.budget import DataBudget
from relay.inbound.connlimits import ConnectionLimits
from relay.inbound.context import ListenerContext
from relay.inbound.handler import start_listener
from relay.inbound.tls import ListenerTLS
from relay.inbound.users import CheckGate
from relay.ops.conditions import Conditions
from relay.ops.logs import flush_waiting
from relay.ops.metrics import Metrics, readiness, start_http
from relay.ops.notify import Notifier, watchdog_task
from relay.outbound.delivery import Delivery, Upstreams
from relay.queue.control import ControlError, ControlServer
from relay.queue.spool import Spool, SpoolUnusable
from relay.runtime import Runtime
from relay.schema import parse_hostport
from relay.workers.link import Link
from relay.workers.supervisor import Place, Supervisor

log = logging.getLogger("relay")

# How long SIGTERM lets in-flight deliveries finish before they are cut off (and left
# in the spool to be sent again after restart).
STOP_DEADLINE = 10.0


EX_UNAVAILABLE = 69  # sysexits.h
EX_CANTCREAT = 73


class StartupError(Exception):
    """The relay cannot start; the message is one line for the operator and
    `exit_status` the sysexits.h code the process exits with."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class Relay:
    """Everything one `policy-relay serve` process runs.

    What SIGHUP changes: policies, lists, limits (their buckets survive when unchanged),
    the [server] limits and checks settings for new sessions, and TLS certificates.
    Listeners, the spool directory, upstream pools, event sinks and the suppression list
    keep the values they started with.
    """

    def __init__(
        self, loaded: Runtime, reload: Callable[[], Runtime] | None = None,
        place: Place | None = None,
    ) -> None:
        self.runtime = loaded
        settings = loaded.settings
        self._reload = reload
        self.place = place
        self.worker = place.worker if place else 0
        # A worker shares caps, budget and in-memory buckets through the supervisor's hub.
        self.link = Link(place.hub, place.worker) if place else None
        self.metrics = Metrics()
        self.notifier = Notifier.from_environment()
        self.conditions = Conditions()
        self.conditions.watchers.append(self.metrics.condition)
        if self.link is not None:
            self.conditions.watchers.append(self.link.condition)
        # One suppression list for every worker: suppression.db in the spool root, or Redis.
        self.suppression = open_list(settings.suppression, settings.spool_path)
        self.services = self._services(loaded)
        self.spool = Spool(spool_shard(settings, self.worker), self.conditions)
        self.drain = Drain(self.spool, settings.events, self.metrics)
        self.upstreams = Upstreams(settings)
        self.delivery = Delivery(self.spool, settings, self.upstreams, metrics=self.metrics,
                                 suppression=self.suppression, conditions=self.conditions)
        self.control = ControlServer(
            self.spool, self.delivery.wake,
            place.control if place else settings.ops.control_socket_path,
            None if place else settings.ops.control_group or None,
            limiter=lambda: self.services.limiter, metrics=self._exposition,
            probe=self.delivery.flush,
        )
        self.limits = ConnectionLimits(link=self.link, conditions=self.conditions)
        self.budget = DataBudget(settings.inbound.max_data_memory, self.link)
        self.passwords = CheckGate()
        self.tls: dict[str, ListenerTLS] = {}
        self.servers: list[asyncio.Server] = []
        self.http: asyncio.Server | None = None
        self._stop = asyncio.Event()
        self._reloading: asyncio.Task[None] | None = None

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    def _services(self, loaded: Runtime) -> CheckServices:
        return CheckServices(loaded.settings.checks, dict(loaded.policy.limits), self.metrics,
                             self.link, self.suppression, self.conditions)

    def current(self) -> Runtime:
        """The snapshot a new session starts with (swapped whole on reload)."""
        return self.runtime

    def current_services(self) -> CheckServices:
        return self.services

    async def start(self) -> None:
        await self.spool.open()
        queued = await self.spool.count()
        await self.drain.start()
        try:
            await self.suppression.prepare()
        except SuppressionError as exc:
            raise StartupError(f"cannot open the suppression list: {exc}",
                               EX_CANTCREAT) from None
        if self.link is not None:
            await self.link.open()
        for listener in self.settings.listeners:
            if listener.tls != "none":
                self.tls[listener.name] = ListenerTLS(listener.tls_cert, listener.tls_key)
            tls = self.tls.get(listener.name)
            context = ListenerContext(
                listener, self.current, self.current_services, self.spool,
                self.delivery.offer, self.metrics, self.limits, self.budget,
                tls.context if tls else None, passwords=self.passwords,
            )
            try:
                server = await start_listener(
                    context, reuse_port=self.settings.worker_count > 1)
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {listener.host}:{listener.port} (listener "
                    f"{listener.name}): {exc.strerror or exc}", EX_UNAVAILABLE) from None
            self.servers.append(server)
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                log.info("listening on %s:%d (listener %s%s)", host, port, listener.name,
                         f", worker {self.worker}" if self.settings.worker_count > 1 else "")
        if self.link is not None:
            # The supervisor serves the public control socket and /metrics over every
            # shard, asking each worker on its private socket (relay/workers/fanout.py).
            await self.control.start()
            self.metrics.reload_succeeded()
            self._ready(f"{queued} messages queued")
            return
        # The operator's endpoints matter less than mail: a relay that cannot open them
        # (a stale socket of another relay, a port in use) says so and keeps serving.
        try:
            await self.control.start()
        except (ControlError, OSError) as exc:
            log.error("control socket %s unavailable, queue commands will not work: %s",
                      self.settings.ops.control_socket_path, exc)
        if self.settings.ops.metrics_listen:
            host, port = parse_hostport(self.settings.ops.metrics_listen)
            try:
                self.http = await start_http(self.metrics, host, port, readiness({
                    "listeners": lambda: bool(self.servers),
                    "spool": lambda: self.spool.writable
                    and os.access(self.settings.spool_path, os.W_OK),
                    # Delivery results wait for a spool that cannot take them.
                    "delivery": lambda: not self.delivery.paused,
                    "policy": lambda: self.runtime.policy is not None,
                }, self.conditions.readiness), self._refresh_metrics)
            except OSError as exc:
                log.error("metrics endpoint %s:%d unavailable: %s", host, port, exc)
            else:
                log.info("metrics on http://%s:%d/metrics", host, port)
        self.metrics.reload_succeeded()
        log.info("spool %s holds %d messages", self.settings.spool_path, queued)
        self._ready(f"{queued} messages queued")

    def _ready(self, status: str) -> None:
        # The lines that led here are out before anyone hears "ready".
        flush_waiting()
        if self.link is not None:
            self.link.send("ready", status=status)
        self.notifier.ready(status)

    async def _exposition(self) -> bytes:
        await self._refresh_metrics()
        return self.metrics.exposition()

    async def _refresh_metrics(self) -> None:
        groups = self.upstreams.groups
        await self.metrics.refresh(self.spool, {n: g.hosts for n, g in groups.items()})
        await self.drain.refresh_metrics()
        for name, group in groups.items():
            self.metrics.upstream_up(name, group.up)

    async def reload(self) -> None:
        """SIGHUP: load and validate everything anew; keep the old runtime on any error."""
        self.notifier.reloading()
        try:
            if self._reload is not None:
                await self._swap(self._reload())
        except config.ConfigError as exc:
            for line in exc.messages:
                log.error("reload failed: %s", line)
            self.metrics.reload_failed()
        else:
            self.metrics.reload_succeeded()
        # Certificates renewed in place (certbot and the like) take effect now.
        for tls in self.tls.values():
            tls.reload()
        self._ready(f"{await self.spool.count()} messages queued")

    async def _swap(self, new: Runtime) -> None:
        if new.settings.checks != self.settings.checks:
            # New resolver or Redis settings: new services (in-memory buckets restart).
            old, self.services = self.services, self._services(new)
            await old.close()
        else:
            await self.services.limiter.reload(new.policy.limits.values())
        self.runtime = new
        log.info("reloaded configuration from %s and policies from %s (%d rules)",
                 new.settings.source, new.policies_dir, len(new.policy.rules))

    def stop(self) -> None:
        self._stop.set()

    def hangup(self) -> None:
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.create_task(self.reload())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.hangup)
        await self.start()
        delivery = asyncio.create_task(self.delivery.run())
        watchdog = asyncio.create_task(watchdog_task(self.notifier))
        trimmer = asyncio.create_task(trim_after_bursts(self.budget))
        try:
            await self._stop.wait()
        finally:
            log.info("stopping")
            self.notifier.stopping()
            for server in self.servers:
                server.close()
            # Graceful stop: clients between commands get 421 4.3.2 now, busy ones after their
            # current command; whoever is still there at the deadline gets it anyway.
            left = await self.limits.drain(STOP_DEADLINE)
            if left:
                log.info("closed %d SMTP sessions still busy at the deadline", left)
            await self.delivery.stop(STOP_DEADLINE)
            for task in (delivery, watchdog, trimmer):
                task.cancel()
            await asyncio.gather(delivery, watchdog, trimmer, return_exceptions=True)
            await self.control.stop()
            if self.http is not None:
                self.http.close()
            await self.upstreams.close()
            await self.services.close()
            await self.drain.stop()
            await self.suppression.close()
            await self.spool.close()
            if self.link is not None:
                await self.link.close()
            log.info("stopped")


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (the `fast` extra), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def spool_shard(settings: Settings, worker: int) -> Path:
    """Worker 0 keeps spool_dir itself (so one process or many use the same queue);
    worker N > 0 has its own spool in spool_dir/worker-N."""
    return settings.spool_path if worker == 0 else settings.spool_path / f"worker-{worker}"


def keep_large_buffers_returnable() -> None:
    """Pin glibc's mmap threshold (M_MMAP_THRESHOLD) at 256 KB.

    glibc raises the threshold each time a large mmap'd block is freed, so after a burst
    of 10 MB messages later ones come from the heap and their memory stays with the
    process (1.4 GB after 50 concurrent 10 MB messages in the bench). Pinned, buffers
    of messages and chunks go back to the system when freed.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 256 * 1024)


async def trim_after_bursts(budget: DataBudget, period: float = 1.0) -> None:
    """Give freed memory back to the system once the sessions hold no message data.

    A burst of large messages leaves glibc's heaps full of freed pieces (256K reads and
    lines, under the mmap threshold): freed, but still resident. malloc_trim(3) returns
    them; it runs at most once a `period`, and only when data went through since.
    """
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    trimmed = budget.taken
    while True:
        await asyncio.sleep(period)
        if budget.held == 0 and budget.taken != trimmed:
            trimmed = budget.taken
            trim(0)


def serve(loaded: Runtime, reload: Callable[[], Runtime]) -> int:
    """Run the relay until it stops; the process's exit status."""
    keep_large_buffers_returnable()
    hostname = loaded.settings.smtp_hostname
    if config.is_localhost(hostname):
        # Receivers refuse or distrust HELO localhost, and Received: says nothing.
        log.warning('the relay calls itself "%s" in its banner, EHLO and Received:; set '
                    '[server] hostname or give the machine a fully qualified name '
                    "(hostname -f)", hostname)
    if loaded.settings.worker_count > 1:
        try:
            create_list(loaded.settings.suppression, loaded.settings.spool_path)
        except SuppressionError as exc:
            log.error("cannot open the suppression list: %s", exc)
            return EX_CANTCREAT
        supervisor = Supervisor(loaded, reload, run_worker)
        supervisor.run()
        return supervisor.exit_status
    try:
        run_worker(loaded, reload, None)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def run_worker(loaded: Runtime, reload: Callable[[], Runtime], place: Place | None) -> None:
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(Relay(loaded, reload, place).run())
    except (SpoolUnusable, StartupError) as exc:
        # One line an operator can act on, and a sysexits status the unit can tell
        # apart (a busy spool may free up; a damaged one will not by restarting).
        log.error("%s", exc)
        raise SystemExit(exc.exit_status) from None
