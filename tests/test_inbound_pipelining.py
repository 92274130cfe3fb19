"""Replies to a pipelined group (RFC 2920) leave together, as Postfix sends them: a reply
to MAIL, RCPT or RSET waits while the client's next command has already arrived."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RelayProcess, Sink
from dnsserver import TEMPFAIL_ZONE, DnsServer, dnsmasq
from smtpraw import RawSMTP

# The MAIL stage looks the sender's SPF record up: under TEMPFAIL_ZONE that takes the
# whole DNS timeout, so MAIL's reply comes long after the one before it could have.
POLICY = """
[[rule]]
name = "spf-fail"
match.spf = "fail"
action = "reject"

[[rule]]
name = "relay-networks"
match.client_address = "@relay_networks"
action = "accept"
"""
SLOW_SENDER = f"app@slow.{TEMPFAIL_ZONE}"


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with dnsmasq({}) as server:
        yield server


@pytest.fixture
def relay(tmp_path: Path, sink: Sink, dns: DnsServer, start_relay) -> RelayProcess:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "10-test.toml").write_text(POLICY)
    return start_relay(
        sink.port, extra=f'policies_dir = "{policies}"',
        sections=f'\n[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\ntimeout = "1s"\n'
                 'attempts = 1\n')


def test_replies_to_a_pipelined_group_arrive_in_one_piece(relay: RelayProcess):
    with RawSMTP(relay.port) as raw:
        raw.reply()
        raw.chat(b"EHLO client.test\r\n")
        raw.send(f"RSET\r\nMAIL FROM:<{SLOW_SENDER}>\r\n".encode())
        # RSET is answered at once, but its reply waits for MAIL's (which waits for
        # DNS): both come in the first piece the client reads.
        first = raw.sock.recv(65536)
        assert first.startswith(b"250 2.0.0 Ok\r\n250 2.1.0 ") and first.endswith(b"\r\n"), first


def test_a_command_that_is_not_pipelined_is_answered_at_once(relay: RelayProcess):
    with RawSMTP(relay.port) as raw:
        raw.reply()
        raw.chat(b"EHLO client.test\r\n")
        raw.send(b"RSET\r\n")
        assert raw.sock.recv(65536) == b"250 2.0.0 Ok\r\n"
        # A partial line is not a command yet: the reply before it is not held for it.
        raw.send(b"RSET\r\nNO")
        assert raw.sock.recv(65536) == b"250 2.0.0 Ok\r\n"
        raw.send(b"OP\r\n")
        assert raw.reply().startswith("250")
