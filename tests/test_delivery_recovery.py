"""Delivery against real faults: an outage and the upstream's return, a greylisted
recipient, a blackhole, a spool that cannot be written, and 8-bit mail."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from pathlib import Path

import aiosmtplib
from conftest import RelayProcess, Sink, delivering, free_port, run_cli, wait_until
from test_operations import scrape
from tlsupstream import Relays

from relay.queue.spool import Envelope, Spool, SpoolError

MESSAGE = b"From: a@example.test\r\nSubject: recovery\r\n\r\nbody\r\n"
EIGHT_BIT = "From: a@example.test\r\nSubject: 8bit\r\n\r\nGrüße\r\n".encode()


async def send(port: int, recipients: list[str], message: bytes = MESSAGE) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        await client.sendmail("a@example.test", recipients, message)


def delivered(relay: RelayProcess) -> list[str]:
    return re.findall(r"to=<[^>]+>, relay=.*status=sent", relay.log_text())


async def test_a_backlog_queued_in_an_outage_drains_when_the_upstream_returns(
    start_relay, tmp_path: Path
):
    port = free_port()  # nothing listens there: the upstream is down
    relay = start_relay(port, upstream_extra='down_after_failures = 1\ndown_pause = "2s"')
    for i in range(10):
        await send(relay.port, [f"r{i}@dest.test"])
    wait_until(lambda: relay.log_text().count(": not tried: upstream group 'default'") >= 5,
               what="messages set aside while the upstream is down")
    sink = Sink(port)
    sink.start()
    try:
        returned = time.monotonic()
        got = sink.wait_messages(10, timeout=15)
        assert sorted(m.recipients[0] for m in got) == sorted(f"r{i}@dest.test" for i in range(10))
        # Set-aside messages were never tried: their first real attempt is attempt 1.
        wait_until(lambda: len(delivered(relay)) == 10, what="ten delivery lines")
        firsts = re.findall(r"attempts=1, status=sent", relay.log_text())
        assert len(firsts) >= 8
        # Nothing was deferred once the upstream was back.
        log = relay.log_text()
        assert "status=deferred" not in log[log.index("is back up"):]
        assert time.monotonic() - returned < 2 + 5  # down_pause plus a few seconds
    finally:
        sink.stop()


async def test_queue_flush_in_an_outage_probes_at_once(start_relay):
    port = free_port()
    relay = start_relay(port, upstream_extra='down_after_failures = 1\ndown_pause = "1h"')
    await send(relay.port, ["b@dest.test"])
    wait_until(lambda: "marked down" in relay.log_text(), what="the host marked down")
    sink = Sink(port)
    sink.start()
    try:
        result = run_cli("queue", "--control-socket", str(relay.control_socket), "flush")
        assert result.returncode == 0, result.stdout + result.stderr
        assert len(sink.wait_messages(1, timeout=10)) == 1  # not after the hour's pause
        assert result.stdout == f"Flushed: 1 message\nupstream 127.0.0.1:{port}: up again\n"
    finally:
        sink.stop()


async def test_a_greylisted_recipient_does_not_mark_the_host_down(sink: Sink, start_relay):
    sink.handler.rcpt_replies["grey@dest.test"] = "451 4.7.1 Greylisted, try again later"
    relay = start_relay(sink.port, upstream_extra="down_after_failures = 1")
    for _ in range(3):
        await send(relay.port, ["grey@dest.test"])
    wait_until(lambda: relay.log_text().count("status=deferred") >= 3, what="three deferrals")
    await send(relay.port, ["ok@dest.test"])
    [got] = sink.wait_messages(1)
    assert got.recipients == ["ok@dest.test"]
    assert "marked down" not in relay.log_text()


async def test_mail_goes_upstream_with_its_body_type_and_size(sink: Sink, start_relay):
    relay = start_relay(sink.port)
    await send(relay.port, ["b@dest.test"], EIGHT_BIT)
    await send(relay.port, ["c@dest.test"])
    eight, seven = sink.wait_messages(2)
    assert "BODY=8BITMIME" in eight.mail_options
    assert "BODY=7BIT" in seven.mail_options
    assert f"SIZE={len(eight.data)}" in eight.mail_options


async def test_large_mail_goes_upstream_with_the_body_type_the_listener_saw(
    sink: Sink, start_relay
):
    """Past its first 256K a message is on disk, and the listener's findings travel with
    it to its first delivery (relay.queue.content.Checked) instead of a second read: an
    8-bit octet only in the part on disk, only in the part in memory, or in neither."""
    relay = start_relay(sink.port)
    filler = (b"f" * 76 + b"\r\n") * 8000  # 624,000 octets
    head = b"From: a@example.test\r\nSubject: large\r\n\r\n"
    umlaut = "Grüße\r\n".encode()
    # Lines starting with a dot (stuffed on the wire both ways) in either part or none.
    messages = {"tail@dest.test": head + filler + umlaut + b".dot\r\n",
                "head@dest.test": head + b".\r\n..\r\n" + umlaut + filler,
                "none@dest.test": head + filler + b"no dot\r\n"}
    for recipient, message in messages.items():
        await send(relay.port, [recipient], message)
    got = {m.recipients[0]: m for m in sink.wait_messages(3)}
    for recipient, message in messages.items():
        assert got[recipient].data.endswith(message)
    assert "BODY=8BITMIME" in got["tail@dest.test"].mail_options
    assert "BODY=8BITMIME" in got["head@dest.test"].mail_options
    assert "BODY=7BIT" in got["none@dest.test"].mail_options


async def test_8bit_mail_moves_on_to_a_host_that_offers_8bitmime(tmp_path: Path):
    plain, able = Sink(), Sink()
    plain.handler.without = {"8BITMIME"}
    plain.start()
    able.start()
    relays = Relays(tmp_path)
    try:
        relay = relays.start(f'[{{ address = "127.0.0.1:{plain.port}", priority = 1 }}, '
                             f'{{ address = "127.0.0.1:{able.port}", priority = 2 }}]')
        await send(relay.port, ["b@dest.test"], EIGHT_BIT)
        assert able.wait_messages(1)[0].data.endswith("Grüße\r\n".encode())
        await send(relay.port, ["c@dest.test"])  # 7-bit mail still prefers the first
        assert plain.wait_messages(1)[0].recipients == ["c@dest.test"]
        assert "marked down" not in relay.log_text()
    finally:
        relays.stop_all()
        plain.stop()
        able.stop()


async def test_8bit_mail_without_any_8bitmime_host_fails_with_554_5_6_3(sink: Sink, start_relay):
    sink.handler.without = {"8BITMIME"}
    relay = start_relay(sink.port)
    await send(relay.port, ["b@dest.test"], EIGHT_BIT)
    wait_until(lambda: "status=bounced (554 5.6.3 upstream does not support 8BITMIME)"
               in relay.log_text(), what="the recipient failed")
    [notice] = sink.wait_messages(1)  # the bounce (7-bit: only the original's headers)
    assert notice.sender == "<>" and notice.recipients == ["a@example.test"]
    assert b"Status: 5.6.3" in notice.data


async def test_a_blackhole_upstream_is_reported_before_the_connect_timeout(start_relay):
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never greets
    port = listener.getsockname()[1]
    metrics = free_port()
    try:
        # relay_config's connect_timeout is 2s: the stall shows after half of it.
        relay = start_relay(port, metrics=f"127.0.0.1:{metrics}")
        await send(relay.port, ["b@dest.test"])
        wait_until(lambda: "no greeting after 1s" in relay.log_text(), timeout=10,
                   what="the stall reported")
        _, text = scrape(metrics)
        assert 'relay_upstream_up{upstream="default"} 0.0' in text
    finally:
        listener.close()


class FailingSpool(Spool):
    """A real spool whose result writes fail `failures` times (a full disk)."""

    def __init__(self, directory: Path, failures: int) -> None:
        super().__init__(directory)
        self.failures = failures
        self.refused = 0

    async def record_attempt(
        self, queue_id: str, outcomes: object, next_attempt: float, last_error: str,
        events: object = (),
    ) -> object:
        if self.failures > 0:
            self.failures -= 1
            self.refused += 1
            raise SpoolError("database or disk is full")
        return await super().record_attempt(queue_id, outcomes,  # type: ignore[arg-type]
                                            next_attempt, last_error, events)  # type: ignore[arg-type]


async def test_an_accepted_recipient_is_sent_once_while_the_spool_cannot_record_it(
    sink: Sink, tmp_path: Path
):
    def failing(directory: Path) -> Spool:
        return FailingSpool(directory, failures=5)

    async with delivering(sink.port, tmp_path, failing) as (spool, delivery):
        assert isinstance(spool, FailingSpool)
        envelope = Envelope(sender="a@example.test", recipients=("b@dest.test",),
                            client_address="127.0.0.1", helo="client.test", listener="smtp",
                            received_at=time.time())
        for name in ("M1", "M2"):
            await spool.store(name, envelope, MESSAGE)
        delivery.wake()
        deadline = time.monotonic() + 15
        while await spool.count() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await spool.count() == 0  # both results stored in the end
        assert spool.refused == 5
        assert len(sink.handler.messages) == 2  # and each message went once
        assert not delivery.paused
