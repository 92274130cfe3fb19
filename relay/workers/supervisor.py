"""[server] workers > 1: the parent of the worker processes, which makes them one relay."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay.ops.metrics import readiness, start_http
from relay.ops.notify import Notifier, watchdog_task
from relay.queue.control import ControlError
from relay.runtime import Runtime
from relay.schema import ConfigError, parse_hostport
from relay.workers.fanout import MergedMetrics, ShardedControl
from relay.workers.hub import Hub

# Exit statuses of a worker that could not start (relay.app.StartupError, a busy or
# damaged spool): its replacement would fail the same way.
STARTUP_FAILURES = frozenset({69, 73, 74, 75})

log = logging.getLogger("relay")

PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True, slots=True)
class Place:
    """Where one worker meets the supervisor: its number, the hub, its private socket."""

    worker: int
    hub: Path
    control: Path


RunWorker = Callable[[Runtime, Callable[[], Runtime], Place], None]


def die_with_parent(parent: int) -> None:
    """SIGTERM this process when the supervisor dies, even by SIGKILL (prctl(2)
    PR_SET_PDEATHSIG): workers die with their supervisor, never serve alone."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    """Forks the workers and gives them one face.

    Each worker is a whole relay (listeners bound with SO_REUSEPORT, so the kernel
    spreads connections over them, its own spool shard and delivery). The supervisor
    owns what must be global (relay/workers/hub.py), serves the one control socket and
    the one /metrics over every shard (relay/workers/fanout.py), tells systemd READY=1
    once every worker listens, forwards signals, and restarts a worker that died.
    """

    RESTART_PAUSE = 1.0

    def __init__(self, loaded: Runtime, reload: Callable[[], Runtime],
                 run_worker: RunWorker) -> None:
        self.loaded = loaded
        self.reload = reload
        self.run_worker = run_worker
        self.count = loaded.settings.worker_count
        self.children: dict[int, int] = {}  # pid -> worker
        self.stopping = False
        self.exit_status = 0
        self.notifier = Notifier.from_environment()
        self.ready: set[int] = set()
        self.told_ready = False
        self.rundir = Path(tempfile.mkdtemp(prefix="policy-relay-"))
        self.hub = Hub(self.rundir / "hub.sock", self.worker_ready)
        ops = loaded.settings.ops
        self.control = ShardedControl(
            ops.control_socket_path, ops.control_group or None,
            {n: self.rundir / f"worker-{n}.sock" for n in range(self.count)},
        )
        self.http: asyncio.Server | None = None
        self.loop = asyncio.new_event_loop()
        self.parent = os.getpid()
        self._event = asyncio.Event()
        self._due: list[int] = []

    def place(self, worker: int) -> Place:
        return Place(worker, self.hub.path, self.control.shards[worker])

    def worker_ready(self, worker: int, status: str) -> None:
        self.ready.add(worker)
        if len(self.ready) == self.count and not self.told_ready:
            self.told_ready = True
            log.info("all %d workers listening", self.count)
            self.notifier.ready(f"{self.count} workers; {status}")

    def spawn(self, worker: int) -> None:
        pid = os.fork()
        if pid == 0:
            self._become_worker(worker)
        self.children[pid] = worker
        log.info("started worker %d (pid %d)", worker, pid)

    def _become_worker(self, worker: int) -> None:
        self.children.clear()  # a signal before the reset below must not reach siblings
        status = 0
        try:
            die_with_parent(self.parent)
            # The supervisor's loop is not running while it forks; the worker runs its own
            # and leaves that one alone: closing it would unregister the parent's file
            # descriptors from the epoll instance both processes share.
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            # SIGHUP's default action terminates: a reload forwarded before the
            # worker's event loop handles it (Relay.run) must not kill the worker.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            # The supervisor speaks for the service (NotifyAccess=main).
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
            self.run_worker(self.loaded, self.reload, self.place(worker))
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.exception("worker %d failed", worker)
            status = 1
        finally:
            logging.shutdown()
            os._exit(status)

    def forward(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
            self.notifier.stopping()
            signum = signal.SIGTERM
        elif signum == signal.SIGHUP:
            # READY=1 again once every worker has reloaded.
            self.notifier.reloading()
            self.ready.clear()
            self.told_ready = False
            # A worker started after this (to replace one that died) starts with what
            # the others reload; on errors they keep the old, and so does this.
            with contextlib.suppress(ConfigError):
                self.loaded = self.reload()
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def run(self) -> None:
        loop = self.loop
        try:
            loop.run_until_complete(self._start())
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(sig, self.forward, sig)
            loop.add_signal_handler(signal.SIGCHLD, self._event.set)
            watchdog = loop.create_task(watchdog_task(self.notifier))
            for worker in range(self.count):
                self.spawn(worker)
            while self.children:
                # Forks happen here, between runs of the loop, never inside it.
                loop.run_until_complete(self._event.wait())
                self._event.clear()
                self._reap()
                while self._due and not self.stopping:
                    self.spawn(self._due.pop())
            watchdog.cancel()
            loop.run_until_complete(self._stop())
        finally:
            loop.close()
            shutil.rmtree(self.rundir, ignore_errors=True)
        log.info("all workers stopped")

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.children.pop(pid, None)
            if worker is None or self.stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            if code in STARTUP_FAILURES:
                # What stopped it (the spool, a port) will stop its replacement too.
                log.error("worker %d could not start (exit status %d); stopping", worker,
                          code)
                self.exit_status = code
                self.forward(signal.SIGTERM)
                continue
            log.error("worker %d (pid %d) exited with status %d; restarting it", worker, pid,
                      os.waitstatus_to_exitcode(status))
            self.ready.discard(worker)
            self.loop.call_later(self.RESTART_PAUSE, self._restart, worker)

    def _restart(self, worker: int) -> None:
        self._due.append(worker)
        self._event.set()

    async def _start(self) -> None:
        await self.hub.start()
        settings = self.loaded.settings
        # The operator's endpoints matter less than mail: say so and keep serving.
        try:
            await self.control.start()
        except (ControlError, OSError) as exc:
            log.error("control socket %s unavailable, queue commands will not work: %s",
                      settings.ops.control_socket_path, exc)
        if settings.ops.metrics_listen:
            host, port = parse_hostport(settings.ops.metrics_listen)
            merged = MergedMetrics(self.control)
            try:
                self.http = await start_http(merged, host, port, readiness({
                    "workers": lambda: len(self.ready) == self.count,
                }, self.hub.degraded), merged.refresh)
            except OSError as exc:
                log.error("metrics endpoint %s:%d unavailable: %s", host, port, exc)
            else:
                log.info("metrics on http://%s:%d/metrics", host, port)

    async def _stop(self) -> None:
        await self.control.stop()
        if self.http is not None:
            self.http.close()
        await self.hub.stop()
