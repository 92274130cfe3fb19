"""[server] workers = 2 is still one relay: one queue, one /metrics, exact limits, one READY."""

from __future__ import annotations

import json
import socket
import sqlite3
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest
from conftest import RelayProcess, Sink, free_port, run_cli, wait_until

MESSAGE = b"From: a@example.test\r\nSubject: one relay\r\n\r\nbody\r\n"

BURST = r"""
[limit.per_client]
key   = ["client_address"]
count = "message"
rate  = "5/1h"
burst = 5

[[rule]]
name = "client-rate"
over_limit = "per_client"
action  = "tempfail"
message = "451 4.7.1 Rate limit exceeded for {client_address}"

[[rule]]
name = "local"
match.client_address = "@relay_networks"
action = "accept"
"""


def shard_counts(spool: Path) -> list[int]:
    counts = []
    for db in (spool / "spool.db", spool / "worker-1" / "spool.db"):
        with sqlite3.connect(db) as conn:
            counts.append(conn.execute("SELECT COUNT(*) FROM message").fetchone()[0])
    return counts


async def send_each_on_its_own_connection(port: int, count: int) -> list[int]:
    """The DATA reply code of each message (a connection each: the kernel spreads them)."""
    codes = []
    for i in range(count):
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
            try:
                await client.sendmail("a@example.test", [f"r{i}@dest.test"], MESSAGE)
                codes.append(250)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                codes.append(exc.recipients[0].code)
    return codes


def queue(relay: RelayProcess, *args: str) -> str:
    result = run_cli("queue", "--control-socket", str(relay.control_socket), *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def held_relay(tmp_path: Path, start_relay) -> RelayProcess:
    """Two workers whose upstream is down, so that what they accept stays queued."""
    return start_relay(free_port(), extra="workers = 2")


def both_listening(relay: RelayProcess) -> None:
    wait_until(lambda: "worker 0)" in relay.log_text() and "worker 1)" in relay.log_text(),
               what="both workers listening")


async def test_queue_commands_see_and_change_every_shard(held_relay: RelayProcess,
                                                         tmp_path: Path):
    both_listening(held_relay)
    assert await send_each_on_its_own_connection(held_relay.port, 30) == [250] * 30
    counts = shard_counts(tmp_path / "spool")
    assert sum(counts) == 30 and all(counts), counts  # both workers took mail
    listed = [json.loads(line) for line in queue(held_relay, "list", "--json").splitlines()]
    assert len(listed) == 30
    ids = [m["queue_id"] for m in listed]
    assert queue(held_relay, "summary").startswith("30 messages,")
    assert "30" in queue(held_relay, "flush")
    # One id of each shard, and one that no shard holds.
    result = run_cli("queue", "--control-socket", str(held_relay.control_socket), "delete",
                     *ids, "NOSUCHID")
    assert "NOSUCHID" in result.stderr + result.stdout
    assert shard_counts(tmp_path / "spool") == [0, 0]
    assert queue(held_relay, "list", "--json") == ""


async def test_metrics_count_every_worker(sink: Sink, start_relay, tmp_path: Path):
    metrics_port = free_port()
    relay = start_relay(sink.port, extra="workers = 2", metrics=f"127.0.0.1:{metrics_port}")
    both_listening(relay)
    assert await send_each_on_its_own_connection(relay.port, 20) == [250] * 20
    sink.wait_messages(20)
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=10).read().decode()
    received = [line for line in text.splitlines()
                if line.startswith('relay_messages_received_total{listener="smtp"}')]
    assert received == ['relay_messages_received_total{listener="smtp"} 20.0']
    connections = [line for line in text.splitlines()
                   if line.startswith("relay_smtpd_connections_total")]
    assert connections == ['relay_smtpd_connections_total{listener="smtp"} 20.0']


async def test_a_burst_of_five_lets_exactly_five_through_two_workers(
    sink: Sink, start_relay, tmp_path: Path
):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "20-limits.toml").write_text(BURST)
    relay = start_relay(sink.port, extra=f'workers = 2\npolicies_dir = "{policies}"')
    both_listening(relay)
    codes = await send_each_on_its_own_connection(relay.port, 12)
    assert codes.count(250) == 5 and codes.count(451) == 7, codes
    counts = shard_counts(tmp_path / "spool")
    assert sum(counts) + len(sink.wait_messages(5)) >= 5
    shown = run_cli("limits", "--control-socket", str(relay.control_socket), "show")
    assert any(line.split()[:4] == ["per_client", "127.0.0.1", "local", "0"]
               for line in shown.stdout.splitlines()), shown.stdout


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    try:
        yield path, sock
    finally:
        sock.close()


def test_ready_comes_once_when_every_worker_listens(
    sink: Sink, start_relay, manager: tuple[str, socket.socket]
):
    path, sock = manager
    relay = start_relay(sink.port, extra="workers = 2", env={"NOTIFY_SOCKET": path},
                        wait=False)
    first = sock.recv(4096).decode()
    assert "READY=1" in first
    log = relay.log_text()
    assert "worker 0)" in log and "worker 1)" in log
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):  # nobody else says READY=1
        while True:
            assert "READY=1" not in sock.recv(4096).decode()
