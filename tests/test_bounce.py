"""Delivery status notifications: built to RFC 3464, queued, and sent through the upstream."""

from __future__ import annotations

import email
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import aiosmtplib
import pytest
from conftest import wait_until
from tlsupstream import Relays, UpstreamSink

from relay.queue import bounce
from relay.replies import UpstreamReply

MESSAGE = (b"From: a@example.test\r\nTo: b@dest.test\r\nSubject: bounce me\r\n"
           b"Message-ID: <orig@example.test>\r\n\r\nthe body stays home\r\n")


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[Relays]:
    r = Relays(tmp_path)
    yield r
    r.stop_all()


@pytest.fixture
def sink() -> Iterator[UpstreamSink]:
    s = UpstreamSink()
    s.start()
    yield s
    s.stop()


async def send(port: int, sender: str, recipients: list[str]) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        await client.sendmail(sender, recipients, MESSAGE)


def report(data: bytes) -> tuple[Message, list[Message]]:
    """The parsed DSN and its delivery-status blocks (per-message first)."""
    dsn = email.message_from_bytes(data)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    parts = dsn.get_payload()
    assert isinstance(parts, list)
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list)
    return dsn, blocks


def test_build_reads_back_as_a_multipart_report():
    data = bounce.build(
        queue_id="Q1", reporting_mta="relay.test", sender="a@example.test", arrival=0.0,
        failures=[bounce.Failure("b@dest.test", UpstreamReply.parse("550 5.1.1 No such user"),
                                 "mx1"),
                  bounce.Failure("c@dest.test", UpstreamReply.parse("451 4.3.0 busy"), "",
                                 expired=True)],
        original=MESSAGE, now=100.0,
    )
    dsn, blocks = report(data)
    assert dsn["To"] == "<a@example.test>" and dsn["Auto-Submitted"] == "auto-replied"
    assert blocks[0]["Reporting-MTA"] == "dns; relay.test"
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks[1:]] == [
        ("rfc822; b@dest.test", "failed", "5.1.1"),
        ("rfc822; c@dest.test", "failed", "4.4.7"),
    ]
    assert blocks[1]["Remote-MTA"] == "dns; mx1"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert b"Message-ID: <orig@example.test>" in data
    assert b"the body stays home" not in data
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))


async def test_550_from_upstream_bounces_to_the_sender(relays: Relays, sink: UpstreamSink):
    sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    relay = relays.start(f'["127.0.0.1:{sink.port}"]')
    await send(relay.port, "a@example.test", ["ok@dest.test", "gone@dest.test"])
    original, dsn = sink.wait_messages(2)
    assert original.recipients == ["ok@dest.test"]
    assert dsn.sender == "<>" and dsn.recipients == ["a@example.test"]  # aiosmtpd keeps "<>"
    _, blocks = report(dsn.data)
    [failed] = blocks[1:]
    assert failed["Final-Recipient"] == "rfc822; gone@dest.test"
    assert failed["Status"] == "5.1.1"
    assert failed["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    wait_until(lambda: [s for _, s in relay.queue_rows()] == ["failed"],
               what="the original kept as failed, the DSN gone")
    log = relay.log_text()
    assert "to=<gone@dest.test>" in log and "status=bounced (550 5.1.1 No such user)" in log
    assert "sender non-delivery notification" in log


async def test_null_sender_never_gets_a_bounce(relays: Relays, sink: UpstreamSink):
    sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    relay = relays.start(f'["127.0.0.1:{sink.port}"]')
    await send(relay.port, "", ["gone@dest.test"])
    # The DSN would be stored before the failure is recorded: once failed, it is decided.
    wait_until(lambda: [s for _, s in relay.queue_rows()] == ["failed"], what="failed state")
    assert "status=failed (550 5.1.1 No such user)" in relay.log_text()
    assert sink.handler.messages == []


async def test_hold_keeps_the_message_and_sends_no_bounce(relays: Relays, sink: UpstreamSink):
    sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    relay = relays.start(f'["127.0.0.1:{sink.port}"]', queue='on_permanent_failure = "hold"')
    await send(relay.port, "a@example.test", ["gone@dest.test"])
    wait_until(lambda: [s for _, s in relay.queue_rows()] == ["hold"], what="hold state")
    assert sink.handler.messages == []


async def test_expired_recipient_bounces_with_status_4_4_7(relays: Relays, sink: UpstreamSink):
    sink.handler.rcpt_replies["slow@dest.test"] = "451 4.2.0 Try later"
    relay = relays.start(f'["127.0.0.1:{sink.port}"]', queue='max_lifetime = "1s"')
    await send(relay.port, "a@example.test", ["slow@dest.test"])
    [dsn] = sink.wait_messages(1)
    _, blocks = report(dsn.data)
    assert blocks[1]["Status"] == "4.4.7"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 451 4.2.0 Try later"
    wait_until(lambda: [s for _, s in relay.queue_rows()] == ["failed"], what="failed state")
    assert "status=bounced (4.4.7 queue lifetime expired; last reply: 451 4.2.0 Try later)" \
        in relay.log_text()
