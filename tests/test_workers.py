"""[server] workers: several processes share the listening port, each with its own spool
shard; the parent forwards signals and replaces a worker that dies."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
from pathlib import Path

import aiosmtplib
from conftest import RelayProcess, Sink, wait_until

MESSAGE = b"From: a@example.test\r\nSubject: workers\r\n\r\nbody\r\n"


def worker_pids(relay: RelayProcess) -> dict[int, int]:
    """worker number -> pid, from the supervisor's log (latest start wins)."""
    return {int(w): int(p) for w, p in
            re.findall(r"started worker (\d+) \(pid (\d+)\)", relay.log_text())}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes: the supervisor has not reaped it yet.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def listening(relay: RelayProcess, worker: int) -> int:
    """How many times worker `worker` has logged that it is listening."""
    return len(re.findall(rf"listening on .*, worker {worker}\)", relay.log_text()))


async def send_many(port: int, count: int) -> None:
    for i in range(count):  # a connection each, so the kernel spreads them
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
            await client.sendmail("a@example.test", [f"r{i}@dest.test"], MESSAGE)


async def test_two_workers_share_the_port_and_deliver_everything(
    sink: Sink, start_relay, tmp_path: Path
):
    relay = start_relay(sink.port, extra="workers = 2")
    wait_until(lambda: "worker 1)" in relay.log_text() and "worker 0)" in relay.log_text(),
               what="both workers listening")
    await send_many(relay.port, 40)
    got = sink.wait_messages(40)
    assert sorted(m.recipients[0] for m in got) == sorted(f"r{i}@dest.test" for i in range(40))
    # Both took connections: each shard's log lines name its own queue ids.
    accepted = re.findall(r"(\w+): client=\[127\.0\.0\.1\]", relay.log_text())
    assert len(accepted) == 40
    assert (tmp_path / "spool" / "spool.db").exists()
    assert (tmp_path / "spool" / "worker-1" / "spool.db").exists()
    pids = worker_pids(relay)
    relay.stop()
    assert relay.proc is not None and relay.proc.returncode == 0
    assert not any(alive(pid) for pid in pids.values())
    assert "all workers stopped" in relay.log_text()


async def test_a_worker_that_dies_is_replaced_and_nothing_queued_is_lost(
    sink: Sink, start_relay, tmp_path: Path
):
    relay = start_relay(sink.port, extra="workers = 2")
    # Kill worker 1 once it serves: its "listening" line is the one its successor repeats.
    wait_until(lambda: listening(relay, 1) == 1 and listening(relay, 0) == 1,
               what="both workers listening")
    first = worker_pids(relay)[1]
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: worker_pids(relay).get(1, first) != first, what="worker 1 restarted")
    wait_until(lambda: listening(relay, 1) == 2, what="the new worker 1 listening")
    await send_many(relay.port, 10)
    assert len(sink.wait_messages(10)) == 10
    relay.stop()
    for shard in (tmp_path / "spool" / "spool.db", tmp_path / "spool" / "worker-1" / "spool.db"):
        with sqlite3.connect(shard) as db:
            assert db.execute("SELECT COUNT(*) FROM message").fetchone() == (0,)


async def test_sighup_reaches_every_worker(sink: Sink, start_relay):
    relay = start_relay(sink.port, extra="workers = 2")
    wait_until(lambda: listening(relay, 0) == 1 and listening(relay, 1) == 1,
               what="both workers listening")
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: relay.log_text().count("reloaded configuration") == 2,
               what="both workers reloaded")
    assert "exited with status" not in relay.log_text()


async def test_sighup_while_workers_start_reloads_and_kills_none(sink: Sink, start_relay):
    """A SIGHUP forwarded to a worker that has not yet installed its own handler must not
    kill it (the default action of SIGHUP is to terminate)."""
    relay = start_relay(sink.port, extra="workers = 2", wait=False)
    wait_until(lambda: len(worker_pids(relay)) == 2, what="two workers forked", poll=0.001)
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: listening(relay, 0) >= 1 and listening(relay, 1) >= 1,
               what="both workers listening")
    assert "exited with status" not in relay.log_text()
