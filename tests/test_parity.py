"""Parity: `policy-relay test --json` (the dry run) says exactly what the live relay answers.

Every case of CASES runs twice against one relay process and one policies directory:

(a) `python -m relay test --json ...`, which lists the SMTP steps of the session it
    simulates, each with the reply it predicts;
(b) a live SMTP session against the running relay (with a real aiosmtpd upstream, a real
    dnsmasq for SPF and DKIM), replaying exactly the commands the dry run listed, one at a
    time.

The reply code and the enhanced status code must be identical at every step. Each case
also states the outcome it expects (the action, the last reply, the RCPT replies), so that
both sides being wrong the same way is caught too.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import ssl
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dkim as dkimpy
import pytest
import trustme
from conftest import (
    ROOT,
    RelayProcess,
    Sink,
    free_port,
    port_open,
    relay_config,
    run_cli,
    wait_until,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dnsserver import DnsServer, split_txt, start_dnsmasq
from smtpraw import RawSMTP

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/dnsmasq").exists(),
                                reason="dnsmasq is not installed")

PASSWORD = "parity horse battery"
USERS = ("alice", "mallory")
# Every read of a reply is bounded by this (an SPF or DKIM temperror waits out the DNS
# timeout of 1 s, well below it).
READ_TIMEOUT = 20.0
MAX_MESSAGE_SIZE = 4096
STATUS = re.compile(r"^(\d{3})[ -](?:([245]\.\d{1,3}\.\d{1,3}) )?")

# -- the policy under test ------------------------------------------------------------------
#
# One directory, read by the live relay and the dry run alike. Rules that only some cases
# should reach are scoped with a sender domain of their own, so that no case trips another's
# rule (and no case charges another's rate-limit bucket).

POLICY = r"""
[defaults]
final_action  = "reject"
final_message = "554 5.7.1 <{recipient}>: Relay access denied"
delay_reject  = true

[lists]
app_servers     = ["198.51.100.0/24", "2001:db8:feed::/48"]
our_domains     = ["pass.test", "fail.test", "softfail.test", "toomany.test", "tempfail.test"]
blocked_senders = ["blocked@example.test", "file:lists/blocked-senders.txt"]

[maps]
rw_apps = "file:maps/rw-apps.txt"

[limit.rcpt_per_sender]
key   = ["sender"]
count = "recipient"
rate  = "2/1h"
burst = 2

[limit.bytes_per_sender]
key   = ["sender"]
count = "byte"
rate  = "400/1h"
burst = 400

[limit.messages_per_sender]
key   = ["sender"]
count = "message"
rate  = "1/1h"
burst = 1

# --- connect and helo ---------------------------------------------------------------------

[[rule]]
name = "blocked-client"
match.client_address = ["203.0.113.66", "2001:db8:bad::/48"]
action  = "reject"
message = "554 5.7.1 Client {client_address} is blocked"

[[rule]]
name = "bad-helo"
match.helo_name = "bad.example"
action  = "reject"
message = "550 5.7.1 HELO {helo_name} refused"

[[rule]]
name = "probation-helo"
match.helo_name = "*.probation.example"
action  = "tempfail"
message = "450 4.7.1 HELO {helo_name} is on probation"

[[rule]]
name = "lb-only-sender"
match.listener = "smtp"
match.sender_domain = "lb-only.test"
action  = "reject"
message = "550 5.7.1 {sender_domain} must come through the load balancer"

# --- mail -----------------------------------------------------------------------------------

[[rule]]
name = "blocked-sender"
match.sender = "@blocked_senders"
action  = "reject"
message = "550 5.7.1 Sender {sender} is not allowed"

[[rule]]
name = "busy-sender"
match.sender_domain = "busy-sender.test"
action  = "defer"
message = "451 4.7.1 Try again later, {sender_domain}"

[[rule]]
name = "tls-only-sender"
match.sender_domain = "tls-only.test"
match.tls = false
action  = "reject"
message = "550 5.7.10 Mail from {sender_domain} must use TLS"

[[rule]]
name = "mallory"
match.sasl_username = "mallory"
action  = "reject"
message = "550 5.7.1 User {sasl_username} may not send"

[[rule]]
name = "declared-size"
match.sender_domain = "size.test"
match.size = ">1K"
action  = "reject"
message = "552 5.3.4 Messages from {sender_domain} are limited to 1K"

[[rule]]
name = "spf-fail-own-domain"
match.sender_domain = "@our_domains"
match.spf = "fail"
action  = "reject"
message = "550 5.7.23 SPF check failed for {sender_domain}"

[[rule]]
name = "spf-temperror-own-domain"
match.sender_domain = "@our_domains"
match.spf = "temperror"
action  = "tempfail"
message = "451 4.7.24 SPF temporary error for {sender_domain}, try again later"

[[rule]]
name = "spf-other-own-domain"
match.sender_domain = "@our_domains"
match.spf = ["softfail", "neutral", "none", "permerror"]
action     = "log"
log_action = "reject"
message    = "550 5.7.23 SPF {spf} for {sender_domain}"

[[rule]]
name = "message-rate"
match.sender_domain = "msgs.test"
over_limit = "messages_per_sender"
action = "tempfail"

# --- rcpt -----------------------------------------------------------------------------------

[[rule]]
name = "suppressed"
match.suppressed = true
action  = "reject"
message = "550 5.1.1 <{recipient}>: suppressed since {suppressed}"

[[rule]]
name = "unknown-user"
match.recipient = ["nobody@dest.test", "*@gone.dest.test"]
action  = "reject"
message = "550 5.1.1 <{recipient}>: User unknown"

[[rule]]
name = "busy-domain"
match.recipient_domain = "busy.test"
action  = "tempfail"
message = "451 4.7.1 Try {recipient} later"

[[rule]]
name = "recipient-count"
match.sender_domain = "count.test"
match.recipient_count = ">2"
action  = "tempfail"
message = "452 4.5.3 At most 2 recipients from {sender_domain}"

[[rule]]
name = "recipient-rate"
match.sender_domain = "limits.test"
over_limit = "rcpt_per_sender"
action  = "tempfail"
message = "451 4.7.1 Too many recipients from {sender}, retry in {retry_after}s"

[[rule]]
name = "discard-invalid"
match.recipient_domain = ["example.invalid", ".example.invalid"]
action = "discard"

[[rule]]
name = "rollout"
match.recipient = "watched@dest.test"
action     = "log"
log_action = "reject"

# --- data -----------------------------------------------------------------------------------

[[rule]]
name = "spam-subject"
match.header."Subject" = 're:\bviagra\b'
action  = "reject"
message = "550 5.7.1 Message content rejected"

[[rule]]
name = "byte-rate"
match.sender_domain = "bytes.test"
over_limit = "bytes_per_sender"
action  = "defer"
message = "451 4.7.1 Byte quota exceeded for {sender}"

[[rule]]
name = "dkim-broken"
match.dkim = ["fail", "permerror"]
action  = "reject"
message = "550 5.7.20 No valid DKIM signature"

[[rule]]
name = "dkim-temperror"
match.dkim = "temperror"
action  = "tempfail"
message = "451 4.7.1 DKIM key unavailable, try again later"

[[rule]]
name = "dkim-untrusted-signer"
match.dkim_domain = "untrusted.test"
action  = "reject"
message = "550 5.7.1 Signed by {dkim_domain}, not accepted"

[[rule]]
name = "dkim-tag"
match.dkim = "pass"
action = "tag"
add_headers = { "X-Relay-DKIM" = "{dkim} {dkim_domain}" }

[[rule]]
name = "class-tag"
match.header."X-Mailer-Class" = "*"
action = "tag"
add_headers = { "X-Relay-Class" = "{sender_domain} via {listener}" }

[[rule]]
name = "bulk-route"
match.header."List-Unsubscribe" = "*"
action = "route"
route  = "bulk"

[[rule]]
name = "hold-tests"
match.sender_domain = "hold.test"
match.header."Subject" = 're:^\[HOLD\]'
action = "hold"

# --- rewriting (at DATA, after every check; each case a sender domain of its own) ---------

[[rule]]
name = "rw-sender"
match.sender_domain = "app.rw.test"
action = "rewrite_sender"
map = "@rw_apps"

[[rule]]
name = "rw-from"
match.sender_domain = "app.rw.test"
action = "rewrite_header_from"
map = "@rw_apps"
reply_to = "help@rw.test"

[[rule]]
name = "rw-recipients"
match.sender_domain = "app.rw.test"
action = "rewrite_recipient"
map = { "root@app.rw.test" = "ops@rw.test", "@old.rw.test" = "@new.rw.test" }

[[rule]]
name = "rw-archive"
match.sender_domain = ["app.rw.test", "archive.rw.test"]
action = "archive"
archive_to = "archive@rw.test"
archive_route = "bulk"

[[rule]]
name = "rw-strip"
match.sender_domain = "strip.rw.test"
action = "strip"
strip_headers = ["X-Mailer", "re:^X-Internal-"]
strip_received = "internal"

# --- who may relay --------------------------------------------------------------------------

[[rule]]
name = "relay-networks"
match.client_address = "@relay_networks"
action = "accept"

[[rule]]
name = "authenticated"
match.sasl_username = "*"
action = "accept"

[[rule]]
name = "app-servers"
match.client_address = "@app_servers"
unless.sender = "<>"
action = "accept"

[[rule]]
name = "lb-partners"
match.listener = "lb"
match.sender_domain = "partner.test"
action = "accept"
"""

BLOCKED_SENDERS_FILE = "# read through file: in [lists]\nspammer@example.test\n"
RW_APPS_FILE = "# read through file: in [maps]\nwww-data@app.rw.test  noreply@rw.test\n"

# pass.test allows the loopback client, fail.test only 192.0.2.1; names under tempfail.test
# time out (dnsserver.TEMPFAIL_ZONE).
SPF = {
    "pass.test": "v=spf1 ip4:127.0.0.1 -all",
    "fail.test": "v=spf1 ip4:192.0.2.1 -all",
    "softfail.test": "v=spf1 ~all",
    "toomany.test": "v=spf1 " + " ".join(f"include:i{n}.test" for n in range(11)) + " -all",
    **{f"i{n}.test": "v=spf1 ?all" for n in range(11)},
}

# -- messages -------------------------------------------------------------------------------


def mail(sender: str = "app@example.test", subject: str = "parity", body: bytes = b"Hello.\r\n",
         extra: str = "") -> bytes:
    return (f"From: <{sender}>\r\nTo: <b@dest.test>\r\nSubject: {subject}\r\n"
            f"Message-ID: <parity@example.test>\r\nDate: Mon, 30 Nov 2026 00:00:00 +0000\r\n"
            f"{extra}\r\n").encode() + body


def padded(size: int, line: bytes = b"x" * 70) -> bytes:
    """A message of exactly `size` octets, its body made of copies of `line`."""
    head = mail(body=b"")
    body = b""
    while len(head) + len(body) + len(line) + 2 <= size - 10:
        body += line + b"\r\n"
    filler = size - len(head) - len(body) - 2
    return head + body + b"y" * filler + b"\r\n"


def dotted_to(size: int) -> bytes:
    """Exactly `size` octets, but many lines start with a dot: dot-stuffed on the wire it is
    larger. RFC 1870 section 5: the message size does not count the doubled quoting dots;
    section 6.3: no 552 after DATA for a message no larger than its declared SIZE."""
    return padded(size, line=b"." + b"d" * 69)


MESSAGES: dict[str, bytes] = {
    "plain": mail(),
    "utf8": mail(sender="jörg@example.test", subject="Grüße").replace(
        b"Hello.", "Grüße aus Köln.".encode()),
    "spam": mail(subject="Cheap viagra today"),
    "hold": mail(sender="app@hold.test", subject="[HOLD] nightly report"),
    "tagged": mail(extra="X-Mailer-Class: billing\r\n"),
    "newsletter": mail(subject="News", extra="List-Unsubscribe: <mailto:u@example.test>\r\n"),
    "dotted": mail(body=b".leading dot\r\n..two dots\r\n.\r\nend\r\n"),
    "over-1k": padded(1500),
    "at-limit": padded(MAX_MESSAGE_SIZE),
    "over-limit": padded(MAX_MESSAGE_SIZE + 2000),
    "at-limit-dot-stuffed": dotted_to(MAX_MESSAGE_SIZE),
    "bare-lf": mail(body=b"one line\nand a bare LF\r\n"),
    "hops": b"".join(f"Received: by r{n}.test; Mon, 30 Nov 2026 00:00:00 +0000\r\n".encode()
                     for n in range(50)) + mail(),
    "300-bytes": padded(300),
    "400-bytes": padded(400),
    "600-bytes": padded(600),
}


# -- the cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One session. `client` other than 127.0.0.1 is played with a PROXY header on the
    listener "lb"; `message` names an entry of the message table (sent with --message).
    `final` is the expected code and enhanced status of the last step, `rcpt` those of the
    RCPT steps in order, `action` the dry run's action, `rule` its rule (when given)."""

    name: str
    sender: str
    to: tuple[str, ...]
    action: str
    final: str
    rcpt: tuple[str, ...] | None = None
    rule: str | None = None
    client: str = "127.0.0.1"
    listener: str = ""
    helo: str = "app.test"
    auth: str = ""
    tls: bool = False
    smtputf8: bool = False
    message: str = "plain"
    flags: tuple[str, ...] = ()
    # (sender, recipients) of each message stored, archive copies included (rewrite cases).
    stored: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def via(self) -> str:
        return self.listener or ("smtp" if self.client == "127.0.0.1" else "lb")


OK_RCPT = "250 2.1.5"
QUEUED = "250 2.0.0"
DENIED = "554 5.7.1"
LIVE = ("--live-checks",)
ONE = ("b@dest.test",)
SUPPRESSED = "bounced@dest.test"

CASES: list[Case] = [
    # --- who may relay: client_address, listener, the final action --------------------------
    Case("loopback-accepted", "app@example.test", ONE, "accept", QUEUED, (OK_RCPT,),
         rule="relay-networks"),
    Case("loopback-three-recipients", "app@example.test",
         ("a@dest.test", "b@dest.test", "c@other.test"), "accept", QUEUED, (OK_RCPT,) * 3),
    Case("stranger-relay-denied", "app@example.test", ONE, "reject", DENIED, (DENIED,),
         rule="final_action", client="203.0.113.9"),
    Case("stranger-ipv6-relay-denied", "app@example.test", ONE, "reject", DENIED, (DENIED,),
         client="2001:db8:99::1"),
    Case("stranger-two-recipients-both-denied", "app@example.test",
         ("a@dest.test", "b@dest.test"), "reject", DENIED, (DENIED, DENIED),
         client="203.0.113.9"),
    Case("proxied-relay-network-accepted", "app@example.test", ONE, "accept", QUEUED,
         (OK_RCPT,), rule="relay-networks", client="192.0.2.10"),
    Case("loopback-through-the-proxy-listener", "app@example.test", ONE, "accept", QUEUED,
         (OK_RCPT,), listener="lb"),
    Case("app-server-ipv4-accepted", "app@example.test", ONE, "accept", QUEUED, (OK_RCPT,),
         rule="app-servers", client="198.51.100.7"),
    Case("app-server-ipv6-accepted", "app@example.test", ONE, "accept", QUEUED, (OK_RCPT,),
         rule="app-servers", client="2001:db8:feed::7"),
    Case("app-server-null-sender-refused-by-unless", "<>", ONE, "reject", DENIED, (DENIED,),
         rule="final_action", client="198.51.100.7"),
    Case("blocked-client-refused-at-rcpt", "app@example.test", ("a@dest.test", "b@dest.test"),
         "reject", "554 5.7.1", ("554 5.7.1", "554 5.7.1"), rule="blocked-client",
         client="203.0.113.66"),
    Case("blocked-ipv6-network-refused-at-rcpt", "app@example.test", ONE, "reject",
         "554 5.7.1", ("554 5.7.1",), rule="blocked-client", client="2001:db8:bad::25"),
    Case("ipv4-mapped-ipv6-client-is-the-ipv4-client", "app@example.test", ONE, "reject",
         "554 5.7.1", ("554 5.7.1",), rule="blocked-client", client="::ffff:203.0.113.66"),
    Case("listener-smtp-refuses-lb-only-sender", "app@lb-only.test", ONE, "reject",
         "550 5.7.1", ("550 5.7.1",), rule="lb-only-sender"),
    Case("listener-lb-takes-lb-only-sender", "app@lb-only.test", ONE, "accept", QUEUED,
         (OK_RCPT,), rule="relay-networks", listener="lb"),
    Case("listener-lb-partner-stranger-accepted", "app@partner.test", ONE, "accept", QUEUED,
         (OK_RCPT,), rule="lb-partners", client="203.0.113.20"),
    # --- helo_name (delay_reject: answered at the first RCPT) -------------------------------
    Case("helo-bad-example-refused-at-rcpt", "app@example.test", ONE, "reject", "550 5.7.1",
         ("550 5.7.1",), rule="bad-helo", helo="bad.example"),
    Case("helo-bad-example-any-case", "app@example.test", ("a@dest.test", "b@dest.test"),
         "reject", "550 5.7.1", ("550 5.7.1", "550 5.7.1"), rule="bad-helo",
         helo="BAD.Example"),
    Case("helo-bad-example-from-stranger", "app@example.test", ONE, "reject", "550 5.7.1",
         ("550 5.7.1",), rule="bad-helo", client="203.0.113.9", helo="bad.example"),
    Case("helo-probation-deferred", "app@example.test", ONE, "tempfail", "450 4.7.1",
         ("450 4.7.1",), rule="probation-helo", helo="web1.probation.example"),
    Case("helo-near-miss-accepted", "app@example.test", ONE, "accept", QUEUED, (OK_RCPT,),
         helo="bad.example.net"),
    Case("helo-bad-example-after-starttls", "app@example.test", ONE, "reject", "550 5.7.1",
         ("550 5.7.1",), rule="bad-helo", helo="bad.example", tls=True),
    # --- sender, sender_domain, tls, sasl_username, size ------------------------------------
    Case("blocked-sender-refused-at-rcpt", "blocked@example.test", ONE, "reject", "550 5.7.1",
         ("550 5.7.1",), rule="blocked-sender"),
    Case("blocked-sender-from-list-file", "Spammer@Example.TEST", ONE, "reject", "550 5.7.1",
         ("550 5.7.1",), rule="blocked-sender"),
    Case("sender-domain-deferred", "app@busy-sender.test", ONE, "tempfail", "451 4.7.1",
         ("451 4.7.1",), rule="busy-sender"),
    Case("sender-domain-any-case", "App@BUSY-SENDER.Test", ONE, "tempfail", "451 4.7.1",
         ("451 4.7.1",), rule="busy-sender"),
    Case("tls-only-sender-without-tls", "app@tls-only.test", ONE, "reject", "550 5.7.10",
         ("550 5.7.10",), rule="tls-only-sender"),
    Case("tls-only-sender-after-starttls", "app@tls-only.test", ONE, "accept", QUEUED,
         (OK_RCPT,), rule="relay-networks", tls=True),
    Case("starttls-through-the-proxy", "app@example.test", ONE, "accept", QUEUED, (OK_RCPT,),
         client="192.0.2.11", tls=True),
    Case("auth-stranger-accepted", "app@example.test", ONE, "accept", QUEUED, (OK_RCPT,),
         rule="authenticated", client="203.0.113.10", auth="alice"),
    Case("auth-after-starttls-accepted", "app@example.test", ONE, "accept", QUEUED,
         (OK_RCPT,), rule="authenticated", client="203.0.113.10", auth="alice", tls=True),
    Case("auth-mallory-refused", "app@example.test", ONE, "reject", "550 5.7.1",
         ("550 5.7.1",), rule="mallory", client="203.0.113.10", auth="mallory"),
    Case("auth-on-loopback-accepted", "app@example.test", ONE, "accept", QUEUED, (OK_RCPT,),
         auth="alice"),
    Case("declared-size-over-rule-refused-at-rcpt", "app@size.test", ONE, "reject",
         "552 5.3.4", ("552 5.3.4",), rule="declared-size", message="over-1k"),
    Case("declared-size-under-rule-accepted", "app@size.test", ONE, "accept", QUEUED,
         (OK_RCPT,)),
    Case("null-sender-from-loopback", "<>", ("a@dest.test", "b@dest.test"), "accept", QUEUED,
         (OK_RCPT, OK_RCPT), rule="relay-networks"),
    # --- addresses the strict checks refuse -------------------------------------------------
    Case("sender-root-without-domain", "root", ONE, "reject", "501 5.1.7"),
    Case("rcpt-root-without-domain", "app@example.test", ("root",), "reject", "501 5.1.3",
         ("501 5.1.3",)),
    Case("rcpt-quoted-local-part", "app@example.test", ('"quoted"@example.org',), "reject",
         "501 5.1.3", ("501 5.1.3",)),
    Case("sender-quoted-local-part", '"u@victim.example"@example.org', ONE, "reject",
         "501 5.1.7"),
    Case("rcpt-percent-hack", "app@example.test", ("user%host@example.org",), "reject",
         "501 5.1.3", ("501 5.1.3",)),
    Case("rcpt-bang-path", "app@example.test", ("host!user@example.org",), "reject",
         "501 5.1.3", ("501 5.1.3",)),
    Case("rcpt-source-route", "app@example.test", ("@a.example,@b.example:u@example.org",),
         "reject", "501 5.1.3", ("501 5.1.3",)),
    Case("sender-source-route", "@a.example:app@example.test", ONE, "reject", "501 5.1.7"),
    Case("rcpt-address-literal", "app@example.test", ("u@[192.0.2.1]",), "reject",
         "501 5.1.3", ("501 5.1.3",)),
    Case("rcpt-numeric-tld", "app@example.test", ("u@10.0.0.1",), "reject", "501 5.1.3",
         ("501 5.1.3",)),
    Case("rcpt-unqualified-domain", "app@example.test", ("u@localhost",), "reject",
         "501 5.1.3", ("501 5.1.3",)),
    Case("sender-domain-with-trailing-dot", "app@example.test.", ONE, "reject", "501 5.1.7"),
    Case("rcpt-local-part-65-octets", "app@example.test", ("a" * 65 + "@example.org",),
         "reject", "501 5.1.3", ("501 5.1.3",)),
    Case("rcpt-path-over-254-octets", "app@example.test",
         ("u@" + ".".join(["d" * 50] * 5) + ".example",), "reject", "501 5.1.3",
         ("501 5.1.3",)),
    Case("rcpt-domain-label-of-64-octets", "app@example.test", ("u@" + "d" * 64 + ".example",),
         "reject", "501 5.1.3", ("501 5.1.3",)),
    Case("rcpt-space-inside-the-brackets", "app@example.test", ("a b@example.org",),
         "reject", "501 5.1.3", ("501 5.1.3",)),
    Case("rcpt-local-part-64-octets-accepted", "app@example.test", ("a" * 64 + "@example.org",),
         "accept", QUEUED, (OK_RCPT,)),
    Case("rcpt-non-ascii-without-smtputf8", "app@example.test", ("jörg@dest.test",),
         "reject", "553 5.6.7", ("553 5.6.7",)),
    Case("sender-non-ascii-without-smtputf8", "jörg@example.test", ONE, "reject",
         "553 5.6.7"),
    Case("non-ascii-with-smtputf8-accepted", "jörg@example.test", ("zoë@dest.test",),
         "accept", QUEUED, (OK_RCPT,), smtputf8=True, message="utf8"),
    Case("idn-domain-with-smtputf8-accepted", "app@example.test", ("user@bücher.example",),
         "accept", QUEUED, (OK_RCPT,), smtputf8=True),
    Case("idn-domain-without-smtputf8", "app@example.test", ("user@bücher.example",),
         "reject", "553 5.6.7", ("553 5.6.7",)),
    Case("mixed-accepted-and-refused-recipients", "app@example.test",
         ("ok@dest.test", "nobody@dest.test", "x@busy.test", "root", "ok2@dest.test"),
         "accept", QUEUED, (OK_RCPT, "550 5.1.1", "451 4.7.1", "501 5.1.3", OK_RCPT)),
    # --- recipient, recipient_domain, recipient_count, max_recipients -----------------------
    # --- suppressed: the live relay and --live-checks read the same suppression.db ---------
    Case("suppressed-recipient-refused-at-rcpt", "app@example.test", (SUPPRESSED,),
         "reject", "550 5.1.1", ("550 5.1.1",), rule="suppressed", flags=LIVE),
    Case("suppressed-recipient-any-case", "app@example.test", (SUPPRESSED.upper(),),
         "reject", "550 5.1.1", ("550 5.1.1",), rule="suppressed", flags=LIVE),
    Case("suppressed-refused-for-a-stranger-too", "app@example.test", (SUPPRESSED,),
         "reject", "550 5.1.1", ("550 5.1.1",), rule="suppressed", client="203.0.113.9",
         flags=LIVE),
    Case("suppressed-one-of-two-recipients", "app@example.test", ("a@dest.test", SUPPRESSED),
         "accept", QUEUED, (OK_RCPT, "550 5.1.1"), rule="relay-networks", flags=LIVE),
    Case("suppressed-given-on-the-command-line", "app@example.test", (SUPPRESSED,),
         "reject", "550 5.1.1", ("550 5.1.1",), rule="suppressed",
         flags=("--suppressed", SUPPRESSED)),
    Case("unsuppressed-recipient-accepted", "app@example.test", ("kept@dest.test",),
         "accept", QUEUED, (OK_RCPT,), rule="relay-networks", flags=LIVE),
    Case("rcpt-unknown-user", "app@example.test", ("nobody@dest.test",), "reject",
         "550 5.1.1", ("550 5.1.1",), rule="unknown-user"),
    Case("rcpt-glob-unknown-user", "app@example.test", ("Someone@GONE.dest.test",), "reject",
         "550 5.1.1", ("550 5.1.1",), rule="unknown-user"),
    Case("rcpt-domain-tempfail", "app@example.test", ("x@busy.test",), "tempfail",
         "451 4.7.1", ("451 4.7.1",), rule="busy-domain"),
    Case("recipient-count-rule-refuses-the-third", "app@count.test",
         ("a@dest.test", "b@dest.test", "c@dest.test"), "accept", QUEUED,
         (OK_RCPT, OK_RCPT, "452 4.5.3")),
    Case("recipient-count-counts-only-accepted-recipients", "app@count.test",
         ("a@dest.test", "root", "b@dest.test", "nobody@dest.test", "c@dest.test"), "accept",
         QUEUED, (OK_RCPT, "501 5.1.3", OK_RCPT, "550 5.1.1", "452 4.5.3")),
    Case("max-recipients-3-refuses-the-fourth", "app@example.test",
         ("a@dest.test", "b@dest.test", "c@dest.test", "d@dest.test"), "accept", QUEUED,
         (OK_RCPT, OK_RCPT, OK_RCPT, "452 4.5.3")),
    Case("max-recipients-counts-only-accepted-recipients", "app@example.test",
         ("a@dest.test", "nobody@dest.test", "b@dest.test", "c@dest.test", "d@dest.test"),
         "accept", QUEUED, (OK_RCPT, "550 5.1.1", OK_RCPT, OK_RCPT, "452 4.5.3")),
    Case("discard-recipient-domain", "app@example.test", ("x@example.invalid",), "discard",
         QUEUED, (OK_RCPT,), rule="discard-invalid"),
    Case("discard-recipient-subdomain", "app@example.test", ("x@a.example.invalid",),
         "discard", QUEUED, (OK_RCPT,), rule="discard-invalid"),
    Case("discard-wins-for-a-mixed-message", "app@example.test",
         ("b@dest.test", "x@example.invalid"), "discard", QUEUED, (OK_RCPT, OK_RCPT),
         rule="discard-invalid"),
    Case("discard-rule-answers-a-stranger-too", "app@example.test", ("x@example.invalid",),
         "discard", QUEUED, (OK_RCPT,), rule="discard-invalid", client="203.0.113.9"),
    Case("log-rule-changes-nothing", "app@example.test", ("watched@dest.test",), "accept",
         QUEUED, (OK_RCPT,), rule="relay-networks"),
    # --- header."Name", tag, route, hold ----------------------------------------------------
    Case("header-subject-rejected-at-data", "app@example.test", ONE, "reject", "550 5.7.1",
         (OK_RCPT,), rule="spam-subject", message="spam"),
    Case("header-rule-after-relay-denied", "app@example.test", ONE, "reject", DENIED,
         (DENIED,), client="203.0.113.9", message="spam"),
    Case("header-hold", "app@hold.test", ONE, "hold", QUEUED, (OK_RCPT,), rule="hold-tests",
         message="hold"),
    Case("hold-sender-without-hold-subject", "app@hold.test", ONE, "accept", QUEUED,
         (OK_RCPT,), rule="relay-networks"),
    Case("pending-hold-rule-delays-relay-denial-to-data", "app@hold.test", ONE, "reject",
         DENIED, (OK_RCPT,), rule="final_action", client="203.0.113.9"),
    Case("pending-hold-rule-holds-a-strangers-message", "app@hold.test", ONE, "hold", QUEUED,
         (OK_RCPT,), rule="hold-tests", client="203.0.113.9", message="hold"),
    Case("header-tag", "app@example.test", ONE, "accept", QUEUED, (OK_RCPT,),
         rule="relay-networks", message="tagged"),
    Case("header-route-to-bulk", "app@example.test", ONE, "accept", QUEUED, (OK_RCPT,),
         rule="relay-networks", message="newsletter"),
    Case("dot-stuffed-lines-accepted", "app@example.test", ONE, "accept", QUEUED, (OK_RCPT,),
         message="dotted"),
    # --- max_message_size and the data checks -----------------------------------------------
    Case("declared-size-over-max-message-size", "app@example.test", ONE, "reject",
         "552 5.3.4", message="over-limit"),
    Case("message-exactly-max-message-size", "app@example.test", ONE, "accept", QUEUED,
         (OK_RCPT,), message="at-limit"),
    Case("message-at-max-size-before-dot-stuffing", "app@example.test", ONE, "accept",
         QUEUED, (OK_RCPT,), message="at-limit-dot-stuffed"),
    Case("message-with-bare-lf-refused", "app@example.test", ONE, "reject", "550 5.5.2",
         (OK_RCPT,), message="bare-lf"),
    Case("message-with-50-received-refused", "app@example.test", ONE, "reject", "554 5.4.0",
         (OK_RCPT,), message="hops"),
    # --- spf (real lookups on both sides) ---------------------------------------------------
    Case("spf-pass-accepted", "app@pass.test", ONE, "accept", QUEUED, (OK_RCPT,),
         rule="relay-networks", flags=LIVE),
    Case("spf-fail-refused-at-rcpt", "app@fail.test", ONE, "reject", "550 5.7.23",
         ("550 5.7.23",), rule="spf-fail-own-domain", flags=LIVE),
    Case("spf-temperror-deferred", "app@tempfail.test", ONE, "tempfail", "451 4.7.24",
         ("451 4.7.24",), rule="spf-temperror-own-domain", flags=LIVE),
    Case("spf-softfail-only-logged", "app@softfail.test", ONE, "accept", QUEUED, (OK_RCPT,),
         rule="relay-networks", flags=LIVE),
    Case("spf-permerror-only-logged", "app@toomany.test", ONE, "accept", QUEUED, (OK_RCPT,),
         rule="relay-networks", flags=LIVE),
    Case("spf-pass-for-the-allowed-proxied-client", "app@fail.test", ONE, "accept", QUEUED,
         (OK_RCPT,), client="192.0.2.1", flags=LIVE),
    Case("spf-fail-for-another-proxied-client", "app@pass.test", ONE, "reject", "550 5.7.23",
         ("550 5.7.23",), rule="spf-fail-own-domain", client="192.0.2.50", flags=LIVE),
    Case("spf-given-on-the-command-line", "app@pass.test", ONE, "accept", QUEUED, (OK_RCPT,),
         flags=("--spf", "pass")),
    Case("spf-fail-given-on-the-command-line", "app@fail.test", ONE, "reject", "550 5.7.23",
         ("550 5.7.23",), rule="spf-fail-own-domain", flags=("--spf", "fail")),
    # --- dkim, dkim_domain (real lookups on both sides) -------------------------------------
    Case("dkim-pass-tagged", "app@signed.test", ONE, "accept", QUEUED, (OK_RCPT,),
         rule="relay-networks", message="dkim-valid", flags=LIVE),
    Case("dkim-fail-body-changed", "app@signed.test", ONE, "reject", "550 5.7.20",
         (OK_RCPT,), rule="dkim-broken", message="dkim-body-changed", flags=LIVE),
    Case("dkim-permerror-key-missing", "app@signed.test", ONE, "reject", "550 5.7.20",
         (OK_RCPT,), rule="dkim-broken", message="dkim-key-missing", flags=LIVE),
    Case("dkim-temperror-key-lookup-times-out", "app@signed.test", ONE, "tempfail",
         "451 4.7.1", (OK_RCPT,), rule="dkim-temperror", message="dkim-key-times-out",
         flags=LIVE),
    Case("dkim-domain-untrusted-signer", "app@untrusted.test", ONE, "reject", "550 5.7.1",
         (OK_RCPT,), rule="dkim-untrusted-signer", message="dkim-untrusted", flags=LIVE),
    Case("dkim-none-given-on-the-command-line", "app@example.test", ONE, "accept", QUEUED,
         (OK_RCPT,), flags=("--dkim", "none")),
    Case("dkim-pass-given-on-the-command-line", "app@signed.test", ONE, "accept", QUEUED,
         (OK_RCPT,), message="dkim-valid", flags=("--dkim", "pass")),
    # --- over_limit (in-memory buckets, each case its own sender and so its own bucket) -----
    Case("recipient-limit-refuses-the-third", "rcpt-over@limits.test",
         ("a@dest.test", "b@dest.test", "c@dest.test"), "accept", QUEUED,
         (OK_RCPT, OK_RCPT, "451 4.7.1"), flags=LIVE),
    Case("recipient-limit-not-reached", "rcpt-under@limits.test",
         ("a@dest.test", "b@dest.test"), "accept", QUEUED, (OK_RCPT, OK_RCPT), flags=LIVE),
    Case("recipient-limit-charges-only-recipients-that-reach-it", "skip@limits.test",
         ("a@dest.test", "nobody@dest.test", "root", "b@dest.test", "c@dest.test"), "accept",
         QUEUED, (OK_RCPT, "550 5.1.1", "501 5.1.3", OK_RCPT, "451 4.7.1"), flags=LIVE),
    Case("byte-limit-refuses-a-large-message", "big@bytes.test", ONE, "tempfail",
         "451 4.7.1", (OK_RCPT,), rule="byte-rate", message="600-bytes", flags=LIVE),
    Case("byte-limit-passes-a-small-message", "small@bytes.test", ONE, "accept", QUEUED,
         (OK_RCPT,), message="300-bytes", flags=LIVE),
    Case("byte-limit-passes-exactly-the-burst", "exact@bytes.test", ONE, "accept", QUEUED,
         (OK_RCPT,), message="400-bytes", flags=LIVE),
    Case("message-limit-charged-once-per-message", "once@msgs.test",
         ("a@dest.test", "b@dest.test", "c@dest.test"), "accept", QUEUED, (OK_RCPT,) * 3,
         flags=LIVE),
]


# -- the relay, its upstream, DNS, keys, certificates ----------------------------------------


@dataclass
class Parity:
    relay: RelayProcess
    ports: dict[str, int]
    messages: dict[str, Path]
    tls: ssl.SSLContext
    sink: Sink

    def message(self, name: str) -> bytes:
        return self.messages[name].read_bytes()


def rsa_key() -> tuple[bytes, str]:
    """A private key (PKCS#1 PEM, as dkimpy wants it) and its DKIM TXT record."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()


def signed(message: bytes, domain: str, selector: str, pem: bytes) -> bytes:
    header = dkimpy.sign(message, selector.encode(), domain.encode(), pem,
                         canonicalize=(b"relaxed", b"relaxed"),
                         include_headers=[b"from", b"to", b"subject"])
    return bytes(header) + message


def dkim_messages() -> tuple[dict[str, bytes], dict[str, tuple[str, ...]]]:
    """The signed messages and the DNS records of the keys that are published."""
    signer, untrusted, unpublished, slow = (rsa_key() for _ in range(4))
    records = {"sel1._domainkey.signed.test": split_txt(signer[1]),
               "sel1._domainkey.untrusted.test": split_txt(untrusted[1])}
    base = mail(sender="app@signed.test", subject="signed")
    valid = signed(base, "signed.test", "sel1", signer[0])
    messages = {
        "dkim-valid": valid,
        "dkim-body-changed": valid.replace(b"Hello.", b"Jello."),
        "dkim-key-missing": signed(base, "signed.test", "gone", unpublished[0]),
        "dkim-key-times-out": signed(base, "tempfail.test", "s1", slow[0]),
        "dkim-untrusted": signed(mail(sender="app@untrusted.test"), "untrusted.test", "sel1",
                                 untrusted[0]),
    }
    return messages, records


def passwd(users_file: Path, user: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay", "passwd", "--file", str(users_file), user],
        input=PASSWORD + "\n", capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def config_text(directory: Path, sink: Sink, dns: DnsServer, ports: dict[str, int]) -> str:
    policies = directory / "policies"
    server = (f'policies_dir = "{policies}"\n'
              'relay_networks = ["127.0.0.0/8", "::1/128", "192.0.2.0/24"]\n'
              f"max_recipients = 3\nmax_message_size = {MAX_MESSAGE_SIZE}\n")
    text = relay_config(sink.port, ports["smtp"], directory / "spool", server,
                        upstream_extra=f'\n[upstream.bulk]\nhosts = ["127.0.0.1:{sink.port}"]\n')
    # Both listeners offer STARTTLS and AUTH (in plaintext to loopback peers too); "lb"
    # takes a PROXY header from loopback, so a case can play any client address there.
    common = (f'tls = "starttls"\ntls_cert = "{directory}/cert.pem"\n'
              f'tls_key = "{directory}/key.pem"\nauth = "optional"\n'
              f'users_file = "{directory}/users"\nauth_plaintext_loopback = true\n')
    smtp_address = f'address = "127.0.0.1:{ports["smtp"]}"\n'
    assert smtp_address in text
    text = text.replace(smtp_address, smtp_address + common)
    text += (f'\n[listener.lb]\naddress = "127.0.0.1:{ports["lb"]}"\n{common}'
             "proxy_protocol = true\n")
    text += (f'\n[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\ntimeout = "1s"\nattempts = 1\n'
             '\n[spf]\ntimeout = "3s"\n')
    return text


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parity]:
    directory: Path = tmp_path_factory.mktemp("parity")
    signed_messages, key_records = dkim_messages()
    messages_dir = directory / "messages"
    messages_dir.mkdir()
    files = {}
    for name, data in {**MESSAGES, **REWRITE_MESSAGES, **signed_messages}.items():
        files[name] = messages_dir / f"{name}.eml"
        files[name].write_bytes(data)

    policies = directory / "policies"
    (policies / "lists").mkdir(parents=True)
    (policies / "10-parity.toml").write_text(POLICY)
    (policies / "lists" / "blocked-senders.txt").write_text(BLOCKED_SENDERS_FILE)
    (policies / "maps").mkdir()
    (policies / "maps" / "rw-apps.txt").write_text(RW_APPS_FILE)
    for user in USERS:
        passwd(directory / "users", user)
    ca = trustme.CA()
    leaf = ca.issue_cert("relay.test", "127.0.0.1")
    leaf.private_key_pem.write_to_path(str(directory / "key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    context = ssl.create_default_context()
    ca.configure_trust(context)

    with contextlib.ExitStack() as stack:
        dns = start_dnsmasq({**SPF, **key_records})
        stack.callback(dns.stop)
        sink = Sink(utf8=True)
        sink.start()
        stack.callback(sink.stop)
        ports = {"smtp": free_port(), "lb": free_port()}
        relay = RelayProcess(directory, config_text(directory, sink, dns, ports), ports["smtp"])
        added = run_cli("suppress", "add", SUPPRESSED, "--config", str(relay.config))
        assert added.returncode == 0, added.stderr
        stack.callback(relay.stop)
        relay.start()
        wait_until(lambda: port_open(ports["lb"]), 10, "the lb listener")
        yield Parity(relay, ports, files, context, sink)


# -- the two sides --------------------------------------------------------------------------


def status(reply: str) -> str:
    """ "NNN X.Y.Z" (or "NNN") of the last line of a reply; the reply itself if it is none."""
    last = reply.rsplit("\n", 1)[-1]
    match = STATUS.match(last)
    if match is None:
        return last
    code, enhanced = match.groups()
    return f"{code} {enhanced}" if enhanced else code


def dry_run(env: Parity, case: Case) -> dict[str, object]:
    args = ["test", "--config", str(env.relay.config), "--json",
            "--client-address", case.client, "--helo", case.helo, "--listener", case.via,
            "--from", case.sender]
    for recipient in case.to:
        args += ["--to", recipient]
    if case.auth:
        args += ["--auth-user", case.auth]
    if case.tls:
        args.append("--tls")
    if case.smtputf8:
        args.append("--smtputf8")
    args += ["--message", str(env.messages[case.message]), *case.flags]
    result = run_cli(*args)
    try:
        report = json.loads(result.stdout)
    except ValueError:
        pytest.fail(f"the dry run printed no JSON object (exit {result.returncode}):\n"
                    f"$ policy-relay {' '.join(args)}\n{result.stdout}{result.stderr}")
    assert isinstance(report, dict) and isinstance(report.get("steps"), list), report
    assert result.returncode == report.get("exit_status"), (result.returncode, report)
    return report


def dot_stuffed(message: bytes) -> bytes:
    """RFC 5321 section 4.5.2: a dot doubled at the start of each line, then CRLF . CRLF."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line
                        for line in lines) + b".\r\n"


def proxy_header(client: str) -> bytes:
    if ":" in client:
        return f"PROXY TCP6 {client} ::1 40000 25\r\n".encode()
    return f"PROXY TCP4 {client} 127.0.0.1 40000 25\r\n".encode()


def auth_plain(user: str) -> bytes:
    token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
    return f"AUTH PLAIN {token}\r\n".encode()


def live_session(env: Parity, case: Case, commands: list[str]) -> list[str]:
    """Replay `commands` against the relay, one at a time; the reply to each."""
    replies: list[str] = []
    with RawSMTP(env.ports[case.via], timeout=READ_TIMEOUT) as smtp:
        if case.via == "lb":
            smtp.send(proxy_header(case.client))
        for command in commands:
            try:
                if command == ".":
                    smtp.send(dot_stuffed(env.message(case.message)))
                elif command.upper().startswith("AUTH"):
                    smtp.send(auth_plain(case.auth))
                elif command:
                    smtp.send(command.encode("utf-8") + b"\r\n")
                reply = smtp.reply()
                if command.upper() == "STARTTLS" and reply.startswith("220"):
                    smtp.starttls(env.tls)
            except (EOFError, OSError) as exc:
                replies.append(f"(no reply: {exc})")
                break
            replies.append(reply)
        with contextlib.suppress(EOFError, OSError):
            smtp.send(b"QUIT\r\n")
            smtp.reply()
    return replies + ["(not sent: the connection was gone)"] * (len(commands) - len(replies))


# -- the test -------------------------------------------------------------------------------


def test_the_table_is_big_and_covers_every_field_and_action():
    names = [case.name for case in CASES]
    assert len(names) >= 60 and len(set(names)) == len(names)
    rules = tomllib.loads(POLICY)["rule"]
    fields = {"over_limit"} & set().union(*rules)
    for rule in rules:
        for which in ("match", "unless"):
            fields |= {"header" if f == "header" else f for f in rule.get(which, {})}
    assert fields == {"client_address", "listener", "tls", "helo_name", "sasl_username",
                      "sender", "sender_domain", "recipient", "recipient_domain",
                      "recipient_count", "size", "header", "spf", "dkim", "dkim_domain",
                      "over_limit", "suppressed"}
    assert {rule["action"] for rule in rules} == {
        "accept", "reject", "tempfail", "defer", "hold", "discard", "tag", "route", "log",
        "rewrite_sender", "rewrite_recipient", "rewrite_header_from", "archive", "strip"}
    used = {case.message for case in CASES}
    assert set(MESSAGES) <= used


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_dry_run_matches_live(parity: Parity, case: Case):
    report = dry_run(parity, case)
    steps = report["steps"]
    assert isinstance(steps, list) and steps, report
    commands = [str(step["command"]) for step in steps]
    predicted = [str(step["reply"]) for step in steps]
    assert commands[0] == "" and steps[0]["stage"] == "connect", steps
    live = live_session(parity, case, commands)

    transcript = "\n".join(
        f"  {'ok ' if status(p) == status(g) else 'XX '}{c or '(connect)'!r}: "
        f"dry run {p!r} | live {g!r}"
        for c, p, g in zip(commands, predicted, live, strict=True)
    )
    assert [status(p) for p in predicted] == [status(g) for g in live], (
        f"dry run and live relay disagree:\n{transcript}")

    # The expected outcome, so that both sides being wrong alike is caught too.
    rcpt = [status(g) for c, g in zip(commands, live, strict=True)
            if c.upper().startswith("RCPT")]
    assert status(live[-1]) == case.final, transcript
    if case.rcpt is not None:
        assert rcpt == list(case.rcpt), transcript
    assert report["action"] == case.action, report
    if case.rule is not None:
        assert report["rule"] == case.rule, report


# -- rewriting: what the dry run says is stored is what the upstream receives ----------------

REWRITE_MESSAGES: dict[str, bytes] = {
    "rw-app": mail(sender="www-data@app.rw.test", subject="rw-app",
                   extra="X-Mailer: PHP/8.2\r\n"),
    "rw-archive": mail(sender="app@archive.rw.test", subject="rw-archive"),
    "rw-strip": (b"Received: from app1 ([10.1.2.3]) by gw; Mon, 30 Nov 2026 00:00:00 +0000\r\n"
                 + mail(sender="app@strip.rw.test", subject="rw-strip",
                        extra="X-Mailer: PHP/8.2\r\nX-Internal-Host: app1\r\n")),
}

REWRITE_CASES: list[Case] = [
    Case("rewrite-envelope-from-and-archive", "www-data@app.rw.test",
         ("root@app.rw.test", "x@old.rw.test", "b@dest.test"), "accept", QUEUED,
         (OK_RCPT,) * 3, rule="relay-networks", message="rw-app",
         stored=(("noreply@rw.test", ("ops@rw.test", "x@new.rw.test", "b@dest.test")),
                 ("", ("archive@rw.test",)))),
    Case("archive-copy-only", "app@archive.rw.test", ONE, "accept", QUEUED, (OK_RCPT,),
         rule="relay-networks", message="rw-archive",
         stored=(("app@archive.rw.test", ONE), ("", ("archive@rw.test",)))),
    Case("strip-internal-headers", "app@strip.rw.test", ONE, "accept", QUEUED, (OK_RCPT,),
         rule="relay-networks", message="rw-strip", stored=(("app@strip.rw.test", ONE),)),
    Case("rewrite-rules-do-not-open-the-relay", "www-data@app.rw.test", ONE, "reject", DENIED,
         (DENIED,), rule="final_action", client="203.0.113.9", message="rw-app"),
]


@pytest.mark.parametrize("case", REWRITE_CASES, ids=[case.name for case in REWRITE_CASES])
def test_dry_run_rewrites_as_live(parity: Parity, case: Case):
    report = dry_run(parity, case)
    steps = report["steps"]
    assert isinstance(steps, list)
    commands = [str(step["command"]) for step in steps]
    live = live_session(parity, case, commands)
    assert [status(str(step["reply"])) for step in steps] == [status(g) for g in live]
    assert status(live[-1]) == case.final and report["action"] == case.action, live
    assert report["rule"] == case.rule, report

    stored = report["stored"]
    assert isinstance(stored, list)
    assert [(s["sender"], tuple(s["recipients"])) for s in stored] == list(case.stored)
    if case.action != "accept":
        assert stored == [] and report["changes"] == []
        return
    subject = f"Subject: {case.message}\r\n".encode()

    def arrived() -> list[tuple[str, list[str]]]:
        return sorted(("" if m.sender == "<>" else m.sender, m.recipients)
                      for m in list(parity.sink.handler.messages) if subject in m.data)

    wait_until(lambda: len(arrived()) >= len(stored), 20, f"{len(stored)} deliveries")
    assert arrived() == sorted((s["sender"], s["recipients"]) for s in stored)
    changes = report["changes"]
    assert isinstance(changes, list) and changes, report
    log = parity.relay.log_text()
    for change in changes:
        assert f": {change}\n" in log, change
