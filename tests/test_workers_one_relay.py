"""[server] workers = 2 is still one relay: one queue, one /metrics, exact limits, one READY."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest
from conftest import RelayProcess, Sink, free_port, run_cli, wait_until
from test_workers import alive

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


# -- the operator's commands without sharp edges ----------------------------------------


async def test_queue_and_limits_options_work_after_the_subcommand(held_relay: RelayProcess):
    socket_path = str(held_relay.control_socket)
    for argv in (("queue", "list", "--control-socket", socket_path),
                 ("queue", "--control-socket", socket_path, "list"),
                 ("limits", "show", "--control-socket", socket_path)):
        result = run_cli(*argv)
        assert result.returncode == 0, (argv, result.stderr)


def test_unknown_limit_is_an_error_named_by_its_own_command(held_relay: RelayProcess):
    result = run_cli("limits", "show", "no-such-limit",
                     "--control-socket", str(held_relay.control_socket))
    assert result.returncode == 1
    assert result.stderr.startswith("policy-relay limits: no limit named 'no-such-limit'")
    assert "all buckets idle" not in result.stdout


async def test_a_closed_pipe_ends_queue_list_quietly(held_relay: RelayProcess):
    both_listening(held_relay)
    assert await send_each_on_its_own_connection(held_relay.port, 3) == [250] * 3
    # `true` exits without reading: every write of the command meets a closed pipe.
    command = (f"{sys.executable} -m relay queue list --json "
               f"--control-socket {held_relay.control_socket} | true; "
               "echo ${PIPESTATUS[0]} >&2")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.stderr.strip() == "141", result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_every_command_help_shows_an_example():
    for argv in (("serve",), ("check",), ("test",), ("queue",), ("queue", "list"),
                 ("limits", "show"), ("passwd",), ("dkim", "keygen"), ("config", "dump")):
        result = run_cli(*argv, "--help")
        assert result.returncode == 0
        assert "example:\n  policy-relay " + argv[0] in result.stdout, argv


def test_queue_list_header_lines_up_with_long_ids():
    from relay.cli.queue import format_mailq

    message = {"id": "661749CF797B8FB4FB4", "state": "queued", "size": 411,
               "arrival_time": 0.0, "sender": "a@example.com",
               "recipients": [{"address": "b@example.org", "state": "queued", "reply": ""}]}
    short = {**message, "id": "ACTIVE1"}

    def offsets(m: dict[str, object]) -> tuple[int, int]:
        """Where the header's columns sit against the row's and the recipient's."""
        header, row, recipient = format_mailq([m]).splitlines()[:3]
        return (header.index("--Size--") + 8 - (row.index("411") + 3),
                header.index("-Sender/Recipient") - recipient.index("b@example.org"))

    # The same layout as postqueue -p gives for its 10-character ids.
    assert offsets(message) == offsets(short) == (1, 1)


def test_ready_answers_once_every_worker_serves(held_relay: RelayProcess, tmp_path: Path):
    ready = run_cli("ready", "--control-socket", str(held_relay.control_socket))
    assert ready.returncode == 0, ready.stderr
    assert "worker 0)" in held_relay.log_text() and "worker 1)" in held_relay.log_text()
    nobody = run_cli("ready", "--control-socket", str(tmp_path / "none.sock"),
                     "--timeout", "0.3")
    assert nobody.returncode == 69
    assert nobody.stderr.startswith("policy-relay ready: not ready after 0.3s")


def test_the_hub_counts_every_worker_and_takes_back_what_a_dead_one_held(tmp_path: Path):
    from relay.workers.hub import Hub, _Holdings

    hub = Hub(tmp_path / "hub.sock", on_ready=lambda worker, status: None)
    one, two = _Holdings(worker=0), _Holdings(worker=1)

    def admit(mine: _Holdings) -> object:
        answer = hub.handle({"id": 1, "op": "admit", "client": "127.0.0.1",
                             "max_total": 3, "max_per_client": 2}, mine)
        assert answer is not None
        return answer["why"]

    assert admit(one) is None and admit(two) is None
    assert admit(one) == "too many connections from 127.0.0.1 (2 of 2)"
    assert hub.handle({"id": 2, "op": "take", "size": 700, "limit": 1000}, one) == \
        {"id": 2, "ok": True}
    assert hub.handle({"id": 3, "op": "take", "size": 400, "limit": 1000}, two) == \
        {"id": 3, "ok": False}
    hub._give_back(one)  # worker 0 died: its connection and its bytes are free again
    assert repr(hub) == "<Hub connections=1 held=0>"
    assert admit(two) is None


def test_workers_die_with_a_supervisor_killed_by_sigkill(held_relay: RelayProcess):
    both_listening(held_relay)
    pids = [int(p) for p in re.findall(r"started worker \d \(pid (\d+)\)", held_relay.log_text())]
    assert len(pids) == 2
    held_relay.kill(signal.SIGKILL)
    wait_until(lambda: not any(alive(pid) for pid in pids), what="both workers gone")
