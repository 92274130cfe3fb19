"""Hostile input at the listener: each answered exactly, and nothing else changes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import RelayProcess, Sink, relay_with_sink, wait_until
from smtpraw import RawSMTP

LIMITS = """
max_message_size = "4K"
max_recipients = 3
max_errors = 5
max_header_size = "1K"
max_hops = 5
"""

HELLO = b"EHLO client.test\r\n"
ENVELOPE = b"MAIL FROM:<app@example.test>\r\nRCPT TO:<user@dest.test>\r\nDATA\r\n"
BODY = b"From: app@example.test\r\nSubject: hello\r\n\r\nHello.\r\n"


@pytest.fixture(scope="module")
def relay_and_sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RelayProcess, Sink]]:
    """One relay for the whole module: every test opens its own session."""
    with relay_with_sink(tmp_path_factory.mktemp("hostile"), LIMITS) as both:
        yield both


@pytest.fixture
def relay(relay_and_sink: tuple[RelayProcess, Sink]) -> RelayProcess:
    return relay_and_sink[0]


@pytest.fixture
def sink(relay_and_sink: tuple[RelayProcess, Sink]) -> Iterator[Sink]:
    relay, sink = relay_and_sink
    sink.handler.messages.clear()
    yield sink
    # Whatever a test let through has been delivered by now or is still queued.
    wait_until(lambda: not relay.queue_rows(), what="the spool to empty")


def session(relay: RelayProcess, source: str = "127.0.0.1") -> RawSMTP:
    raw = RawSMTP(relay.port, source=source)
    assert raw.reply() == "220 relay.test ESMTP"
    assert raw.chat(HELLO)[0].startswith("250-relay.test")
    return raw


def test_ehlo_advertises_exactly_the_extensions_we_support(relay: RelayProcess, sink: Sink):
    with RawSMTP(relay.port) as raw:
        raw.reply()
        [ehlo] = raw.chat(HELLO)
    assert ehlo.split("\n") == [
        "250-relay.test", "250-SIZE 4096", "250-8BITMIME", "250-PIPELINING",
        "250-ENHANCEDSTATUSCODES", "250 SMTPUTF8",
    ]


def test_every_reply_carries_an_enhanced_status_code(relay: RelayProcess, sink: Sink):
    with session(relay) as raw:
        said = raw.chat(b"NOOP\r\nRSET\r\nHELP\r\nVRFY u@dest.test\r\nEXPN staff\r\nFROB\r\n"
                        b"DATA\r\nRCPT TO:<b@dest.test>\r\nQUIT\r\n", 9)
    assert said == [
        "250 2.0.0 Ok",
        "250 2.0.0 Ok",
        "214 2.0.0 See RFC 5321",
        "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
        "502 5.5.1 Error: command not implemented",
        "500 5.5.1 Error: command not recognized",
        "503 5.5.1 Error: need RCPT command",
        "503 5.5.1 Error: need MAIL command",
        "221 2.0.0 Bye",
    ]
    with session(relay) as raw:
        said = raw.chat(b"MAIL FROM:<a@example.test> BODY=9BIT\r\n"
                        b"MAIL FROM:<a@example.test> FOO=1\r\nHELO\r\nQUIT\r\n", 4)
    assert said == [
        "501 5.5.4 Syntax error in parameters or arguments",
        "555 5.5.4 Parameters not recognized or not implemented",
        "501 5.5.4 Syntax error in parameters or arguments",
        "221 2.0.0 Bye",
    ]


def test_pipelined_transaction_in_one_write_is_answered_in_order(relay: RelayProcess, sink: Sink):
    with RawSMTP(relay.port) as raw:
        raw.reply()
        said = raw.chat(HELLO + ENVELOPE + BODY + b".\r\n" + b"QUIT\r\n", 6)
    assert said[1:4] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    assert said[4].startswith("250 2.0.0 Ok: queued as ")
    assert said[5] == "221 2.0.0 Bye"
    [got] = sink.wait_messages(1)
    assert got.data.endswith(BODY)


# -- SMTP smuggling: every end-of-data variant of SEC Consult's and smtpsmug's lists --

SMUGGLED = (
    b"MAIL FROM:<ceo@bank.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\n"
    b"From: ceo@bank.test\r\nSubject: smuggled\r\n\r\nwire the money\r\n"
)
FAKE_ENDS = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r.\n",
             b"\n.\r", b"\r\n\x00.\r\n"]


@pytest.mark.parametrize("fake_end", FAKE_ENDS, ids=repr)
def test_smuggled_second_message_behind_a_fake_end_of_data_is_never_accepted(
    relay: RelayProcess, sink: Sink, fake_end: bytes
):
    with session(relay) as raw:
        assert raw.chat(ENVELOPE, 3)[2].startswith("354")
        said = raw.chat(BODY + fake_end + SMUGGLED + b"\r\n.\r\n", 1)
        assert said == ["550 5.5.2 Message contains bare CR, bare LF or NUL; not accepted"]
        # The session goes on, and an honest message after it is the only one delivered.
        assert raw.chat(ENVELOPE, 3)[2].startswith("354")
        assert raw.chat(BODY + b".\r\n")[0].startswith("250 2.0.0 Ok: queued as")
    [got] = sink.wait_messages(1)
    assert got.recipients == ["user@dest.test"]
    assert b"smuggled" not in got.data


@pytest.mark.parametrize("body", [b"bare\rCR\r\n", b"bare\nLF\r\n", b"N\x00L\r\n"], ids=repr)
def test_bare_cr_bare_lf_or_nul_anywhere_in_data_is_refused(
    relay: RelayProcess, sink: Sink, body: bytes
):
    with session(relay) as raw:
        raw.chat(ENVELOPE, 3)
        assert raw.chat(BODY + body + b".\r\n") == [
            "550 5.5.2 Message contains bare CR, bare LF or NUL; not accepted"
        ]
    assert relay.queue_rows() == []
    assert sink.handler.messages == []


def test_auth_on_a_listener_without_auth_is_refused(relay: RelayProcess, sink: Sink):
    with session(relay) as raw:
        assert raw.chat(b"AUTH PLAIN AGFsaWNlAHB3\r\n") == [
            "503 5.5.1 Error: authentication not enabled"
        ]


def test_bare_lf_as_command_terminator_is_refused_and_not_executed(
    relay: RelayProcess, sink: Sink
):
    with session(relay) as raw:
        said = raw.chat(b"MAIL FROM:<a@example.test>\nRCPT TO:<b@dest.test>\n", 2)
        assert said == ["501 5.5.2 Syntax error: bare LF or control character in command"] * 2
        assert raw.chat(b"RCPT TO:<b@dest.test>\r\n") == ["503 5.5.1 Error: need MAIL command"]


@pytest.mark.parametrize("line", [
    b"EHLO a\rX-Evil: 1\r\n",
    b"EHLO a\x00b\r\n",
    b"MAIL FROM:<a\x00b@example.test>\r\n",
    b"MAIL FROM:<a@example.test>\tSIZE=10\r\n",
    b"MAIL FROM:<a@example.test> \xff\xfe\r\n",
], ids=repr)
def test_control_characters_in_command_arguments_get_501(
    relay: RelayProcess, sink: Sink, line: bytes
):
    with session(relay) as raw:
        assert raw.chat(line) == [
            "501 5.5.2 Syntax error: bare LF or control character in command"
        ]
        # Nothing of it took effect: no sender is set.
        assert raw.chat(b"RCPT TO:<b@dest.test>\r\n") == ["503 5.5.1 Error: need MAIL command"]


def test_control_characters_in_rcpt_get_501(relay: RelayProcess, sink: Sink):
    with session(relay) as raw:
        raw.chat(b"MAIL FROM:<a@example.test>\r\n")
        assert raw.chat(b"RCPT TO:<b\x01c@dest.test>\r\n") == [
            "501 5.5.2 Syntax error: bare LF or control character in command"
        ]
        assert raw.chat(b"DATA\r\n") == ["503 5.5.1 Error: need RCPT command"]


def test_a_helo_cannot_inject_a_header(relay: RelayProcess, sink: Sink):
    with session(relay) as raw:
        raw.chat(b"HELO a\rX-Evil: 1\r\n")
        raw.chat(b"HELO app\x0bX-Evil: 2\r\n")
        assert raw.chat(ENVELOPE, 3)[2].startswith("354")
        assert raw.chat(BODY + b".\r\n")[0].startswith("250 2.0.0")
    [got] = sink.wait_messages(1)
    assert b"X-Evil" not in got.data
    assert got.data.startswith(b"Received: from client.test ([127.0.0.1])\r\n")


# -- addresses: source routes, quoted local parts, % and ! routing, literals ------------

BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax"
MALFORMED = "553 5.1.3 Error: malformed address"


@pytest.mark.parametrize("path,reply", [
    ("<@relay.test,@mx.test:u@victim.test>", BAD_RECIPIENT),  # source route
    ("<u%victim.test@relay.test>", BAD_RECIPIENT),
    ('<"u@victim.test"@relay.test>', BAD_RECIPIENT),
    ("<victim.test!u@relay.test>", BAD_RECIPIENT),
    ("<u@[127.0.0.1]>", BAD_RECIPIENT),
    ("<u@10.0.0.1>", BAD_RECIPIENT),
    ("<postmaster>", BAD_RECIPIENT),
    ("<u@dest.test.>", BAD_RECIPIENT),
    ("<u@-bad-.test>", BAD_RECIPIENT),
    ("<us(comment)er@dest.test>", BAD_RECIPIENT),
    ("<u@victim.test@relay.test>", BAD_RECIPIENT),
    ("<" + "a" * 65 + "@dest.test>", BAD_RECIPIENT),
    ("<u@" + ".".join(["d" * 60] * 5) + ".test>", BAD_RECIPIENT),  # path over 256
    ("<>", BAD_RECIPIENT),
    ("u@dest.test", MALFORMED),
    ("<u@dest.test", MALFORMED),
    ("<u@dest.test>SIZE=1", MALFORMED),
    ("<jörg@dest.test>", "553 5.6.7 Non-ASCII address requires SMTPUTF8"),
], ids=repr)
def test_bad_recipient_addresses_are_refused_by_our_own_check(
    relay: RelayProcess, sink: Sink, path: str, reply: str
):
    with session(relay) as raw:
        raw.chat(b"MAIL FROM:<a@example.test>\r\n")
        assert raw.chat(f"RCPT TO:{path}\r\n".encode()) == [reply]
        assert raw.chat(b"DATA\r\n") == ["503 5.5.1 Error: need RCPT command"]


@pytest.mark.parametrize("path,reply", [
    ("<@relay.test:a@example.test>", "501 5.1.7 Bad sender address syntax"),
    ("<a%b@example.test>", "501 5.1.7 Bad sender address syntax"),
    ("<a@example>", "501 5.1.7 Bad sender address syntax"),
    ("a@example.test", MALFORMED),
    ("<jörg@example.test>", "553 5.6.7 Non-ASCII address requires SMTPUTF8"),
], ids=repr)
def test_bad_sender_addresses_are_refused(relay: RelayProcess, sink: Sink, path: str, reply: str):
    with session(relay) as raw:
        assert raw.chat(f"MAIL FROM:{path}\r\n".encode()) == [reply]
        assert raw.chat(b"RCPT TO:<b@dest.test>\r\n") == ["503 5.5.1 Error: need MAIL command"]


def test_utf8_addresses_are_accepted_with_the_smtputf8_parameter(
    relay: RelayProcess, sink: Sink
):
    with session(relay) as raw:
        assert raw.chat("MAIL FROM:<jörg@example.test> SMTPUTF8\r\n".encode()) == ["250 2.1.0 Ok"]
        assert raw.chat("RCPT TO:<zoë@bücher.test>\r\n".encode()) == ["250 2.1.5 Ok"]
        assert raw.chat(b"RSET\r\n") == ["250 2.0.0 Ok"]


# -- limits: line and size limits, command floods, BDAT, cross-protocol requests --------


def test_size_over_the_limit_is_refused_at_mail(relay: RelayProcess, sink: Sink):
    with session(relay) as raw:
        assert raw.chat(b"MAIL FROM:<a@example.test> SIZE=4097\r\n") == [
            "552 5.3.4 Message size exceeds fixed limit"
        ]
        assert raw.chat(b"MAIL FROM:<a@example.test> SIZE=4096\r\n") == ["250 2.1.0 Ok"]


def message_of(size: int) -> bytes:
    """A message of exactly `size` bytes as sent after DATA (CRLFs counted, no dot)."""
    head = b"Subject: size\r\n\r\n"
    filler = size - len(head) - 2
    lines = [b"x" * 78 for _ in range(filler // 80)]
    rest = filler - 80 * len(lines)
    return head + b"".join(line + b"\r\n" for line in lines) + b"y" * rest + b"\r\n"


def test_a_client_lying_about_size_gets_552_after_the_data(relay: RelayProcess, sink: Sink):
    with session(relay) as raw:
        raw.chat(b"MAIL FROM:<a@example.test> SIZE=100\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n", 3)
        assert raw.chat(message_of(4097) + b".\r\n") == [
            "552 5.3.4 Message size exceeds fixed limit"
        ]
        raw.chat(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n", 3)
        assert raw.chat(message_of(4096) + b".\r\n")[0].startswith("250 2.0.0 Ok: queued")
    [got] = sink.wait_messages(1)
    assert got.data.endswith(message_of(4096))


def test_recipients_over_the_limit_get_452_and_the_rest_is_delivered(
    relay: RelayProcess, sink: Sink
):
    with session(relay) as raw:
        raw.chat(b"MAIL FROM:<a@example.test>\r\n")
        said = raw.chat(b"".join(b"RCPT TO:<r%d@dest.test>\r\n" % i for i in range(6)), 6)
        assert said == ["250 2.1.5 Ok"] * 3 + ["452 4.5.3 Error: too many recipients"] * 3
        # 452 is flow control, not an error: six of them do not end the session (max 5).
        raw.chat(b"DATA\r\n")
        assert raw.chat(BODY + b".\r\n")[0].startswith("250 2.0.0")
    [got] = sink.wait_messages(1)
    assert got.recipients == ["r0@dest.test", "r1@dest.test", "r2@dest.test"]


def test_text_lines_longer_than_rfc_5321_allows_are_refused(relay: RelayProcess, sink: Sink):
    with session(relay) as raw:
        raw.chat(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n", 3)
        assert raw.chat(b"Subject: long\r\n\r\n" + b"z" * 999 + b"\r\n.\r\n") == [
            "500 5.5.2 Error: line too long"
        ]
        raw.chat(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n", 3)
        assert raw.chat(b"Subject: long\r\n\r\n" + b"z" * 998 + b"\r\n.\r\n")[0].startswith("250")
    [got] = sink.wait_messages(1)
    assert b"z" * 998 + b"\r\n" in got.data


def test_command_lines_longer_than_512_octets_are_refused(relay: RelayProcess, sink: Sink):
    with session(relay) as raw:
        assert raw.chat(b"NOOP " + b"n" * 505 + b"\r\n") == ["250 2.0.0 Ok"]  # 512 with CRLF
        assert raw.chat(b"NOOP " + b"n" * 506 + b"\r\n") == ["500 5.5.2 Error: line too long"]
        assert raw.chat(b"NOOP " + b"n" * 5000 + b"\r\n") == ["500 5.5.2 Error: line too long"]
        assert raw.chat(b"NOOP\r\n") == ["250 2.0.0 Ok"]


def test_too_many_errors_end_the_session_with_421(relay: RelayProcess, sink: Sink):
    with session(relay) as raw:
        said = raw.chat(b"RCPT TO:<b@dest.test>\r\n" * 6, 6)
        assert said == ["503 5.5.1 Error: need MAIL command"] * 5 + [
            "421 4.7.0 Too many errors, closing connection"
        ]
        assert raw.closed()


def test_bdat_hangs_up_before_its_chunk_can_be_read_as_commands(
    relay: RelayProcess, sink: Sink
):
    with session(relay) as raw:
        raw.chat(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@dest.test>\r\n", 2)
        chunk = b"RSET\r\nMAIL FROM:<x@evil.test>\r\n"
        said = raw.chat(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        assert said == ["421 4.5.0 BDAT not supported, closing connection"]
        assert raw.closed()


def test_http_request_to_the_smtp_port_is_hung_up_on(relay: RelayProcess, sink: Sink):
    with RawSMTP(relay.port) as raw:
        raw.reply()
        assert raw.chat(b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n") == [
            "502 5.5.1 Error: this is an SMTP server, closing connection"
        ]
        assert raw.closed()


def test_a_message_that_looped_too_often_is_refused(relay: RelayProcess, sink: Sink):
    hops = b"".join(b"Received: from hop%d.test by hop%d.test; today\r\n" % (i, i)
                    for i in range(5))
    with session(relay) as raw:
        raw.chat(ENVELOPE, 3)
        assert raw.chat(hops + BODY + b".\r\n") == ["554 5.4.0 Error: too many hops"]


def test_an_oversized_header_is_refused(relay: RelayProcess, sink: Sink):
    with session(relay) as raw:
        raw.chat(ENVELOPE, 3)
        header = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 60) for i in range(20))
        assert raw.chat(header + BODY + b".\r\n") == [
            "552 5.3.4 Message header size exceeds limit"
        ]


def test_authentication_results_claiming_our_name_are_removed(relay: RelayProcess, sink: Sink):
    forged = (b"Authentication-Results: relay.test; spf=pass smtp.mailfrom=ceo@bank.test\r\n"
              b"Authentication-Results: (fake) RELAY.TEST;\r\n dkim=pass header.d=bank.test\r\n")
    theirs = b"Authentication-Results: mx.example.test; spf=fail\r\n"
    with session(relay) as raw:
        raw.chat(ENVELOPE, 3)
        assert raw.chat(forged + theirs + BODY + b".\r\n")[0].startswith("250 2.0.0")
    [got] = sink.wait_messages(1)
    # Only our own header (the shipped policy records the DKIM result) and theirs remain.
    assert got.data.lower().count(b"relay.test;") == 1
    assert b"Authentication-Results: relay.test;\r\n\tdkim=none\r\n" in got.data
    assert b"bank.test" not in got.data
    assert got.data.count(b"Authentication-Results:") == 2
    assert got.data.endswith(theirs + BODY)
