"""PIPELINING to the upstream (RFC 2920): one round trip for MAIL, every RCPT and DATA,
and per-recipient results exactly as without it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import aiosmtplib
import pytest
from conftest import Sink

from relay.outbound.pool import Host
from relay.outbound.smarthosts import UpstreamSettings
from relay.outbound.transaction import Transaction, transmit
from relay.queue.content import Content

MESSAGE = b"From: a@example.test\r\nSubject: pipelining\r\n\r\nbody\r\n"


@pytest.fixture(params=[True, False], ids=["pipelined", "stepwise"])
def upstream(request: pytest.FixtureRequest) -> Iterator[Sink]:
    sink = Sink()
    sink.handler.pipelining = request.param
    sink.start()
    yield sink
    sink.stop()


async def send(sink: Sink, recipients: list[str], sender: str = "a@example.test") -> Transaction:
    settings = UpstreamSettings("default", hosts=(("127.0.0.1", sink.port),))
    host = Host(settings.members[0], settings, "relay.test")
    try:
        async with host.borrow() as conn:
            assert conn.client.supports_extension("pipelining") == sink.handler.pipelining
            return await transmit(conn, sender, recipients, Content.of(MESSAGE), settings)
    finally:
        await host.close()


def replies(sent: Transaction) -> list[str]:
    return [str(r.reply) for r in sent.results]


async def test_one_refused_recipient_among_others(upstream: Sink):
    upstream.handler.rcpt_replies["no@dest.test"] = "550 5.1.1 No such user"
    sent = await send(upstream, ["a@dest.test", "no@dest.test", "b@dest.test"])
    assert replies(sent) == ["250 2.0.0 Ok: stored", "550 5.1.1 No such user",
                             "250 2.0.0 Ok: stored"]
    [got] = upstream.wait_messages(1)
    assert got.recipients == ["a@dest.test", "b@dest.test"]
    # MAIL, 3 x RCPT, DATA and the final dot: 6 waits one at a time, 2 pipelined.
    assert sent.round_trips == (2 if upstream.handler.pipelining else 6)


async def test_a_refused_mail_refuses_every_recipient_and_sends_nothing(upstream: Sink):
    upstream.handler.mail_reply = "553 5.1.8 Sender domain does not exist"
    sent = await send(upstream, ["a@dest.test", "b@dest.test"])
    assert replies(sent) == ["553 5.1.8 Sender domain does not exist"] * 2
    assert sent.host_trouble is None
    assert upstream.handler.messages == [] and upstream.handler.data_attempts == 0


async def test_every_recipient_refused_means_no_message(upstream: Sink):
    upstream.handler.rcpt_replies.update({"a@dest.test": "550 5.1.1 No", "b@dest.test":
                                          "451 4.7.1 Greylisted"})
    sent = await send(upstream, ["a@dest.test", "b@dest.test"])
    assert replies(sent) == ["550 5.1.1 No", "451 4.7.1 Greylisted"]
    assert sent.host_trouble is None  # refusals at RCPT say nothing about the host
    assert upstream.handler.data_attempts == 0


async def test_a_554_to_the_message_fails_the_accepted_recipients(upstream: Sink):
    upstream.handler.data_replies.append("554 5.6.0 Message refused")
    upstream.handler.rcpt_replies["no@dest.test"] = "550 5.1.1 No such user"
    sent = await send(upstream, ["a@dest.test", "no@dest.test"])
    assert replies(sent) == ["554 5.6.0 Message refused", "550 5.1.1 No such user"]


async def test_a_connection_carries_on_after_a_pipelined_transaction(upstream: Sink):
    settings = UpstreamSettings("default", hosts=(("127.0.0.1", upstream.port),))
    host = Host(settings.members[0], settings, "relay.test")
    upstream.handler.rcpt_replies["no@dest.test"] = "550 5.1.1 No such user"
    try:
        async with host.borrow() as conn:
            for recipients in (["a@dest.test"], ["no@dest.test"], ["b@dest.test"]):
                await transmit(conn, "a@example.test", recipients, Content.of(MESSAGE),
                               settings)
            assert not conn.broken
    finally:
        await host.close()
    assert [m.recipients for m in upstream.wait_messages(2)] == [["a@dest.test"],
                                                                  ["b@dest.test"]]
    assert upstream.handler.connections == 1


async def test_too_many_recipients_pipelined_each_keeps_its_own_answer():
    sink = Sink()
    sink.handler.pipelining = True
    sink.handler.rcpt_replies["b@dest.test"] = "452 4.5.3 Too many recipients"
    sink.start()
    try:
        sent = await send(sink, ["a@dest.test", "b@dest.test", "c@dest.test"])
    finally:
        sink.stop()
    # c was accepted in this transaction: it must not be sent again; b goes in the next.
    assert [(str(r.reply), r.again) for r in sent.results] == [
        ("250 2.0.0 Ok: stored", False), ("452 4.5.3 Too many recipients", True),
        ("250 2.0.0 Ok: stored", False),
    ]


async def test_a_reply_to_one_rcpt_is_marked_as_that_recipients_own(upstream: Sink):
    # A greylisting "451 4.7.1" at RCPT says nothing about the host or our sending rate.
    upstream.handler.rcpt_replies["grey@dest.test"] = "451 4.7.1 Greylisted"
    sent = await send(upstream, ["grey@dest.test", "ok@dest.test"])
    assert [(str(r.reply), r.own) for r in sent.results] == [
        ("451 4.7.1 Greylisted", True), ("250 2.0.0 Ok: stored", False)]
    assert sent.host_trouble is None


async def test_an_upstream_silent_after_the_batch_times_out_the_transaction():
    """The batch waits command_timeout for its replies, then gives up with a read timeout
    (delivery defers on it) and the connection is not used again."""
    received = bytearray()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 silent.test ESMTP\r\n")
        await reader.readline()  # EHLO
        writer.write(b"250-silent.test\r\n250 PIPELINING\r\n")
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(4096):
                received.extend(chunk)  # MAIL, RCPT, DATA: never answered
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = UpstreamSettings("default", hosts=(("127.0.0.1", port),),
                                command_timeout=0.5)
    host = Host(settings.members[0], settings, "relay.test")
    try:
        async with host.borrow() as conn:
            with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
                await transmit(conn, "a@example.test", ["b@dest.test"], Content.of(MESSAGE),
                               settings)
            assert conn.broken
    finally:
        await host.close()
        server.close()
    assert b"MAIL FROM:<a@example.test>" in received and b"DATA\r\n" in received
