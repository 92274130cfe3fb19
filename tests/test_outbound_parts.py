"""The outbound parts on their own, without sockets: pool bookkeeping, the circuit
breaker, the scheduler, upstream reply values, bounces."""

from __future__ import annotations

import email
import email.policy
from typing import Any

from relay.outbound.connector import Connection
from relay.outbound.health import HostHealth
from relay.outbound.pool import HostPool
from relay.outbound.scheduler import MAX_CRASHES, Scheduler
from relay.outbound.shaping import Shaper, is_throttle
from relay.outbound.smarthosts import UpstreamSettings
from relay.queue import bounce
from relay.replies import UpstreamReply


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeClient:
    """What the pool looks at of an aiosmtplib client."""

    def __init__(self) -> None:
        self.is_connected = True


def connection(clock: Clock) -> Connection:
    return Connection(FakeClient(), clock())  # type: ignore[arg-type]


def pool(clock: Clock, **settings: Any) -> HostPool:
    return HostPool(UpstreamSettings("default", **settings), clock)


# -- pool bookkeeping ---------------------------------------------------------------------


def test_an_empty_pool_asks_for_a_new_connection_and_counts_it_busy():
    clock = Clock()
    p = pool(clock)
    assert p.checkout() == (None, False, [])
    assert (p.idle, p.busy) == (0, 1)


def test_a_connection_is_reused_most_recent_first_and_checked_after_idling():
    clock = Clock()
    p = pool(clock, check_after_idle=5.0, idle_timeout=60.0)
    first, second = connection(clock), connection(clock)
    p.checkout(), p.checkout()
    assert p.checkin(first) and p.checkin(second)
    assert (p.idle, p.busy) == (2, 0)
    assert p.checkout() == (second, False, [])
    clock.now += 10  # idle past check_after_idle: a NOOP first
    assert p.checkout() == (first, True, [])


def test_connections_idle_too_long_or_used_up_are_closed():
    clock = Clock()
    p = pool(clock, idle_timeout=60.0, max_messages_per_connection=2)
    conn = connection(clock)
    p.checkout()
    assert p.checkin(conn)  # 1 message
    p.checkout()
    assert not p.checkin(conn)  # 2 messages: used up, to be closed
    fresh = connection(clock)
    p.checkout()
    assert p.checkin(fresh)
    clock.now += 61
    assert p.expired() == [fresh] and p.idle == 0


def test_a_broken_connection_is_never_checked_back_in():
    clock = Clock()
    p = pool(clock)
    conn = connection(clock)
    p.checkout()
    conn.broken = True
    assert not p.checkin(conn)
    assert (p.idle, p.busy) == (0, 0)


def test_an_expired_idle_connection_is_handed_back_for_closing_on_checkout():
    clock = Clock()
    p = pool(clock, idle_timeout=30.0)
    old = connection(clock)
    p.checkout()
    p.checkin(old)
    clock.now += 31
    assert p.checkout() == (None, False, [old])


# -- the circuit breaker ------------------------------------------------------------------


def test_the_host_goes_down_after_n_failures_and_one_probe_brings_it_back():
    clock, wall = Clock(), Clock()
    health = HostHealth("mx:25", down_after=2, pause=30.0, clock=clock, wall=wall)
    recovered: list[bool] = []
    health.on_recovery = lambda: recovered.append(True)
    health.failed("connect refused")
    assert health.admits() and health.up
    health.failed("connect refused")
    assert health.is_down and not health.up and health.down_since == wall.now
    assert not health.admits()  # within the pause: nobody is tried
    clock.now += 31
    assert health.admits()  # the probe
    assert not health.admits()  # the others wait for the probe's verdict
    health.succeeded()
    assert recovered == [True] and health.admits() and health.failures == 0


def test_a_failed_probe_starts_a_new_pause_and_a_flush_ends_it():
    clock = Clock()
    health = HostHealth("mx:25", down_after=1, pause=30.0, clock=clock)
    health.failed("timeout")
    clock.now += 31
    assert health.admits()
    health.failed("timeout")
    assert not health.admits()
    health.probe_now()  # `queue flush`
    assert health.admits()


def test_an_admitted_delivery_that_gives_no_verdict_lets_another_probe():
    clock = Clock()
    health = HostHealth("mx:25", down_after=1, pause=1.0, clock=clock)
    health.failed("timeout")
    clock.now += 2
    assert health.admits()
    health.released()
    assert health.admits()


def test_a_stalled_host_is_not_up_until_it_answers():
    health = HostHealth("mx:25", down_after=3, pause=1.0, clock=Clock())
    health.stalled = True
    assert not health.up and not health.is_down
    health.succeeded()
    assert health.up


# -- reply values -------------------------------------------------------------------------


def test_upstream_replies_are_parsed_once_and_read_back_the_same():
    reply = UpstreamReply.of(550, "5.1.1 <u@example.org>: No such\n user")
    assert (reply.code, reply.status, reply.text) == (550, "5.1.1", "<u@example.org>: No such user")
    assert UpstreamReply.parse(str(reply)) == reply
    # A status whose class disagrees with the code is text, not a status.
    assert UpstreamReply.of(451, "5.7.1 odd").status == ""
    failure = UpstreamReply.failure("4.4.1", "connection to mx:25 failed: refused")
    assert failure.is_temporary and str(failure) == "4.4.1 connection to mx:25 failed: refused"
    assert UpstreamReply.parse(str(failure)) == failure
    assert is_throttle(UpstreamReply.of(452, "4.7.0 slow down"))


# -- bounces ------------------------------------------------------------------------------


def build(recipient: str, utf8: bool, remote: str = "mx.example.net") -> bytes:
    failure = bounce.Failure(recipient, UpstreamReply.of(550, f"5.1.1 <{recipient}>: unknown"),
                             remote)
    return bounce.build(queue_id="0123456789ABCDEF012", reporting_mta="relay." + "x" * 60
                        + ".example", sender="app@example.com", arrival=0.0,
                        failures=[failure], original=b"Subject: hi\r\n\r\nbody\r\n",
                        now=0.0, utf8=utf8)


def parse(dsn: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(dsn, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def test_the_boundary_stays_within_70_characters_whatever_the_hostname():
    message = parse(build("u@example.org", utf8=False))
    boundary = message.get_boundary()
    assert boundary is not None and len(boundary) <= 70
    assert all(len(line) <= 998 for line in build("u@example.org", utf8=False).split(b"\r\n"))


def test_an_ascii_report_escapes_a_utf8_recipient_and_keeps_the_diagnostic():
    dsn = build("jörg@exämple.org", utf8=False)
    assert dsn.isascii()
    message = parse(dsn)
    assert not message.defects
    assert message.get_content_type() == "multipart/report"
    parts = [p.get_content_type() for p in message.iter_parts()]
    assert parts == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert b"Final-Recipient: utf-8; j\\x{F6}rg@ex\\x{E4}mple.org\r\n" in dsn
    assert b"Diagnostic-Code: smtp; 550 5.1.1 <j\\x{F6}rg@ex\\x{E4}mple.org>: unknown\r\n" in dsn
    assert b"Remote-MTA: dns; mx.example.net\r\n" in dsn


def test_a_global_report_carries_utf8_as_rfc_6533_says():
    dsn = build("jörg@exämple.org", utf8=True)
    message = parse(dsn)
    assert not message.defects
    assert message.get_param("report-type") == "global-delivery-status"
    parts = [p.get_content_type() for p in message.iter_parts()]
    assert parts == ["text/plain", "message/global-delivery-status", "message/global-headers"]
    assert "Final-Recipient: utf-8; jörg@exämple.org\r\n".encode() in dsn


def test_no_remote_mta_without_a_name():
    assert b"Remote-MTA" not in build("u@example.org", utf8=False, remote="")


# -- the scheduler ------------------------------------------------------------------------


def scheduler(clock: Clock, workers: int = 2, max_concurrent: int = 0,
              max_rate: float = 0.0, unrecorded: frozenset[str] | set[str] = frozenset(),
              ) -> Scheduler:
    shapers: dict[str, Shaper] = {}

    def shaper(group: str) -> Shaper:
        return shapers.setdefault(group, Shaper(max_concurrent, max_rate, workers))

    return Scheduler(workers, shaper, rest=60.0, clock=clock, unrecorded=unrecorded)


def test_at_most_the_workers_run_and_a_busy_group_parks_the_rest():
    clock = Clock()
    s = scheduler(clock, workers=3, max_concurrent=1)
    assert s.free == 3
    assert s.admit("A", "default") == 0.0
    assert s.admit("B", "default") > 0  # the group takes one at a time
    assert s.excluded() == ["A", "B"] and s.free == 2
    assert not s.finished("A", crashed=False)
    assert s.excluded() == []  # the group has room again: B may be picked
    assert s.free == 3


def test_a_message_waiting_for_a_down_group_comes_back_on_recovery_or_after_the_pause():
    clock = Clock()
    s = scheduler(clock)
    assert s.set_aside("A", "default", until=clock.now + 30)
    assert not s.set_aside("A", "default", until=clock.now + 30)  # logged once
    s.set_aside("B", "bulk", until=clock.now + 30)
    assert sorted(s.excluded()) == ["A", "B"]
    assert s.next_wakeup(60.0) == 30.0
    assert s.recovered("default") == 1
    assert s.excluded() == ["B"]
    clock.now += 31
    assert s.excluded() == []


def test_flush_releases_everything_set_aside():
    clock = Clock()
    s = scheduler(clock)
    s.set_aside("A", "default", until=clock.now + 3600)
    s.flush()
    assert s.excluded() == []


def test_a_crashing_message_rests_and_is_quarantined_after_max_crashes():
    clock = Clock()
    s = scheduler(clock)
    for crash in range(1, MAX_CRASHES + 1):
        assert s.admit("A", "default") == 0.0
        s.shaper("default").release(clock(), False, False)  # as the delivery does
        quarantine = s.finished("A", crashed=True)
        assert quarantine == (crash == MAX_CRASHES)
        assert "A" in s.excluded()  # resting
        clock.now += 61
        assert "A" not in s.excluded()


def test_unrecorded_results_pause_every_start_and_keep_the_message_out():
    clock = Clock()
    waiting: set[str] = set()  # the delivery loop's results waiting for the spool
    s = scheduler(clock, unrecorded=waiting)
    waiting.add("A")
    assert s.paused and s.free == 0 and s.excluded() == ["A"]
    waiting.discard("A")
    assert not s.paused and s.free == 2
