"""The listener's pure parts: reply translation, line checks, addresses, headers, counters."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiosmtpd.smtp import Envelope, Session

from relay import config, replies
from relay.address import problem
from relay.headers import header_safe, strip_forged_authentication_results
from relay.inbound import users
from relay.inbound.connlimits import ConnectionLimits, client_key
from relay.inbound.handler import received_header
from relay.inbound.protocol import AIOSMTPD_REPLIES, command_line_problem, with_enhanced_code

# Every reply line aiosmtpd 1.4.6 (smtp.py) can send without an enhanced status code.
AIOSMTPD_LINES = [
    "500 Command line too long", "500 Error: bad syntax", "500 Error: strict ASCII mode",
    '500 Error: command "FROB" not recognized', "500 Error: command 'AUTH' not recognized",
    "554 Command refused due to lack of security", "530 Must issue a STARTTLS command first",
    "503 Error: send HELO first", "503 Error: send EHLO first", "501 Syntax: HELO hostname",
    "501 Syntax: EHLO hostname", "250 OK", "501 Syntax: QUIT", "221 Bye",
    "501 Syntax: STARTTLS", "454 TLS not available", "220 Ready to start TLS",
    "503 Already authenticated", "501 Not enough value", "501 Too many values",
    "502 Could not VRFY x", "252 Cannot VRFY user, but will accept message and attempt delivery",
    "501 Syntax: VRFY <address>", "501 Syntax: MAIL FROM: <address> [SP <mail-parameters>]",
    "503 Error: nested MAIL command", "501 Error: BODY can only be one of 7BIT, 8BITMIME",
    "501 Error: SMTPUTF8 takes no arguments", "501 Error: SMTPUTF8 disabled",
    "552 Error: message size exceeds fixed maximum message size",
    "555 MAIL FROM parameters not recognized or not implemented",
    "503 Error: need MAIL command", "501 Syntax: RCPT TO: <address>",
    "555 RCPT TO parameters not recognized or not implemented", "501 Syntax: RSET",
    "503 Error: need RCPT command", "501 Syntax: DATA",
    "500 Line too long (see RFC5321 4.5.3.1.6)", "552 Error: Too much mail data",
    "502 EXPN not implemented",
]


@pytest.mark.parametrize("line", AIOSMTPD_LINES)
def test_aiosmtpd_replies_become_replies_from_our_table(line: str):
    assert with_enhanced_code(line) in {str(reply) for reply in replies.TABLE}
    assert with_enhanced_code(line)[:3] == line[:3]


@pytest.mark.parametrize("line", [
    "220 relay.test ESMTP", "250-relay.test", "250 HELP", "334 VXNlcm5hbWU6",
    "354 End data with <CR><LF>.<CR><LF>", "535 5.7.8 Authentication credentials invalid",
    "421 4.7.0 NOOP sent too many times",
])
def test_greeting_ehlo_intermediate_and_coded_replies_pass_unchanged(line: str):
    assert with_enhanced_code(line) == line


def test_translation_targets_are_all_in_the_table():
    assert all(reply in replies.TABLE for _, reply in AIOSMTPD_REPLIES)


@pytest.mark.parametrize("line,why", [
    (b"NOOP\r\n", None),
    (b"MAIL FROM:<j\xc3\xb6rg@x.test> SMTPUTF8\r\n", None),
    (b"NOOP\n", "bare LF"),
    (b"EHLO a\rb\r\n", "control character"),
    (b"EHLO a\x00\r\n", "control character"),
    (b"EHLO a\tb\r\n", "control character"),
    (b"EHLO a\x7f\r\n", "control character"),
    (b"EHLO \xff\r\n", "invalid UTF-8"),
    (b"NOOP", None),  # end of stream: aiosmtpd's business
])
def test_command_line_checks(line: bytes, why: str | None):
    assert command_line_problem(line) == why


def test_received_header_cannot_carry_a_second_header():
    session = Session(loop=None)  # type: ignore[arg-type]
    session.host_name = "a\rX-Evil: 1\r\n"
    session.peer = ("192.0.2.1\r\nX-Evil: 2", 25)  # type: ignore[assignment]
    envelope = Envelope()
    envelope.rcpt_tos = ["u@dest.test\r\nX-Evil: 3"]
    header = received_header(session, envelope, "relay.test", "ID", 0.0)
    assert header.count(b"\r\n") == 3  # three folded lines of one field
    assert all(line.startswith((b"Received:", b"\t")) for line in header.split(b"\r\n")[:-1])
    assert header_safe("tab\there é") == "tab?here ?"


def test_only_authentication_results_with_our_authserv_id_are_removed():
    message = (b"Authentication-Results: relay.test; spf=pass\r\n"
               b"Subject: x\r\n"
               b"Authentication-Results:\r\n \"Relay.Test\" (v1); dkim=pass\r\n"
               b"Authentication-Results: relay.test.evil; spf=pass\r\n"
               b"\r\n"
               b"Authentication-Results: relay.test; in the body\r\n")
    stripped, removed = strip_forged_authentication_results(message, "relay.test")
    assert removed == 2
    assert stripped == (b"Subject: x\r\nAuthentication-Results: relay.test.evil; spf=pass\r\n"
                        b"\r\nAuthentication-Results: relay.test; in the body\r\n")


@pytest.mark.parametrize("address,utf8,why", [
    ("app@example.test", False, None),
    ("@a.test,@b.test:u@c.test", False, "source route"),
    ("u%v@x.test", False, "invalid local part"),
    ('"u@v"@x.test', False, "invalid local part"),
    ("x!u@x.test", False, "invalid local part"),
    ("u@[192.0.2.1]", False, "address literals are not accepted"),
    ("u@192.0.2.1", False, "numeric top-level domain"),
    ("postmaster", False, "address not fully qualified"),
    ("jörg@bücher.test", False, "non-ASCII address without SMTPUTF8"),
    ("jörg@bücher.test", True, None),
    ("u@xn--bcher-kva.test", False, None),
    ("a" * 65 + "@x.test", False, "local part too long"),
    ("u@x.test\x00", False, "control character or space in address"),
])
def test_strict_address_check(address: str, utf8: bool, why: str | None):
    assert problem(address, utf8=utf8) == why


def test_connection_counts_per_client_and_ipv6_by_prefix():
    limits = ConnectionLimits()
    assert limits.admit("2001:db8:1:2::1", 10, 2) is None
    assert limits.admit("2001:db8:1:2::ff", 10, 2) is None
    assert limits.admit("2001:db8:1:2:abcd::1", 10, 2) == (
        "too many connections from 2001:db8:1:2::/64 (2 of 2)")
    assert limits.admit("2001:db8:1:3::1", 3, 2) is None
    assert limits.admit("192.0.2.1", 3, 2) == "too many connections (3 of 3)"
    limits.release("2001:db8:1:2::1")
    assert limits.admit("::ffff:192.0.2.1", 3, 2) is None
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert repr(limits) == "<ConnectionLimits total=3 clients=3>"


def test_auth_failures_are_forgotten_after_a_while():
    now = [1000.0]
    limits = ConnectionLimits(clock=lambda: now[0])
    assert not limits.auth_failed("192.0.2.1", 2)
    assert limits.auth_failed("192.0.2.1", 2)
    assert limits.auth_blocked("192.0.2.1", 2)
    assert not limits.auth_blocked("192.0.2.2", 2)
    now[0] += 901
    assert not limits.auth_blocked("192.0.2.1", 2)


def test_password_hashes_are_salted(tmp_path: Path):
    one, two = users.hash_password("pw", log_n=4), users.hash_password("pw", log_n=4)
    assert one != two
    assert users.matches(one, b"pw") and users.matches(two, b"pw")
    assert not users.matches(one, b"pW")
    assert not users.matches("plain-text", b"plain-text")


def test_listener_settings_are_checked_together(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text(
        '[listener.a]\naddress = "127.0.0.1:2525"\ntls = "starttls"\n'
        '[listener.b]\naddress = "127.0.0.1:2526"\nrequire_tls = true\nauth = "required"\n'
        '[listener.c]\naddress = "127.0.0.1:2527"\ntls = "implicit"\n'
        f'tls_cert = "{tmp_path}/none.pem"\ntls_key = "{tmp_path}/none.pem"\n'
        'auth = "sometimes"\nproxy_networks = ["nowhere"]\n'
    )
    with pytest.raises(config.ConfigError) as failed:
        config.load(path)
    assert failed.value.messages == [
        f'{path}: listener.a.tls: "starttls" needs tls_cert and tls_key',
        f'{path}: listener.b.require_tls: only meaningful with tls = "starttls"',
        f'{path}: listener.b.auth: "required" needs users_file',
        f'{path}: listener.b.auth: "required" needs TLS (or auth_plaintext_loopback for '
        "loopback)",
        f"{path}: listener.c.auth: must be one of off, optional, required, got 'sometimes'",
        f"{path}: listener.c.proxy_networks: expected an IP address or CIDR network, "
        "got 'nowhere'",
        f"{path}: listener.c.tls_cert: cannot load {tmp_path}/none.pem / {tmp_path}/none.pem: "
        "No such file or directory",
    ]


async def test_password_checks_run_at_most_two_at_a_time(tmp_path: Path):
    # Each scrypt check holds 32 MiB: a burst of AUTH attempts waits its turn instead.
    users_file = tmp_path / "users"
    users_file.write_text(f"app:{users.hash_password('right')}\n")
    gate = users.CheckGate()
    results = await asyncio.gather(
        *(gate.check(users_file, b"app", b"wrong") for _ in range(8)),
        gate.check(users_file, b"app", b"right"),
    )
    assert results == [False] * 8 + [True]
    assert gate.peak == users.MAX_CONCURRENT_CHECKS == 2
    assert gate.running == 0
