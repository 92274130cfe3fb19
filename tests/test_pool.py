"""The persistent upstream pool and per-recipient results, against a real sink."""

from __future__ import annotations

import aiosmtplib
from conftest import RelayProcess, Sink, wait_until

MESSAGE = b"From: a@example.test\r\nSubject: pool\r\n\r\nbody\r\n"


async def send(port: int, recipients: list[str]) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        await client.sendmail("a@example.test", recipients, MESSAGE)


async def test_one_connection_carries_many_messages(sink: Sink, start_relay):
    relay = start_relay(sink.port, upstream_extra="pool_size = 1")
    for _ in range(10):
        await send(relay.port, ["b@dest.test"])
    sink.wait_messages(10)
    assert sink.handler.connections == 1


async def test_connection_closed_after_max_messages(sink: Sink, start_relay):
    relay = start_relay(sink.port, upstream_extra="pool_size = 1\nmax_messages_per_connection = 3")
    for _ in range(7):
        await send(relay.port, ["b@dest.test"])
    sink.wait_messages(7)
    assert sink.handler.connections == 3  # 3 + 3 + 1


async def test_upstream_closing_idle_connection_loses_nothing(sink: Sink, start_relay):
    relay = start_relay(sink.port, upstream_extra="pool_size = 1")
    await send(relay.port, ["first@dest.test"])
    sink.wait_messages(1)
    sink.close_connections()  # the upstream's idle timeout strikes
    await send(relay.port, ["second@dest.test"])
    messages = sink.wait_messages(2)
    assert messages[1].recipients == ["second@dest.test"]
    assert sink.handler.connections == 2
    log = relay.log_text()
    assert "to=<second@dest.test>" in log
    assert "status=deferred" not in log  # a stale connection is not a failed attempt


async def test_451_from_upstream_is_retried_later(sink: Sink, start_relay):
    sink.handler.data_replies.append("451 4.3.0 Try again later")
    relay: RelayProcess = start_relay(sink.port)
    await send(relay.port, ["b@dest.test"])
    [got] = sink.wait_messages(1)
    assert got.recipients == ["b@dest.test"]
    assert sink.handler.data_attempts == 2
    # The sink has the message before the relay has read its 250 and logged it.
    log = wait_until(lambda: "attempts=2, status=sent" in relay.log_text() and relay.log_text(),
                     what="the delivery line")
    assert "to=<b@dest.test>, relay=" in log
    assert "attempts=1, status=deferred (451 4.3.0 Try again later)" in log
    wait_until(lambda: not relay.queue_rows(), what="the spool to empty")


async def test_550_for_one_recipient_fails_it_and_delivers_the_others(sink: Sink, start_relay):
    sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    relay: RelayProcess = start_relay(sink.port)
    await send(relay.port, ["ok@dest.test", "gone@dest.test", "also@dest.test"])
    got = sink.wait_messages(1)[0]  # the second is the bounce (tests/test_bounce.py)
    assert got.recipients == ["ok@dest.test", "also@dest.test"]
    wait_until(lambda: [s for _, s in relay.queue_rows()] == ["failed"],
               what="the message to be marked failed")
    assert sorted(relay.recipient_rows()) == [
        ("also@dest.test", "sent", "250 2.0.0 Ok: stored"),
        ("gone@dest.test", "failed", "550 5.1.1 No such user"),
        ("ok@dest.test", "sent", "250 2.0.0 Ok: stored"),
    ]
    assert "to=<gone@dest.test>" in relay.log_text()
    assert "status=bounced (550 5.1.1 No such user)" in relay.log_text()
