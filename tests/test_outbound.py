"""Upstream groups against real loopback sinks: failover, weights, TLS, AUTH, shaping, SIGTERM."""

from __future__ import annotations

import math
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest
from conftest import RelayProcess, free_port, wait_until
from tlsupstream import CertAuthority, Relays, UpstreamSink, spread

from relay import config
from relay.outbound.delivery import UnknownRoute, retry_delay, route
from relay.outbound.shaping import Shaper, is_throttle
from relay.queue.settings import QueueSettings
from relay.queue.spool import Envelope
from relay.replies import UpstreamReply

MESSAGE = b"From: a@example.test\r\nSubject: outbound\r\n\r\nbody\r\n"


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[Relays]:
    r = Relays(tmp_path)
    yield r
    r.stop_all()


@pytest.fixture
def sinks() -> Iterator[list[UpstreamSink]]:
    started: list[UpstreamSink] = []
    yield started
    for s in started:
        s.stop()


def running(sinks: list[UpstreamSink], sink: UpstreamSink) -> UpstreamSink:
    sink.start()
    sinks.append(sink)
    return sink


async def send(port: int, count: int = 1, recipients: tuple[str, ...] = ("b@dest.test",)) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        for n in range(count):
            await client.sendmail("a@example.test", list(recipients),
                                  MESSAGE.replace(b"outbound", b"outbound %d" % n))


def host(port: int, priority: int, weight: int = 1) -> str:
    return f'{{ address = "127.0.0.1:{port}", priority = {priority}, weight = {weight} }}'


# -- failover and weights -----------------------------------------------------------


async def test_first_host_down_mail_goes_to_second_and_first_gets_traffic_when_back(
    relays: Relays, sinks: list[UpstreamSink]
):
    first_port = free_port()  # nothing listens there yet
    second = running(sinks, UpstreamSink())
    relay = relays.start(f"[{host(first_port, 10)}, {host(second.port, 20)}]",
                         upstream='down_after_failures = 1\ndown_pause = "1s"')
    await send(relay.port)
    second.wait_messages(1)
    wait_until(lambda: f"relay=sink.test[127.0.0.1]:{second.port}, delay=" in relay.log_text(),
               what="the delivery line")
    assert "marked down" in relay.log_text()

    first = running(sinks, UpstreamSink(first_port))
    time.sleep(1.2)  # the breaker's pause, after which the first host is probed again
    await send(relay.port)
    first.wait_messages(1)
    assert len(second.handler.messages) == 1
    wait_until(lambda: "is back up" in relay.log_text(), what="the host to come back")


async def test_451_from_first_host_fails_over_then_first_host_gets_traffic_again(
    relays: Relays, sinks: list[UpstreamSink]
):
    first = running(sinks, UpstreamSink())
    second = running(sinks, UpstreamSink())
    first.handler.data_replies.append("451 4.3.0 Busy, try later")
    relay = relays.start(f"[{host(first.port, 10)}, {host(second.port, 20)}]")
    await send(relay.port)
    second.wait_messages(1)
    assert first.handler.data_attempts == 1 and not first.handler.messages
    await send(relay.port)
    first.wait_messages(1)
    assert len(second.handler.messages) == 1
    assert "status=deferred" not in relay.log_text()  # failover within one attempt


async def test_equal_hosts_share_the_messages(relays: Relays, sinks: list[UpstreamSink]):
    one, two = running(sinks, UpstreamSink()), running(sinks, UpstreamSink())
    relay = relays.start(f"[{host(one.port, 10)}, {host(two.port, 10)}]")
    await send(relay.port, count=20)
    wait_until(lambda: len(one.handler.messages) + len(two.handler.messages) == 20,
               15, "20 messages at the sinks")
    assert len(one.handler.messages) >= 5 and len(two.handler.messages) >= 5


def test_weights_and_priorities_order_the_candidates():
    settings = config.load(None)
    from relay.outbound.pool import HostGroup
    from relay.outbound.smarthosts import UpstreamSettings

    group = HostGroup(UpstreamSettings(
        "default", hosts=(("a", 25), ("b", 25), ("c", 25)), ranks=((10, 3), (10, 1), (20, 1))
    ), settings.smtp_hostname)
    firsts = [group.candidates()[0].member.host for _ in range(8)]
    assert firsts.count("a") == 6 and firsts.count("b") == 2
    assert [h.member.host for h in group.candidates()][-1] == "c"
    assert repr(group.hosts[0]) == "<Host a:25 idle=0 busy=0>"


# -- TLS and AUTH ---------------------------------------------------------------------


def tls_settings(ca: CertAuthority, mode: str = "starttls", name: str = "mx.test") -> str:
    return f'tls = "{mode}"\ntls_ca_file = "{ca.pem}"\ntls_server_name = "{name}"'


async def test_starttls_with_a_verified_certificate_delivers(
    relays: Relays, sinks: list[UpstreamSink], tmp_path: Path
):
    ca = CertAuthority(tmp_path)
    sink = running(sinks, UpstreamSink(starttls=ca.server_context("mx.test")))
    relay = relays.start(f'["127.0.0.1:{sink.port}"]', upstream=tls_settings(ca))
    await send(relay.port)
    sink.wait_messages(1)
    assert sink.handler.mail_commands == [("a@example.test", True)]
    # The delivery line says how the message travelled.
    line = wait_until(lambda: re.search(r"to=<b@dest.test>, relay=\S+, tls=TLSv1\.[23], "
                                        r"cipher=\S+, delay=", relay.log_text()),
                      what="the delivery line")
    assert line


async def test_implicit_tls_delivers(relays: Relays, sinks: list[UpstreamSink], tmp_path: Path):
    ca = CertAuthority(tmp_path)
    sink = running(sinks, UpstreamSink(implicit=ca.server_context("mx.test")))
    relay = relays.start(f'["127.0.0.1:{sink.port}"]', upstream=tls_settings(ca, "implicit"))
    await send(relay.port)
    sink.wait_messages(1)
    assert sink.handler.mail_commands == [("a@example.test", True)]


@pytest.mark.parametrize("case", ["wrong-name", "untrusted-ca", "no-starttls"])
async def test_tls_failure_defers_and_sends_nothing_in_plaintext(
    case: str, relays: Relays, sinks: list[UpstreamSink], tmp_path: Path
):
    ca, other_ca = CertAuthority(tmp_path), CertAuthority(tmp_path)
    context = {
        "wrong-name": ca.server_context("other.test"),
        "untrusted-ca": other_ca.server_context("mx.test"),
        "no-starttls": None,
    }[case]
    sink = running(sinks, UpstreamSink(starttls=context))
    relay = relays.start(f'["127.0.0.1:{sink.port}"]', upstream=tls_settings(ca))
    await send(relay.port)
    wait_until(lambda: "status=deferred" in relay.log_text(), what="a deferral")
    assert sink.handler.mail_commands == [] and sink.handler.messages == []
    assert [state for _, state in relay.queue_rows()] == ["queued"]


@pytest.mark.parametrize("mechanism", ["plain", "login", "auto"])
async def test_auth_to_upstream_with_password_from_file(
    mechanism: str, relays: Relays, sinks: list[UpstreamSink], tmp_path: Path
):
    secret = "s3cret-Pa55"
    (tmp_path / "password").write_text(secret + "\n")
    sink = running(sinks, UpstreamSink(users={"relay": secret}))
    relay = relays.start(f'["127.0.0.1:{sink.port}"]', upstream=(
        f'auth_username = "relay"\nauth_mechanism = "{mechanism}"\n'
        f'password_file = "{tmp_path / "password"}"'))
    await send(relay.port)
    sink.wait_messages(1)
    assert sink.handler.logins[0].endswith(":relay")
    if mechanism != "auto":
        assert sink.handler.logins == [f"{mechanism.upper()}:relay"]
    assert secret not in relay.log_text()


async def test_wrong_password_defers(relays: Relays, sinks: list[UpstreamSink], tmp_path: Path):
    (tmp_path / "password").write_text("Xy9-not-it")
    sink = running(sinks, UpstreamSink(users={"relay": "right"}))
    relay = relays.start(f'["127.0.0.1:{sink.port}"]', upstream=(
        f'auth_username = "relay"\npassword_file = "{tmp_path / "password"}"'))
    await send(relay.port)
    wait_until(lambda: "status=deferred" in relay.log_text(), what="a deferral")
    assert sink.handler.messages == []
    assert "535 5.7.8" in relay.log_text() and "Xy9-not-it" not in relay.log_text()


def test_password_file_is_read_at_load_and_never_shown(tmp_path: Path):
    (tmp_path / "pw").write_text("hunter2\n")
    good = tmp_path / "good.toml"
    good.write_text(f'[upstream.default]\nauth_username = "u"\npassword_file = "{tmp_path}/pw"\n')
    settings = config.load(good)
    assert settings.upstreams["default"].password == "hunter2"
    assert "hunter2" not in repr(settings)

    bad = tmp_path / "bad.toml"
    bad.write_text('[upstream.default]\nhosts = ["mx.example:587"]\nauth_username = "u"\n'
                   'password_file = "/nonexistent/pw"\nmax_rate = "fast"\n'
                   'hosts2 = 1\n')
    with pytest.raises(config.ConfigError) as failed:
        config.load(bad)
    assert failed.value.messages == [
        f"{bad}: upstream.default.password_file: cannot read '/nonexistent/pw': "
        "No such file or directory",
        f'{bad}: upstream.default.auth_username: AUTH needs tls = "starttls" or "implicit" '
        "unless every host is on loopback",
        f"{bad}: upstream.default.max_rate: expected a rate such as \"14/s\" or \"600/1m\", "
        "or \"\", got 'fast'",
        f"{bad}: upstream.default.hosts2: unknown key",
    ]


# -- shaping ----------------------------------------------------------------------------


async def test_max_rate_spaces_a_burst(relays: Relays, sinks: list[UpstreamSink]):
    sink = running(sinks, UpstreamSink())
    relay = relays.start(f'["127.0.0.1:{sink.port}"]', upstream='max_rate = "5/s"')
    await send(relay.port, count=10)
    messages = sink.wait_messages(10, timeout=15)
    times = [m.at for m in messages]
    # 10 messages at 5/s need at least 1.8 s; allow scheduling slack on a busy machine.
    assert max(times) - min(times) >= 1.5
    assert spread(times, 1.0) <= 6


def test_shaper_spaces_starts_and_backs_off_when_throttled():
    shaper = Shaper(max_concurrent=2, max_rate=5, workers=20)
    assert shaper.admit(0.0) == 0.0
    assert shaper.admit(0.1) == pytest.approx(0.1)  # 5/s: one start per 0.2 s
    assert shaper.admit(0.2) == 0.0
    assert shaper.admit(0.4) == math.inf  # two running: the concurrency limit
    shaper.release(0.5, throttled=True, succeeded=False)
    assert shaper.factor == 0.5 and shaper.limit == 1
    assert shaper.admit(0.6) == pytest.approx(0.9)  # paused for 1 s after the throttle
    shaper.release(1.5, throttled=False, succeeded=True)
    assert shaper.factor == pytest.approx(0.6)  # gradual recovery
    assert shaper.admit(1.5) == 0.0
    assert shaper.interval == pytest.approx(1 / 3)
    assert is_throttle(UpstreamReply.parse("421 4.7.0 Too many connections"))
    assert is_throttle(UpstreamReply.parse("421 Service closing"))
    assert is_throttle(UpstreamReply.parse("451 4.7.1 Rate limit exceeded"))
    assert not is_throttle(UpstreamReply.parse("451 4.3.0 Local error"))
    assert not is_throttle(UpstreamReply.parse("550 5.7.1 Denied"))


# -- routing and retries -------------------------------------------------------------


def test_route_picks_the_policy_choice_or_default_and_refuses_unknown_groups():
    upstreams = config.load(None).upstreams
    env = Envelope("a@example.test", ("b@dest.test",), "127.0.0.1", "h", "smtp")
    assert route(env, upstreams) == "default"
    with pytest.raises(UnknownRoute):
        route(Envelope("", (), "", "", "", route="bulk"), upstreams)


def test_retry_schedule_steps_then_repeats():
    queue = QueueSettings(retry_schedule=(60.0, 300.0, 900.0))
    assert [retry_delay(n, queue) for n in (1, 2, 3, 4, 9)] == [60, 300, 900, 900, 900]
    exponential = QueueSettings(minimal_backoff=60, maximal_backoff=3600)
    assert [retry_delay(n, exponential) for n in (1, 2, 3, 7, 8)] == [60, 120, 240, 3600, 3600]


@pytest.mark.parametrize("pipelining", [False, True])
async def test_452_to_rcpt_sends_the_rest_in_a_new_transaction(
    relays: Relays, sinks: list[UpstreamSink], pipelining: bool
):
    sink = UpstreamSink()
    sink.handler.pipelining = pipelining
    running(sinks, sink)
    sink.handler.rcpt_replies["c@dest.test"] = "452 4.5.3 Too many recipients"
    relay = relays.start(f'["127.0.0.1:{sink.port}"]')
    # The sink refuses c@ once per transaction by script: take the reply away after the
    # first transaction so the second one is accepted.
    await send(relay.port, recipients=("b@dest.test", "c@dest.test", "d@dest.test"))
    first = sink.wait_messages(1)[0]
    # Step by step, d@ is not asked for after the 452; pipelined, it was asked and
    # accepted in the first transaction, and must not be sent again.
    assert first.recipients == (["b@dest.test", "d@dest.test"] if pipelining
                                else ["b@dest.test"])
    del sink.handler.rcpt_replies["c@dest.test"]
    wait_until(lambda: not relay.queue_rows(), what="the spool to empty")
    assert sorted(r for m in sink.handler.messages for r in m.recipients) == [
        "b@dest.test", "c@dest.test", "d@dest.test"]


# -- graceful stop ----------------------------------------------------------------------


async def test_sigterm_lets_the_delivery_in_flight_finish_and_keeps_the_rest(
    relays: Relays, sinks: list[UpstreamSink]
):
    sink = running(sinks, UpstreamSink())
    sink.handler.data_delay = 1.5
    relay: RelayProcess = relays.start(f'["127.0.0.1:{sink.port}"]',
                                       queue="delivery_workers = 1")
    await send(relay.port, count=2)
    wait_until(lambda: sink.handler.data_started == 1, what="the first DATA to start")
    relay.kill(signal.SIGTERM)  # returns once the process has exited
    assert len(sink.handler.messages) == 1  # finished within the deadline
    assert [state for _, state in relay.queue_rows()] == ["queued"]  # the second waits

    sink.handler.data_delay = 0
    relay.start()
    sink.wait_messages(2)
    wait_until(lambda: not relay.queue_rows(), what="the spool to empty")
    subjects = sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0]
                      for m in sink.handler.messages)
    assert subjects == [b"outbound 0", b"outbound 1"]  # each exactly once
