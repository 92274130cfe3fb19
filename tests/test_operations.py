"""Operating a running relay: metrics, health, the queue CLI, sd_notify, config dump."""

from __future__ import annotations

import signal
import socket
import urllib.request
from pathlib import Path

import aiosmtplib
import pytest
from conftest import RelayProcess, Sink, free_port, relay_config, run_cli, wait_until
from prometheus_client.parser import text_string_to_metric_families

MESSAGE = b"From: a@example.test\r\nSubject: ops\r\n\r\nbody\r\n"


async def send(port: int, sender: str = "a@example.test", to: str = "b@dest.test") -> str:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        _, reply = await client.sendmail(sender, [to], MESSAGE)
        return reply


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_what_happened(tmp_path: Path, sink: Sink, start_relay):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "10.toml").write_text(
        '[[rule]]\nname = "no-spam"\nmatch.sender = "spam@example.test"\naction = "reject"\n\n'
        '[[rule]]\nname = "local"\nmatch.client_address = "@relay_networks"\naction = "accept"\n'
    )
    port = free_port()
    relay = start_relay(sink.port, extra=f'policies_dir = "{policies}"',
                        metrics=f"127.0.0.1:{port}")
    connections = value(scrape(port)[1], "relay_smtpd_connections_total", listener="smtp")
    await send(relay.port)
    await send(relay.port)
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(relay.port, sender="spam@example.test")
    sink.wait_messages(2)
    wait_until(lambda: value(scrape(port)[1], "relay_deliveries_total", upstream="default",
                             status="sent") == 2, what="two deliveries in the metrics")
    status, text = scrape(port)
    assert status == 200
    assert value(text, "relay_messages_received_total", listener="smtp") == 2
    assert value(text, "relay_smtpd_rejects_total", stage="rcpt", code="550") == 1
    assert value(text, "relay_policy_decisions_total", stage="rcpt", rule="no-spam",
                 action="reject") == 1
    assert value(text, "relay_policy_decisions_total", stage="data", rule="local",
                 action="accept") == 2
    assert value(text, "relay_smtpd_connections_total", listener="smtp") == connections + 3
    assert value(text, "relay_config_last_reload_successful") == 1
    assert value(text, "relay_upstream_up", upstream="default") == 1
    assert "127.0.0.1" not in text and "example.test" not in text
    assert scrape(port, "/healthz")[0] == 200
    assert scrape(port, "/readyz")[0] == 200


async def test_queue_cli_manages_deferred_mail(start_relay):
    relay: RelayProcess = start_relay(free_port())  # the upstream is down
    ids = [(await send(relay.port, to=f"r{i}@dest.test")).rsplit(" ", 1)[1] for i in range(3)]
    socket_flag = ("queue", "--control-socket", str(relay.control_socket))

    def queue(*args: str):  # type: ignore[no-untyped-def]
        return run_cli(*socket_flag, *args)

    wait_until(lambda: queue("list").stdout.count("connection to 127.0.0.1") == 3,
               what="three deferred messages")
    listing = queue("list").stdout
    for queue_id in ids:
        assert queue_id in listing
    assert listing.rstrip().endswith("in 3 Requests.")

    assert queue("hold", ids[0]).returncode == 0
    assert f"{ids[0]}!" in queue("list").stdout
    assert queue("release", ids[0]).returncode == 0
    assert f"{ids[0]}!" not in queue("list").stdout
    assert queue("flush").returncode == 0
    assert queue("delete", ids[1]).returncode == 0
    assert ids[1] not in queue("list").stdout

    lower = queue("delete", "all")
    assert lower.returncode == 1  # "all" is taken as a queue id, as postsuper does
    assert len([line for line in queue("list").stdout.splitlines() if "@" in line]) >= 2
    assert queue("delete", "ALL", "deferred").returncode == 0
    wait_until(lambda: relay.queue_rows() == [], what="an empty queue")


def test_sd_notify_ready_and_reloading(tmp_path: Path, sink: Sink, start_relay):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(path))
        systemd.settimeout(10)
        relay = start_relay(sink.port, env={"NOTIFY_SOCKET": str(path)})
        first = systemd.recv(4096).decode()
        assert "READY=1" in first.splitlines()
        relay.proc.send_signal(signal.SIGHUP)
        seen = ""
        while "READY=1" not in seen.split("RELOADING=1", 1)[-1]:
            seen += systemd.recv(4096).decode() + "\n"
        assert "RELOADING=1" in seen
        assert "MONOTONIC_USEC=" in seen


def test_config_dump_redacts_secrets(tmp_path: Path):
    secret = tmp_path / "upstream.secret"
    secret.write_text("hunter2\n")
    config = tmp_path / "config.toml"
    config.write_text(
        f'[upstream.default]\nhosts = ["smtp.example.test:587"]\ntls = "starttls"\n'
        f'auth_username = "relay"\npassword_file = "{secret}"\n'
    )
    result = run_cli("config", "dump", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "smtp.example.test" in result.stdout
    assert "hunter2" not in result.stdout
    as_json = run_cli("config", "dump", "--json", "--config", str(config))
    assert '"hosts"' in as_json.stdout and "hunter2" not in as_json.stdout


async def test_json_log_format_carries_the_same_fields(sink: Sink, start_relay):
    import json

    relay = start_relay(sink.port, sections='\n[log]\nformat = "json"\n')
    queue_id = (await send(relay.port)).rsplit(" ", 1)[1]
    sink.wait_messages(1)
    wait_until(lambda: '"status": "sent"' in relay.log_text(), what="the delivery line")
    entries = [json.loads(line) for line in relay.log_text().splitlines()]
    [delivery] = [e for e in entries if e.get("status") == "sent"]
    assert delivery["queue_id"] == queue_id
    assert delivery["to"] == "b@dest.test"
    assert delivery["relay"] == f"sink.test[127.0.0.1]:{sink.port}"
    assert delivery["reply"].startswith("250 ")
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)


async def test_a_busy_control_socket_or_metrics_port_does_not_stop_mail(
    tmp_path: Path, sink: Sink, start_relay
):
    metrics_port = free_port()
    first = start_relay(sink.port, metrics=f"127.0.0.1:{metrics_port}")
    other = tmp_path / "second"
    other.mkdir()
    port = free_port()
    text = relay_config(sink.port, port, other / "spool", metrics=f"127.0.0.1:{metrics_port}")
    # The same control socket as the first relay, and the same metrics port.
    text = text.replace(str(other / "control.sock"), str(first.control_socket))
    second = RelayProcess(other, text, port).start()
    try:
        await send(second.port)
        sink.wait_messages(1)
        log = second.log_text()
        assert "queue commands will not work: another relay is listening" in log
        assert f"metrics endpoint 127.0.0.1:{metrics_port} unavailable" in log
    finally:
        second.stop()


def test_a_relay_called_localhost_warns_at_start(sink: Sink, tmp_path: Path):
    port = free_port()
    text = relay_config(sink.port, port, tmp_path / "spool").replace(
        'hostname = "relay.test"', 'hostname = "localhost"')
    relay = RelayProcess(tmp_path, text, port).start()
    try:
        assert 'the relay calls itself "localhost"' in relay.log_text()
    finally:
        relay.stop()
