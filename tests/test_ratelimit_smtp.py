"""Rate limits in the running relay: replies, evasion attempts, limits shared through Redis."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest
from conftest import (
    RelayProcess,
    Sink,
    free_port,
    port_open,
    relay_config,
    run_cli,
    wait_until,
)
from redisserver import RedisServer

LIMITS = r"""
[limit.per_client]
key   = ["client_address/24/64"]
count = "recipient"
rate  = "3/1h"
burst = CLIENT_BURST

[limit.per_sender]
key     = ["sender"]
count   = "message"
rate    = "2/1h"
burst   = 2
backend = "BACKEND"

[[rule]]
name = "client-rate"
over_limit = "per_client"
action  = "tempfail"
message = "451 4.7.1 Rate limit exceeded for {client_address}, retry in {retry_after}s"

[[rule]]
name = "sender-rate"
over_limit = "per_sender"
action  = "tempfail"
message = "451 4.7.1 Too many messages from {sender}, retry in {retry_after}s"

[[rule]]
name = "local"
match.client_address = "@relay_networks"
action = "accept"
"""

MESSAGE = b"From: app@example.test\r\nSubject: limits\r\n\r\nbody\r\n"


def policies(tmp_path: Path, backend: str = "local") -> Path:
    directory = tmp_path / f"policies-{backend}"
    directory.mkdir(exist_ok=True)
    # The Redis tests are about the sender limit: give the per-client one room.
    text = LIMITS.replace("BACKEND", backend)
    text = text.replace("CLIENT_BURST", "3" if backend == "local" else "1000")
    (directory / "20-limits.toml").write_text(text)
    return directory


@pytest.fixture
def relay(tmp_path: Path, sink: Sink, start_relay) -> RelayProcess:
    return start_relay(sink.port, extra=f'policies_dir = "{policies(tmp_path)}"')


async def transaction(client: aiosmtplib.SMTP, sender: str, recipients: list[str]) -> list[str]:
    """MAIL, RCPT... and DATA if any recipient was taken; each recipient's reply."""
    await client.mail(sender)
    answers = []
    for rcpt in recipients:
        try:
            reply = await client.rcpt(rcpt)
            answers.append(f"{reply.code} {reply.message}")
        except aiosmtplib.SMTPRecipientRefused as exc:
            answers.append(f"{exc.code} {exc.message}")
    if any(a.startswith("250") for a in answers):
        await client.data(MESSAGE)
    else:
        await client.rset()
    return answers


def connect(port: int) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="app1.test")


async def test_recipient_limit_trips_at_exactly_the_burst_and_says_when(
    relay: RelayProcess, sink: Sink
):
    async with connect(relay.port) as client:
        answers = await transaction(client, "app@example.test",
                                    [f"r{i}@dest.test" for i in range(5)])
    assert [a[:3] for a in answers] == ["250", "250", "250", "451", "451"]
    # 3/1h: the next unit is due 20 minutes after the first.
    assert answers[3] == "451 4.7.1 Rate limit exceeded for 127.0.0.1, retry in 1200s"
    [got] = sink.wait_messages(1)
    assert got.recipients == ["r0@dest.test", "r1@dest.test", "r2@dest.test"]
    assert "rule=client-rate" in relay.log_text()


async def test_rset_loops_and_reconnects_do_not_evade_a_message_limit(relay: RelayProcess):
    async with connect(relay.port) as client:
        for _ in range(2):  # two MAILs given up with RSET still count as messages
            await client.mail("app@example.test")
            await client.rset()
    async with connect(relay.port) as client:  # a new connection is the same sender
        answers = await transaction(client, "app@example.test", ["a@dest.test"])
    assert answers == ["451 4.7.1 Too many messages from app@example.test, retry in 1800s"]


async def test_case_variants_of_one_address_share_a_bucket(relay: RelayProcess):
    async with connect(relay.port) as client:
        assert (await transaction(client, "App@Example.TEST", ["a@dest.test"]))[0][:3] == "250"
        assert (await transaction(client, "APP@example.test", ["b@dest.test"]))[0][:3] == "250"
        answers = await transaction(client, "app@EXAMPLE.test", ["c@dest.test"])
    assert answers[0].startswith("451 4.7.1 Too many messages from app@EXAMPLE.test")


def proxied_session(port: int, source: str, recipients: list[str], sender: str) -> list[bytes]:
    """One session through the PROXY listener, as a client at `source`; RCPT replies."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"PROXY TCP6 {source} ::1 40000 25\r\n".encode())
        reader = s.makefile("rb")
        assert reader.readline().startswith(b"220")
        s.sendall(b"EHLO app.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        s.sendall(f"MAIL FROM:<{sender}>\r\n".encode())
        assert reader.readline().startswith(b"250")
        replies = []
        for rcpt in recipients:
            s.sendall(f"RCPT TO:<{rcpt}>\r\n".encode())
            replies.append(reader.readline().strip())
        s.sendall(b"QUIT\r\n")
        return replies


def test_addresses_in_one_ipv6_64_share_a_bucket(tmp_path: Path, sink: Sink, start_relay):
    lb_port = free_port()
    relay = start_relay(
        sink.port,
        extra=f'policies_dir = "{policies(tmp_path)}"\n'
              'relay_networks = ["127.0.0.0/8", "::1/128", "2001:db8::/32"]',
        sections=f'\n[listener.lb]\naddress = "127.0.0.1:{lb_port}"\nproxy_protocol = true\n',
    )
    assert relay.proc is not None
    # start_relay waits for the first listener; "lb" is bound just after it.
    wait_until(lambda: port_open(lb_port), what="the lb listener")
    first = proxied_session(lb_port, "2001:db8:1:2::5", ["a@dest.test", "b@dest.test"],
                            "one@example.test")
    second = proxied_session(lb_port, "2001:db8:1:2:ffff::9", ["c@dest.test", "d@dest.test"],
                             "two@example.test")
    other = proxied_session(lb_port, "2001:db8:1:3::5", ["e@dest.test"],  # the next /64
                            "three@example.test")
    assert [r[:3] for r in first + second + other] == [b"250", b"250", b"250", b"451", b"250"]
    assert second[1].startswith(b"451 4.7.1 Rate limit exceeded for 2001:db8:1:2:ffff::9")


async def test_limits_show_lists_the_buckets_of_the_running_relay(relay: RelayProcess):
    async with connect(relay.port) as client:
        await transaction(client, "app@example.test", ["a@dest.test"])
    result = run_cli("limits", "--control-socket", str(relay.control_socket), "show")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["LIMIT", "KEY", "BACKEND", "REMAINING", "FULL", "IN"]
    assert any(line.split()[:4] == ["per_client", "127.0.0.0/24", "local", "2"]
               for line in lines[1:])
    assert any(line.split()[:4] == ["per_sender", "app@example.test", "local", "1"]
               for line in lines[1:])
    only = run_cli("limits", "--control-socket", str(relay.control_socket), "show",
                   "per_sender")
    assert "per_client" not in only.stdout


# -- shared through Redis -------------------------------------------------------------


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def redis_relay(tmp_path: Path, name: str, sink: Sink, redis: RedisServer) -> RelayProcess:
    directory = tmp_path / name
    directory.mkdir()
    port = free_port()
    text = relay_config(sink.port, port, directory / "spool",
                        extra=f'policies_dir = "{policies(tmp_path, "redis")}"')
    text += (f'\n[ratelimit]\nredis_url = "{redis.url}"\nkey_prefix = "test:"\n'
             f'redis_timeout = "200ms"\n')
    return RelayProcess(directory, text, port).start()


async def accepted(relay: RelayProcess, sender: str = "app@example.test") -> bool:
    async with connect(relay.port) as client:
        return (await transaction(client, sender, ["a@dest.test"]))[0].startswith("250")


async def test_two_relays_sharing_redis_let_through_exactly_the_limit_and_fall_back(
    tmp_path: Path, sink: Sink, redis: RedisServer
):
    relays = [redis_relay(tmp_path, name, sink, redis) for name in ("one", "two")]
    try:
        # Alternating between the relays, as a load balancer would: burst 2 in all.
        results = [await accepted(relays[i % 2]) for i in range(4)]
        assert results == [True, True, False, False]

        redis.stop()
        # on_backend_error = "local": each relay counts on its own until Redis returns.
        assert [await accepted(relays[0]) for _ in range(3)] == [True, True, False]
        wait_until(lambda: "redis_down started: rate-limit Redis failed" in relays[0].log_text(),
                   what="the fallback to be logged")
        assert relays[0].log_text().count("rate-limit Redis failed") == 1

        redis.start()  # empty again, and shared again once the relays probe it
        wait_until(lambda: redis.running, what="redis to restart")
        # Relay one saw Redis fail; it probes again every few seconds (relay two never
        # noticed the outage: it sent nothing meanwhile).
        for _ in range(60):
            if "redis_down ended after" in relays[0].log_text():
                break
            await accepted(relays[0], "probe@example.test")
            await asyncio.sleep(0.25)
        assert "redis_down ended after" in relays[0].log_text()
        results = [await accepted(relays[i % 2], "again@example.test") for i in range(3)]
        assert results == [True, True, False]
    finally:
        for relay in relays:
            relay.stop()

