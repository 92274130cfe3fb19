"""Rewriting over real SMTP: a real relay process, recording upstream sinks, bytes compared.

Each case has a sender domain of its own, so one relay and one policies directory serve
the module without one case's rule touching another's message.
"""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dkim as dkimpy
import pytest
from conftest import Received, RelayProcess, Sink, free_port, relay_config, run_cli, wait_until

from relay.checks.dkim import generate_key

POLICY = r"""
[maps]
apps = { "www-data@app1.internal" = "noreply@example.com", "@app2.internal" = "@example.com" }
people = "file:maps/people.txt"

[limit.rcpt_per_sender]
key   = ["sender"]
count = "recipient"
rate  = "1/1h"
burst = 1

[[rule]]
name = "senders"
match.sender_domain = ["app1.internal", "app2.internal"]
action = "rewrite_sender"
map = "@apps"

[[rule]]
name = "unlucky-pattern"           # "y@bad.test" makes "@example.com": not an address
match.sender_domain = "bad.test"
action = "rewrite_sender"
map = { 're:^(x*)y@bad\.test$' = "$1@example.com" }

[[rule]]
name = "from-masquerade"
match.sender_domain = ["app1.internal", "masq.test"]
action = "rewrite_header_from"
map = "@apps"

[[rule]]
name = "from-with-reply-to"
match.sender_domain = "reply.test"
action = "rewrite_header_from"
map = { "@reply.test" = "shop@example.com" }
reply_to = "support@example.com"

[[rule]]
name = "recipients"
match.sender_domain = ["app1.internal", "rcpt.test"]
action = "rewrite_recipient"
map = "@people"

[[rule]]
name = "archive"
match.sender_domain = ["archived.test", "limited.test", "held.test"]
action = "archive"
archive_to = ["archive@example.com", "vault@example.com"]
archive_sender = "postmaster@example.com"

[[rule]]
name = "journal"
match.sender_domain = "journal.test"
action = "archive"
archive_to = "journal@example.com"
archive_route = "journal"

[[rule]]
name = "hide-internals"
match.sender_domain = "strip.test"
action = "strip"
strip_headers = ["X-Mailer", "X-PHP-Originating-Script", "re:^X-Internal-"]
strip_received = "internal"

[[rule]]
name = "per-sender-recipients"
match.sender_domain = "limited.test"
over_limit = "rcpt_per_sender"
action = "tempfail"

[[rule]]
name = "hold-held"
match.sender_domain = "held.test"
action = "hold"

[[rule]]
name = "relay-networks"
match.client_address = "@relay_networks"
action = "accept"
"""

PEOPLE = "# envelope recipients\nroot@app1.internal  ops@example.com\n"


def message(sender: str, extra: bytes = b"", subject: str = "report") -> bytes:
    return (f"From: App Server <{sender}>\r\n".encode() + b"To: <user@dest.test>\r\n"
            + f"Subject: {subject}\r\n".encode()
            + b"Date: Mon, 30 Nov 2026 00:00:00 +0000\r\n"
            + f"Message-ID: <{subject}@example.test>\r\n".encode() + extra + b"\r\n"
            + b"From: the body is not a header\r\nX-Mailer: nor is this\r\n")


@dataclass
class Env:
    relay: RelayProcess
    sink: Sink
    journal: Sink
    directory: Path
    dkim_txt: str

    def send(self, sender: str, recipients: list[str], data: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", self.relay.port, timeout=30) as client:
            client.sendmail(sender, recipients, data)

    def delivered(self, marker: bytes | str, count: int = 1,
                  sink: Sink | None = None) -> list[Received]:
        """The messages whose bytes hold `marker` (a str: that Subject:), once `count` of
        them arrived."""
        sink = sink or self.sink
        if isinstance(marker, str):
            marker = f"Subject: {marker}\r\n".encode()

        def found() -> list[Received]:
            return [m for m in list(sink.handler.messages) if marker in m.data]

        wait_until(lambda: len(found()) >= count, 20, f"{count} message(s) with {marker!r}")
        return found()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    directory: Path = tmp_path_factory.mktemp("rewrite")
    policies = directory / "policies"
    (policies / "maps").mkdir(parents=True)
    (policies / "10-rewrite.toml").write_text(POLICY)
    (policies / "maps" / "people.txt").write_text(PEOPLE)
    pem, txt = generate_key("ed25519")
    (directory / "keys" / "example.com").mkdir(parents=True)
    (directory / "keys" / "example.com" / "relay.key").write_bytes(pem)
    with contextlib.ExitStack() as stack:
        sink, journal = Sink(), Sink()
        for s in (sink, journal):
            s.start()
            stack.callback(s.stop)
        port = free_port()
        text = relay_config(
            sink.port, port, directory / "spool",
            f'policies_dir = "{policies}"\nrelay_networks = ["127.0.0.0/8"]\n'
            'qualify_domain = "app1.internal"\n',
            upstream_extra=f'\n[upstream.journal]\nhosts = ["127.0.0.1:{journal.port}"]\n',
        ) + f'\n[dkim]\nkey_directory = "{directory / "keys"}"\n'
        relay = RelayProcess(directory, text, port)
        stack.callback(relay.stop)
        relay.start()
        yield Env(relay, sink, journal, directory, txt)


def ours_and_rest(data: bytes) -> tuple[list[bytes], bytes]:
    """The fields the relay put in front (its Received:, then any DKIM-Signature), and the
    message as the relay stored it behind them."""
    fields: list[bytes] = []
    rest = data
    while rest.startswith((b"Received: from", b"DKIM-Signature:")) and (
        not fields or not rest.startswith(b"Received:")
    ):
        end = rest.index(b"\r\n")
        while rest[end + 2 : end + 3] in (b" ", b"\t"):
            end = rest.index(b"\r\n", end + 2)
        fields.append(rest[: end + 2])
        rest = rest[end + 2 :]
    assert fields and b"(policy-relay)" in fields[0], data[:300]
    return fields, rest


def test_sender_and_recipient_rewritten_in_the_envelope_only(env: Env) -> None:
    data = message("cron@app2.internal", subject="envelope-only")
    env.send("cron@app2.internal", ["root@app1.internal"], data)
    # rcpt.test's recipient map does not apply to app2: a sender-only rewrite.
    got, = env.delivered("envelope-only")
    assert (got.sender, got.recipients) == ("cron@example.com", ["root@app1.internal"])
    ours, rest = ours_and_rest(got.data)
    assert rest == data  # the header From: is another action's business
    assert ours[0].count(b"for <root@app1.internal>") == 1


def test_recipient_map_rewrites_envelope_and_our_received_line(env: Env) -> None:
    data = message("app@rcpt.test", subject="rcpt-map")
    env.send("app@rcpt.test", ["root@app1.internal"], data)
    got, = env.delivered("rcpt-map")
    assert (got.sender, got.recipients) == ("app@rcpt.test", ["ops@example.com"])
    ours, rest = ours_and_rest(got.data)
    assert rest == data
    assert b"for <ops@example.com>" in ours[0] and b"root@" not in got.data


def test_from_masquerading_keeps_display_name_and_body_and_is_dkim_signed(env: Env) -> None:
    data = message("www-data@app1.internal", subject="masquerade")
    env.send("www-data@app1.internal", ["user@dest.test"], data)
    got, = env.delivered("masquerade")
    assert got.sender == "noreply@example.com"
    ours, rest = ours_and_rest(got.data)
    assert rest == data.replace(b"From: App Server <www-data@app1.internal>",
                                b"From: App Server <noreply@example.com>", 1)
    # The signing domain followed the new From: domain; an independent verifier agrees.
    assert len(ours) == 2 and b"d=example.com" in ours[1].replace(b"\r\n\t", b"")

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"relay._domainkey.example.com."
        return env.dkim_txt.encode()

    assert dkimpy.verify(got.data, dnsfunc=dns)


def test_reply_to_is_set_when_from_is_rewritten(env: Env) -> None:
    data = message("app@reply.test", b"Reply-To: app@reply.test\r\n", subject="reply-to")
    env.send("app@reply.test", ["user@dest.test"], data)
    got, = env.delivered("reply-to")
    assert got.sender == "app@reply.test"  # From: masquerading leaves the envelope alone
    _, rest = ours_and_rest(got.data)
    assert rest == data.replace(b"<app@reply.test>", b"<shop@example.com>", 1).replace(
        b"Reply-To: app@reply.test", b"Reply-To: support@example.com")


def test_strip_removes_named_fields_and_internal_received_only(env: Env) -> None:
    hops = (b"Received: from app1 (app1.internal [10.1.2.3])\r\n\tby mx.internal; "
            b"Mon, 30 Nov 2026 00:00:00 +0000\r\n"
            b"Received: from gw.example.org ([198.51.100.7]) by mx.example.org; "
            b"Mon, 30 Nov 2026 00:00:00 +0000\r\n")
    internals = (b"X-Mailer: PHP/8.2\r\nX-PHP-Originating-Script: 1000:mail.php\r\n"
                 b"X-Internal-Host: app1\r\n\tcontinued\r\nX-Kept: yes\r\n")
    data = hops + message("app@strip.test", internals, subject="stripped")
    env.send("app@strip.test", ["user@dest.test"], data)
    got, = env.delivered("stripped")
    ours, rest = ours_and_rest(got.data)
    assert rest == hops[hops.index(b"Received: from gw"):] + message(
        "app@strip.test", b"X-Kept: yes\r\n", subject="stripped")
    assert len(ours) == 1 and b"by relay.test (policy-relay)" in ours[0]  # ours is kept


def test_archive_copy_is_delivered_and_never_named_in_headers(env: Env) -> None:
    data = message("app@archived.test", subject="archived")
    env.send("app@archived.test", ["user@dest.test"], data)
    copies = env.delivered("archived", 2)
    by_rcpt = {tuple(m.recipients): m for m in copies}
    main = by_rcpt[("user@dest.test",)]
    copy = by_rcpt[("archive@example.com", "vault@example.com")]
    assert main.sender == "app@archived.test"
    assert copy.sender == "postmaster@example.com"
    # The same bytes: our Received: names the one recipient, never the archive.
    assert copy.data == main.data
    assert b"for <user@dest.test>" in main.data
    assert b"archive@" not in main.data and b"vault@" not in main.data


def test_archive_route_sends_the_copy_through_its_own_upstream(env: Env) -> None:
    data = message("app@journal.test", subject="journaled")
    env.send("app@journal.test", ["user@dest.test"], data)
    main, = env.delivered("journaled")
    copy, = env.delivered("journaled", sink=env.journal)
    assert main.recipients == ["user@dest.test"] and copy.recipients == ["journal@example.com"]
    assert copy.sender == "<>"  # no archive_sender: a failed copy bounces to nobody
    assert copy.data == main.data


def test_a_held_message_holds_its_archive_copy_too(env: Env) -> None:
    env.send("app@held.test", ["user@dest.test"], message("app@held.test", subject="held"))
    def held() -> list[tuple[str, str]]:
        with sqlite3.connect(env.relay.spool_db) as db:
            return sorted(db.execute(
                "SELECT m.sender, r.address FROM message m JOIN recipient r "
                "ON r.message_id = m.id WHERE m.state = 'hold'"))

    # Stored before the 250, in one transaction: both are there once the client is done.
    assert held() == [("app@held.test", "user@dest.test"),
                      ("postmaster@example.com", "archive@example.com"),
                      ("postmaster@example.com", "vault@example.com")]


def test_archive_copy_is_not_counted_by_recipient_limits(env: Env) -> None:
    # burst 1 per sender: the one recipient uses it up, the archive copies take none.
    data = message("app@limited.test", subject="limited")
    env.send("app@limited.test", ["user@dest.test"], data)
    assert len(env.delivered("limited", 2)) == 2
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        env.send("app@limited.test", ["other@dest.test"], data)
    assert refused.value.recipients["other@dest.test"][0] == 451


def test_550_for_an_archive_copy_bounces_only_that_copy(env: Env) -> None:
    env.sink.handler.rcpt_replies["vault@example.com"] = "550 5.1.1 No such mailbox"
    try:
        data = message("app@archived.test", subject="vault-refused")
        env.send("app@archived.test", ["user@dest.test"], data)
        bounce, = env.delivered(b"Final-Recipient: rfc822; vault@example.com")
        by_rcpt = {tuple(m.recipients): m for m in env.delivered("vault-refused", 3)}
    finally:
        del env.sink.handler.rcpt_replies["vault@example.com"]
    # The message went to its recipient and the copy to archive@; vault@ refused it: the
    # bounce says so to the copy's sender, and the application's sender hears nothing.
    assert by_rcpt[("user@dest.test",)].sender == "app@archived.test"
    assert by_rcpt[("archive@example.com",)].sender == "postmaster@example.com"
    assert bounce.sender == "<>" and bounce.recipients == ["postmaster@example.com"]
    report = bounce.data.split(b"Content-Description: Undelivered")[0]
    assert b"user@dest.test" not in report and b"archive@example.com" not in report
    assert [m for m in env.sink.handler.messages if m.recipients == ["app@archived.test"]] == []


def test_bounce_for_a_rewritten_sender_goes_to_the_rewritten_address(env: Env) -> None:
    env.sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    try:
        env.send("www-data@app1.internal", ["gone@dest.test"],
                 message("www-data@app1.internal", subject="to-gone"))
        bounce, = env.delivered(b"Final-Recipient: rfc822; gone@dest.test")
    finally:
        del env.sink.handler.rcpt_replies["gone@dest.test"]
    assert bounce.sender == "<>" and bounce.recipients == ["noreply@example.com"]


def test_a_map_that_makes_no_address_defers_and_sends_nothing(env: Env) -> None:
    with pytest.raises(smtplib.SMTPDataError) as error:
        env.send("y@bad.test", ["user@dest.test"], message("y@bad.test", subject="unlucky"))
    assert (error.value.smtp_code, error.value.smtp_error[:5]) == (451, b"4.3.0")
    env.send("xy@bad.test", ["user@dest.test"], message("xy@bad.test", subject="lucky"))
    got, = env.delivered("lucky")
    assert got.sender == "x@example.com"
    assert not [m for m in env.sink.handler.messages if b"Subject: unlucky" in m.data]
    assert "<y@bad.test> became <@example.com>: source route; answering 451" in \
        env.relay.log_text()


def test_rewriting_runs_after_qualify_domain(env: Env) -> None:
    # "www-data" from a relay network is www-data@app1.internal ([server] qualify_domain)
    # first; the map then sees, and rewrites, the qualified address.
    env.send("www-data", ["root"], message("www-data", subject="unqualified"))
    got, = env.delivered("unqualified")
    assert (got.sender, got.recipients) == ("noreply@example.com", ["ops@example.com"])


def test_rewrites_are_logged_with_the_queue_id(env: Env) -> None:
    env.send("www-data@app1.internal", ["root@app1.internal"],
             message("www-data@app1.internal", subject="logged"))
    env.delivered("logged")
    log = env.relay.log_text()
    for line in ("rewrite_sender <www-data@app1.internal> -> <noreply@example.com> "
                 "(rule senders)",
                 "rewrite_recipient <root@app1.internal> -> <ops@example.com> (rule recipients)",
                 "rewrite_header_from www-data@app1.internal -> noreply@example.com "
                 "(rule from-masquerade)"):
        assert line in log


def test_dry_run_prints_each_rewrite(env: Env, tmp_path: Path) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(message("www-data@app1.internal", b"X-Mailer: PHP\r\n"))
    result = run_cli("test", "--config", str(env.relay.config), "--from",
                     "www-data@app1.internal", "--to", "root@app1.internal", "--to",
                     "user@dest.test", "--message", str(eml))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert 'rule "senders" [rewrite_sender]: matched, map @apps (2 entries)' in out
    assert 'rule "recipients" [rewrite_recipient]: matched, map @people (1 entries)' in out
    lines = out.splitlines()
    assert lines[-6:] == [
        "  -> accept: 250 2.0.0 Ok: queued as <dry-run>",
        "rewrite: rewrite_sender <www-data@app1.internal> -> <noreply@example.com> "
        "(rule senders)",
        "rewrite: rewrite_recipient <root@app1.internal> -> <ops@example.com> "
        "(rule recipients)",
        "rewrite: rewrite_header_from www-data@app1.internal -> noreply@example.com "
        "(rule from-masquerade)",
        "stores: from=<noreply@example.com> to=<ops@example.com>,<user@dest.test> "
        "route=default",
        "result: accept (rule relay-networks): client sees 250 2.0.0 Ok: queued as <dry-run>",
    ]


def test_dry_run_prints_archive_copies_and_stripped_fields(env: Env, tmp_path: Path) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(b"Received: from a ([10.0.0.9]) by b; Mon, 30 Nov 2026 00:00:00 +0000\r\n"
                    + message("app@strip.test", b"X-Internal-Id: 7\r\n"))
    out = run_cli("test", "--config", str(env.relay.config), "--from", "app@strip.test",
                  "--to", "user@dest.test", "--message", str(eml)).stdout
    assert "rewrite: strip Received, X-Internal-Id (rule hide-internals)" in out.splitlines()
    out = run_cli("test", "--config", str(env.relay.config), "--from", "app@journal.test",
                  "--to", "user@dest.test", "--message", str(eml)).stdout.splitlines()
    assert out[-4:-1] == [
        "rewrite: archive copy to <journal@example.com> from <> route journal (rule journal)",
        "stores: from=<app@journal.test> to=<user@dest.test> route=default",
        "stores: from=<> to=<journal@example.com> route=journal",
    ]


def test_sighup_rereads_a_file_map(env: Env) -> None:
    people = env.directory / "policies" / "maps" / "people.txt"
    people.write_text(PEOPLE + "admin@app1.internal  admins@example.com\n")
    try:
        assert env.relay.proc is not None
        reloads = env.relay.log_text().count("reloaded configuration")
        os.kill(env.relay.proc.pid, signal.SIGHUP)
        wait_until(lambda: env.relay.log_text().count("reloaded configuration") > reloads,
                   10, "the reload")
        env.send("app@rcpt.test", ["admin@app1.internal"],
                 message("app@rcpt.test", subject="after-reload"))
        got, = env.delivered("after-reload")
        assert got.recipients == ["admins@example.com"]
    finally:
        people.write_text(PEOPLE)


def test_check_reports_a_bad_map_with_file_and_line(env: Env, tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    (policies / "maps").mkdir(parents=True)
    (policies / "10.toml").write_text(
        '[maps]\nm = "file:maps/m.txt"\n[[rule]]\nname = "r"\naction = "rewrite_sender"\n'
        'map = "@m"\n')
    (policies / "maps" / "m.txt").write_text("a@x.test b@y.test\nb@y.test a@x.test\n")
    config = tmp_path / "config.toml"
    config.write_text(env.relay.config.read_text().replace(
        str(env.directory / "policies"), str(policies)))
    result = run_cli("check", "--config", str(config))
    assert result.returncode != 0
    assert ('policies/10.toml: maps.m: policies/maps/m.txt:1: "a@x.test": rewrites to '
            '"b@y.test", which the map rewrites again to "a@x.test"') in result.stdout + \
        result.stderr
