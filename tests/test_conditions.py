"""Repeated failures are conditions: one log line when they start, one when they end
(with the count), and visible in /readyz and the metrics meanwhile."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest
from conftest import RelayProcess, Sink, free_port, run_cli, wait_until
from prometheus_client.parser import text_string_to_metric_families
from redisserver import RedisServer

from relay.ops.conditions import DISK_FULL, UPSTREAM_DOWN, Conditions
from relay.ops.metrics import readiness

MESSAGE = b"From: app@example.test\r\nSubject: conditions\r\n\r\nbody\r\n"

REDIS_POLICY = """
[limit.per_sender]
key     = ["sender"]
count   = "message"
rate    = "1000/1h"
burst   = 1000
backend = "redis"

[[rule]]
name = "sender-rate"
over_limit = "per_sender"
action  = "tempfail"

[[rule]]
name = "local"
match.client_address = "@relay_networks"
action = "accept"
"""


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric(port: int, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(get(port, "/metrics")[1]):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def send(port: int) -> str:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        return (await client.sendmail("app@example.test", ["b@dest.test"], MESSAGE))[1]


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def test_redis_down_is_logged_at_start_and_end_and_shown_meanwhile(
    tmp_path: Path, sink: Sink, redis: RedisServer, start_relay
):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "10.toml").write_text(REDIS_POLICY)
    metrics = free_port()
    relay: RelayProcess = start_relay(
        sink.port, extra=f'policies_dir = "{policies}"', metrics=f"127.0.0.1:{metrics}",
        sections=f'\n[ratelimit]\nredis_url = "{redis.url}"\nredis_timeout = "200ms"\n')
    await send(relay.port)
    assert metric(metrics, "relay_condition_active", condition="redis_down", subject="") == 0

    redis.stop()
    for _ in range(3):  # on_backend_error = "local": accepted, counted in memory
        assert (await send(relay.port)).startswith("2.0.0 Ok: queued")
    status, body = get(metrics, "/readyz")
    assert status == 200  # mail is still accepted: degraded, not unready
    assert re.search(r"^redis_down: since \d+s, 3 checks without Redis$", body, re.M), body
    assert metric(metrics, "relay_condition_active", condition="redis_down", subject="") == 1
    assert metric(metrics, "relay_condition_occurrences_total", condition="redis_down") == 3
    assert relay.log_text().count("redis_down started: rate-limit Redis failed") == 1

    redis.start()
    wait_until(lambda: redis.running, what="redis to restart")
    for _ in range(60):  # bounded: the relay probes Redis again every few seconds
        if "redis_down ended" in relay.log_text():
            break
        await send(relay.port)
        await asyncio.sleep(0.25)
    ended = re.findall(r"redis_down ended after \d+s and (\d+) checks without Redis",
                       relay.log_text())
    assert len(ended) == 1 and int(ended[0]) >= 3
    assert metric(metrics, "relay_condition_active", condition="redis_down", subject="") == 0
    assert "redis_down" not in get(metrics, "/readyz")[1]
    assert "Traceback" not in relay.log_text()


async def test_upstream_down_is_logged_at_start_and_end_and_shown_meanwhile(
    tmp_path: Path, start_relay
):
    upstream = free_port()  # nothing listens there yet: every host of the group is down
    metrics = free_port()
    relay: RelayProcess = start_relay(upstream, metrics=f"127.0.0.1:{metrics}",
                                      upstream_extra='down_after_failures = 1\n'
                                                     'down_pause = "60s"')
    for _ in range(3):
        await send(relay.port)
    wait_until(lambda: metric(metrics, "relay_condition_active", condition="upstream_down",
                              subject="default") == 1, what="the group to be down")
    status, body = get(metrics, "/readyz")
    assert status == 200  # the queue absorbs the outage: still ready for mail
    assert re.search(r"^upstream_down default: since \d+s, \d+ messages not delivered$",
                     body, re.M), body
    log = relay.log_text()
    assert log.count("upstream_down default started: every host of upstream group "
                     "'default' is down (last: 4.4.1 connection to 127.0.0.1:") == 1

    sink = Sink(port=upstream)
    sink.start()
    try:
        # The operator's flush ends the pause: the probe finds the host up again.
        run_cli("queue", "--control-socket", str(relay.control_socket), "flush")
        assert len(sink.wait_messages(3)) == 3
        wait_until(lambda: "upstream_down default ended after" in relay.log_text(),
                   what="the end of the outage to be logged")
    finally:
        sink.stop()
    log = relay.log_text()
    assert log.count("upstream_down default started") == 1
    assert log.count("upstream_down default ended") == 1
    assert metric(metrics, "relay_condition_active", condition="upstream_down",
                  subject="default") == 0
    assert metric(metrics, "relay_condition_occurrences_total", condition="upstream_down") >= 3


def test_a_condition_that_refuses_mail_makes_readyz_fail_and_one_that_does_not_shows():
    conditions = Conditions()
    ready = readiness({"spool": lambda: True}, conditions.readiness)
    assert ready() == (True, "spool: ok")
    conditions.failing(UPSTREAM_DOWN, "every host down", subject="default",
                       unit="messages not delivered")
    ok, detail = ready()
    assert ok and re.search(r"^upstream_down default: since \d+s, 1 messages not delivered$",
                            detail, re.M)
    conditions.failing(DISK_FULL, "disk full", unit="refused writes", blocks_mail=True)
    conditions.failing(DISK_FULL, "disk full", unit="refused writes", blocks_mail=True)
    ok, detail = ready()
    assert not ok and "disk_full: since 0s, 2 refused writes" in detail
    conditions.cleared(DISK_FULL)
    assert ready()[0]


async def test_with_workers_readyz_and_metrics_show_a_condition_of_any_worker(
    tmp_path: Path, start_relay
):
    metrics = free_port()
    relay: RelayProcess = start_relay(free_port(), extra="workers = 2",
                                      metrics=f"127.0.0.1:{metrics}",
                                      upstream_extra='down_after_failures = 1\n'
                                                     'down_pause = "60s"')
    wait_until(lambda: get(metrics, "/readyz")[0] == 200, what="every worker to be ready")
    await send(relay.port)
    wait_until(lambda: "upstream_down default" in get(metrics, "/readyz")[1],
               what="the supervisor to hear of the condition")
    status, body = get(metrics, "/readyz")
    assert status == 200
    assert re.search(r"^worker \d: upstream_down default: every host of upstream group "
                     r"'default' is down", body, re.M), body
    assert metric(metrics, "relay_condition_active", condition="upstream_down",
                  subject="default") == 1
