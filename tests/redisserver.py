"""A real redis-server on a free loopback port, which tests can stop and restart in place."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from conftest import free_port


def ping(port: int, timeout: float = 0.5) -> bool:
    """True when something on 127.0.0.1:`port` answers PING with +PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """`redis-server` in the foreground, no persistence, bound to 127.0.0.1 only.

    The port is fixed at construction, so `restart()` comes back where clients expect it
    (redis-server sets SO_REUSEADDR, so the port is free again as soon as it exits).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        executable: str | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.executable = executable or shutil.which("redis-server") or "/usr/bin/redis-server"
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self._log = self._dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        options = {
            "--port": str(self.port),
            "--bind": "127.0.0.1",
            "--save": "",  # no RDB snapshots, no AOF: a test server leaves nothing behind
            "--appendonly": "no",
            "--daemonize": "no",
            "--dir": str(self._dir),
        }
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.executable, *(word for pair in options.items() for word in pair)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
            )
        deadline = time.monotonic() + self.start_timeout
        while not ping(self.port, timeout=0.2):
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited early:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING:\n{self._log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(self.stop_timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _log_tail(self) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
