"""Crash safety: nothing that got 250 is lost, nothing half-received is delivered."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import aiosmtplib
import pytest
from conftest import RelayProcess, Sink, free_port, wait_until

from relay.queue.spool import INLINE_MAX, Envelope, Spool, SpoolDamaged, SpoolError

MESSAGE = b"From: a@example.test\r\nTo: b@dest.test\r\nSubject: durable\r\n\r\nbody\r\n"
# Larger than a spool row holds (relay.queue.spool.INLINE_MAX): stored in a file.
LARGE = MESSAGE + (b"x" * 76 + b"\r\n") * (INLINE_MAX // 78 + 1)
ENVELOPE = Envelope("a@example.test", ("b@dest.test",), "127.0.0.1", "h", "smtp",
                    received_at=time.time())


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


def in_data(port: int) -> socket.socket:
    """A session that has just been told 354: the message may follow."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.recv(1024)
    for line in (b"EHLO c.test\r\n", b"MAIL FROM:<a@example.test>\r\n",
                 b"RCPT TO:<b@dest.test>\r\n", b"DATA\r\n"):
        s.sendall(line)
        time.sleep(0.05)
        s.recv(1024)
    return s


async def test_sigkill_during_data_delivers_nothing_partial(sink: Sink, start_relay):
    relay: RelayProcess = start_relay(sink.port)
    with in_data(relay.port) as s:
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


async def test_a_message_file_without_its_committed_row_is_removed_at_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    # What a crash between writing a message's file and committing its row leaves
    # (the client never got its 250): the file goes, the stored messages stay.
    spool = Spool(tmp_path / "spool")
    await spool.open()
    await spool.store("KEPT", ENVELOPE, LARGE)
    await spool.close()
    (tmp_path / "spool" / "data" / "INTERRUPTED").write_bytes(b"Subject: half\r\n")
    again = Spool(tmp_path / "spool")
    with caplog.at_level(logging.INFO, logger="relay.spool"):
        await again.open()
    try:
        assert sorted(os.listdir(tmp_path / "spool" / "data")) == ["KEPT"]
        assert [m.id for m in await again.messages()] == ["KEPT"]
        assert await again.data("KEPT") == LARGE
        assert "removed 1 message files without a committed message" in caplog.text
    finally:
        await again.close()


async def test_a_stored_message_whose_file_is_gone_is_refused_as_damage(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    await spool.open()
    await spool.store("LOST", ENVELOPE, LARGE)
    await spool.close()
    (tmp_path / "spool" / "data" / "LOST").unlink()
    with pytest.raises(SpoolDamaged, match="1 stored messages have no file in"):
        await Spool(tmp_path / "spool").open()


async def test_delivered_and_deleted_messages_leave_no_file(sink: Sink, start_relay):
    relay: RelayProcess = start_relay(sink.port)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port) as client:
        await client.sendmail("a@example.test", ["b@dest.test"], LARGE)
    sink.wait_messages(1)
    wait_until(lambda: not relay.queue_rows(), what="the spool to empty")
    wait_until(lambda: not os.listdir(relay.spool_db.parent / "data"),
               what="the delivered message's file to go")


async def test_sigkill_during_a_large_data_leaves_nothing_after_restart(
    sink: Sink, start_relay
):
    relay: RelayProcess = start_relay(sink.port)
    incoming = relay.spool_db.parent / "incoming"
    with in_data(relay.port) as s:
        s.sendall(b"Subject: large and partial\r\n\r\n" + (b"z" * 78 + b"\r\n") * 20000)
        # Past its first octets the message goes to disk as it arrives.
        wait_until(lambda: os.listdir(incoming), what="the message to reach the disk")
        relay.kill()
    relay.start()
    assert not os.listdir(incoming)
    assert not relay.queue_rows()
    await send(relay.port, subject=b"after restart")
    [got] = sink.wait_messages(1)
    assert b"Subject: after restart" in got.data


async def test_a_message_file_that_cannot_be_written_whole_is_not_left_behind(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    await spool.open()
    try:
        unreadable = tmp_path / "a-directory"  # the rest of the message cannot be read
        unreadable.mkdir()
        with pytest.raises(SpoolError):
            await spool.store("HALF", ENVELOPE, MESSAGE, unreadable)
        assert not os.listdir(tmp_path / "spool" / "data")
        assert not await spool.messages()
    finally:
        await spool.close()
