"""Policies obeyed by the running relay: real SMTP sessions, a real upstream, SIGHUP reload."""

from __future__ import annotations

import signal
from pathlib import Path

import aiosmtplib
import pytest
from conftest import RelayProcess, Sink, wait_until

MESSAGE = b"From: app@example.test\r\nSubject: {subject}\r\n\r\nbody\r\n"

POLICY = r"""
[lists]
blocked = ["blocked@example.test"]

[[rule]]
name = "blocked-sender"
match.sender = "@blocked"
action = "reject"
message = "550 5.7.1 Sender {sender} is not allowed"

[[rule]]
name = "busy"
match.recipient_domain = "busy.test"
action = "tempfail"
message = "451 4.7.1 Try {recipient} later"

[[rule]]
name = "rollout"
match.recipient = "watched@dest.test"
action = "log"
log_action = "reject"

[[rule]]
name = "tag-invoices"
match.header."Subject" = "invoice*"
action = "tag"
add_headers = { "X-Relay-Class" = "billing via {client_address}" }

[[rule]]
name = "bulk"
match.header."Subject" = "newsletter*"
action = "route"
route = "bulk"

[[rule]]
name = "hold-tests"
match.header."Subject" = 're:^\[TEST\]'
action = "hold"

[[rule]]
name = "discard-invalid"
match.recipient_domain = "example.invalid"
action = "discard"

[[rule]]
name = "loopback"
match.client_address = "@relay_networks"
action = "accept"
"""


def write_policy(directory: Path, text: str) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "10-test.toml").write_text(text)
    return directory


@pytest.fixture
def policy_relay(tmp_path, sink: Sink, start_relay):
    bulk = Sink()
    bulk.start()
    policies = write_policy(tmp_path / "policies", POLICY)
    relay = start_relay(
        sink.port, extra=f'policies_dir = "{policies}"',
        upstream_extra=f'\n[upstream.bulk]\nhosts = ["127.0.0.1:{bulk.port}"]\n',
    )
    yield relay, bulk
    bulk.stop()


async def send(port: int, sender: str, recipients: list[str], subject: str = "hello") -> str:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        _, reply = await client.sendmail(
            sender, recipients, MESSAGE.replace(b"{subject}", subject.encode())
        )
        return reply


async def test_reject_rule_refuses_at_rcpt_with_its_reply(policy_relay, sink: Sink):
    relay, _ = policy_relay
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await send(relay.port, "blocked@example.test", ["b@dest.test"])
    [error] = refused.value.recipients
    assert (error.code, error.message) == (
        550, "5.7.1 Sender blocked@example.test is not allowed")
    log = relay.log_text()
    assert "NOQUEUE: reject: RCPT from [127.0.0.1]: 550 5.7.1 Sender blocked@example.test" in log
    assert "rule=blocked-sender" in log
    assert relay.queue_rows() == []


async def test_tempfail_rule_answers_4xx(policy_relay):
    relay, _ = policy_relay
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await send(relay.port, "a@example.test", ["x@busy.test"])
    [error] = refused.value.recipients
    assert (error.code, error.message) == (451, "4.7.1 Try x@busy.test later")


async def test_tag_adds_a_header_and_log_rule_changes_nothing_but_the_log(
    policy_relay, sink: Sink
):
    relay, _ = policy_relay
    await send(relay.port, "a@example.test", ["watched@dest.test"], subject="invoice 7")
    [got] = sink.wait_messages(1)
    assert b"X-Relay-Class: billing via 127.0.0.1\r\n" in got.data
    assert got.recipients == ["watched@dest.test"]
    assert "rule=rollout would reject" in relay.log_text()


async def test_route_sends_to_the_chosen_upstream_group(policy_relay, sink: Sink):
    relay, bulk = policy_relay
    await send(relay.port, "a@example.test", ["reader@dest.test"], subject="newsletter 12")
    [got] = bulk.wait_messages(1)
    assert b"Subject: newsletter 12" in got.data
    assert sink.handler.messages == []


async def test_hold_keeps_the_message_in_the_spool(policy_relay, sink: Sink):
    relay, _ = policy_relay
    reply = await send(relay.port, "a@example.test", ["b@dest.test"], subject="[TEST] one")
    queue_id = reply.rsplit(" ", 1)[1]
    # The barrier: a later ordinary message is delivered, the held one is not.
    await send(relay.port, "a@example.test", ["b@dest.test"], subject="after")
    [got] = sink.wait_messages(1)
    assert b"Subject: after" in got.data
    assert relay.queue_rows() == [(queue_id, "hold")]
    [line] = [x for x in relay.log_text().splitlines() if f"{queue_id}: client=" in x]
    assert line.endswith("rule=hold-tests, hold")


async def test_discard_accepts_and_never_delivers(policy_relay, sink: Sink):
    relay, _ = policy_relay
    reply = await send(relay.port, "a@example.test", ["x@example.invalid"])
    assert reply.startswith("2.0.0 Ok")
    await send(relay.port, "a@example.test", ["b@dest.test"], subject="after")
    sink.wait_messages(1)
    assert len(sink.handler.messages) == 1
    assert relay.queue_rows() == []
    assert "discard" in relay.log_text()


async def test_sighup_reload_applies_new_policy_and_broken_file_keeps_old(
    policy_relay, tmp_path
):
    relay: RelayProcess = policy_relay[0]
    policies = tmp_path / "policies"
    await send(relay.port, "new-block@example.test", ["b@dest.test"])  # allowed for now
    write_policy(policies, POLICY.replace('"blocked@example.test"',
                                          '"blocked@example.test", "new-block@example.test"'))
    relay.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded configuration" in relay.log_text(), what="the reload")
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(relay.port, "new-block@example.test", ["b@dest.test"])

    (policies / "20-broken.toml").write_text('[[rule]]\nname = "x"\naction = "explode"\n')
    relay.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in relay.log_text(), what="the failed reload")
    assert 'policies/20-broken.toml: rule "x": action' in relay.log_text()
    # The old policy is still in force, and the relay still serves.
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(relay.port, "new-block@example.test", ["b@dest.test"])
    assert (await send(relay.port, "a@example.test", ["b@dest.test"])).startswith("2.0.0")
