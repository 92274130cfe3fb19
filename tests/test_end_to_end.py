"""A message's whole path through a real relay process to a real upstream."""

from __future__ import annotations

import shutil
import subprocess

import aiosmtplib
import pytest
from conftest import Sink, send_raw, wait_until

MESSAGE = (
    b"From: App <app@example.test>\r\n"
    b"To: User <user@dest.test>\r\n"
    b"Subject: invoice 42\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b".leading dot survives dot-stuffing\r\n"
    b"caf\xc3\xa9 8-bit bytes stay as they are\r\n"
)


async def send(port: int, sender: str, recipients: list[str], data: bytes) -> str:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as client:
        errors, reply = await client.sendmail(sender, recipients, data)
        assert errors == {}
        return reply


async def test_message_reaches_upstream_with_exact_bytes_and_envelope(sink, start_relay):
    relay = start_relay(sink.port)
    reply = await send(relay.port, "app@example.test", ["user@dest.test", "two@dest.test"],
                       MESSAGE)
    assert reply.startswith("2.0.0 Ok: queued as ")
    queue_id = reply.rsplit(" ", 1)[1]

    [got] = sink.wait_messages(1)
    assert got.sender == "app@example.test"
    assert got.recipients == ["user@dest.test", "two@dest.test"]
    received, _, rest = got.data.partition(b"\r\n\tby ")
    assert received == b"Received: from " + received[len(b"Received: from "):]
    assert f"relay.test (policy-relay) with ESMTP id {queue_id}".encode() in rest
    # Only our Received: line was added; everything after it is byte for byte the original.
    assert got.data.endswith(MESSAGE)
    assert got.data.count(b"Received:") == 1
    wait_until(lambda: not relay.queue_rows(), what="the spool to empty")
    line = f"{queue_id}: to=<user@dest.test>, relay=sink.test[127.0.0.1]:{sink.port}"
    assert line in relay.log_text()
    assert "status=sent (250 2.0.0 Ok: stored)" in relay.log_text()


async def test_null_sender_is_carried_as_null(sink, start_relay):
    relay = start_relay(sink.port)
    await send(relay.port, "", ["user@dest.test"], MESSAGE)
    [got] = sink.wait_messages(1)
    assert got.sender == "<>"  # aiosmtpd (the sink) spells the null sender "<>"


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_through_the_relay(sink, start_relay):
    relay = start_relay(sink.port)
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{relay.port}", "--from", "cron@example.test",
         "--to", "ops@dest.test", "--helo", "app1.test", "--header", "Subject: swaks check"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  250 2.0.0 Ok: queued as" in result.stdout
    [got] = sink.wait_messages(1)
    assert got.recipients == ["ops@dest.test"]
    assert b"Subject: swaks check" in got.data
    assert b"Received: from app1.test ([127.0.0.1])" in got.data


def test_banner_and_ehlo_show_our_hostname(sink, start_relay):
    relay = start_relay(sink.port)
    said = send_raw(relay.port, [b"EHLO client.test\r\n", b"QUIT\r\n"])
    assert said.startswith(b"220 relay.test ESMTP\r\n")
    assert b"250-relay.test\r\n" in said
    assert b"Python" not in said


async def test_client_outside_allowlist_is_refused_at_rcpt(sink, start_relay):
    relay = start_relay(sink.port, extra='relay_networks = ["192.0.2.0/24"]')
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port) as client:
        await client.mail("app@example.test")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt("user@dest.test")
    assert refused.value.code == 554
    assert refused.value.message == "5.7.1 <user@dest.test>: Relay access denied"
    assert relay.queue_rows() == []
    assert sink.handler.messages == []
    assert "NOQUEUE: reject: RCPT from [127.0.0.1]: 554 5.7.1" in relay.log_text()


def test_bare_lf_in_data_is_refused_and_nothing_is_spooled(sink, start_relay):
    relay = start_relay(sink.port)
    said = send_raw(relay.port, [
        b"EHLO client.test\r\n", b"MAIL FROM:<a@example.test>\r\n", b"RCPT TO:<b@dest.test>\r\n",
        b"DATA\r\n", b"Subject: x\r\n\r\nline\nsmuggled\r\n.\r\n", b"QUIT\r\n",
    ])
    assert b"550 5.5.2 Message contains bare CR, bare LF or NUL; not accepted" in said
    assert relay.queue_rows() == []


def test_interrupted_data_leaves_nothing_behind(sink: Sink, start_relay):
    relay = start_relay(sink.port)
    send_raw(relay.port, [
        b"EHLO client.test\r\n", b"MAIL FROM:<a@example.test>\r\n", b"RCPT TO:<b@dest.test>\r\n",
        b"DATA\r\n", b"Subject: half\r\n\r\nthe client goes away here",
    ])
    send_raw(relay.port, [b"QUIT\r\n"])  # the relay is still serving
    assert relay.queue_rows() == []
    assert sink.handler.messages == []


def utf8_session(port: int) -> bytes:
    return send_raw(port, [
        b"EHLO client.test\r\n",
        "MAIL FROM:<jörg@exämple.test> SMTPUTF8\r\n".encode(),
        "RCPT TO:<zoë@dest.test>\r\n".encode(),
        b"DATA\r\n", "Subject: grüße\r\n\r\nhallo\r\n.\r\n".encode(), b"QUIT\r\n",
    ])


def test_smtputf8_mail_goes_upstream_with_smtputf8(start_relay):
    sink = Sink(utf8=True)
    sink.start()
    try:
        relay = start_relay(sink.port)
        assert b"250 2.0.0 Ok: queued as" in utf8_session(relay.port)
        [got] = sink.wait_messages(1)
        assert (got.sender, got.recipients) == ("jörg@exämple.test", ["zoë@dest.test"])
        assert b"with UTF8SMTP id" in got.data
        assert "Subject: grüße".encode() in got.data
    finally:
        sink.stop()


def test_smtputf8_mail_is_never_downgraded(sink: Sink, start_relay):
    relay = start_relay(sink.port)  # this sink does not offer SMTPUTF8
    assert b"250 2.0.0 Ok: queued as" in utf8_session(relay.port)
    wait_until(lambda: "status=bounced (553 5.6.7 upstream does not support SMTPUTF8)"
               in relay.log_text(), what="the permanent failure")
    # The bounce to jörg@ needs SMTPUTF8 too and cannot go either; nothing else arrived.
    assert sink.handler.messages == []
