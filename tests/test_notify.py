"""sd_notify: a datagram socket in a temp dir stands in for systemd."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.ops.notify import Notifier, watchdog_task


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    try:
        yield path, sock
    finally:
        sock.close()


def receive(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def test_ready_status_reloading_stopping_reach_the_manager(
    manager: tuple[str, socket.socket],
) -> None:
    path, sock = manager
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.enabled

    assert notifier.ready("3 queued")
    assert receive(sock) == {"READY": "1", "STATUS": "3 queued"}

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    got = receive(sock)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert got["RELOADING"] == "1"
    assert before <= int(got["MONOTONIC_USEC"]) <= after

    notifier.status("reloaded")
    assert receive(sock) == {"STATUS": "reloaded"}
    notifier.stopping()
    assert receive(sock) == {"STOPPING": "1"}


def test_abstract_socket_names_start_with_nul(tmp_path: Path) -> None:
    name = f"policy-relay-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert Notifier.from_environment({"NOTIFY_SOCKET": "@" + name}).ready()
        assert receive(sock) == {"READY": "1"}


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.reloading() is False
    assert notifier.watchdog_interval is None


def test_a_broken_socket_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="relay.notify"):
        assert notifier.ready() is False
        assert notifier.status("x") is False
    assert len(caplog.records) == 1


def test_watchdog_is_only_for_the_named_pid() -> None:
    mine = Notifier.from_environment(
        {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert mine.watchdog_interval == 2.0
    inherited = Notifier.from_environment(
        {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}
    )
    assert inherited.watchdog_interval is None


async def test_watchdog_task_pings_at_half_the_interval(
    manager: tuple[str, socket.socket],
) -> None:
    path, sock = manager
    sock.setblocking(False)
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    task = asyncio.create_task(watchdog_task(notifier))
    await asyncio.sleep(0.22)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    pings = []
    with contextlib.suppress(BlockingIOError):
        while True:
            pings.append(sock.recv(100))
    assert set(pings) == {b"WATCHDOG=1"}
    assert 3 <= len(pings) <= 6  # every 50 ms for 220 ms


async def test_watchdog_task_returns_when_disabled() -> None:
    await asyncio.wait_for(watchdog_task(Notifier(None)), 1)
