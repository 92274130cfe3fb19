"""Crash safety: nothing that got 250 is lost, nothing half-received is delivered."""

from __future__ import annotations

import socket
import time

import aiosmtplib
from conftest import RelayProcess, Sink, free_port, wait_until

MESSAGE = b"From: a@example.test\r\nTo: b@dest.test\r\nSubject: durable\r\n\r\nbody\r\n"


async def send(port: int, subject: bytes = b"durable") -> str:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        _, reply = await client.sendmail(
            "a@example.test", ["b@dest.test"], MESSAGE.replace(b"durable", subject)
        )
        return reply


async def test_sigkill_after_250_with_upstream_down_then_delivered_after_restart(
    start_relay, tmp_path
):
    upstream_port = free_port()  # nothing listens there yet: the upstream is down
    relay: RelayProcess = start_relay(upstream_port)
    reply = await send(relay.port)
    queue_id = reply.rsplit(" ", 1)[1]
    relay.kill()  # SIGKILL right after the 250

    assert [row[0] for row in relay.queue_rows()] == [queue_id]
    sink = Sink(port=upstream_port)
    sink.start()
    try:
        relay.start()
        [got] = sink.wait_messages(1)
        assert got.data.endswith(MESSAGE)
        assert f"id {queue_id}".encode() in got.data
        wait_until(lambda: not relay.queue_rows(), what="the spool to empty")
    finally:
        sink.stop()


async def test_sigkill_during_data_delivers_nothing_partial(sink: Sink, start_relay):
    relay: RelayProcess = start_relay(sink.port)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        s.recv(1024)
        for line in (b"EHLO c.test\r\n", b"MAIL FROM:<a@example.test>\r\n",
                     b"RCPT TO:<b@dest.test>\r\n", b"DATA\r\n"):
            s.sendall(line)
            time.sleep(0.05)
            s.recv(1024)
        s.sendall(b"Subject: partial\r\n\r\nthe first half of a message\r\n")
        time.sleep(0.2)
        relay.kill()
    relay.start()
    # A complete message sent after the restart is the barrier: once it has arrived,
    # anything left over from the killed session would have been delivered too.
    await send(relay.port, subject=b"after restart")
    [got] = sink.wait_messages(1)
    assert b"Subject: after restart" in got.data
    wait_until(lambda: not relay.queue_rows(), what="the spool to empty")
    assert len(sink.handler.messages) == 1
