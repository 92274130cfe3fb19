"""`policy-relay test`: the stage-by-stage report, its exit status, and case files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relay.config import Settings
from relay.headers import header_fields
from relay.policy import Policy, StaticChecks, load_policy
from relay.policy.dryrun import Client, run_cases, run_dry
from relay.runtime import Runtime

SHIPPED = Path(__file__).parent.parent / "policies"
# What config.toml contributes by default: [server] relay_networks.
CONFIG_LISTS = {"relay_networks": ("127.0.0.0/8", "::1/128")}

POLICY = """
[[rule]]
name = "blocked"
match.client_address = "203.0.113.66"
action = "reject"
message = "554 5.7.1 <{recipient}>: Access denied"

[[rule]]
name = "big"
match.size = ">1K"
action = "tempfail"
message = "452 4.3.1 Too big for now"

[[rule]]
name = "tag"
match.dkim = "none"
action = "tag"
add_headers = { "X-DKIM" = "{dkim}" }

[[rule]]
name = "spf-fail"
match.spf = "fail"
action = "reject"
message = "550 5.7.23 SPF check failed for {sender_domain}"

[[rule]]
name = "invoices"
match.header."Subject" = "*Rechnung*"
action = "hold"

[[rule]]
name = "sink"
match.recipient_domain = "example.invalid"
action = "discard"

[[rule]]
name = "apps"
match.client_address = "192.0.2.0/24"
action = "accept"
"""


def runtime(policy: Policy) -> Runtime:
    return Runtime(Settings(hostname="relay.test"), policy)


def dry(policy: Policy, checks: StaticChecks | None = None, **client: Any) -> tuple[str, int]:
    client["recipients"] = tuple(client.get("recipients", ()))
    outcome = run_dry(runtime(policy), Client(**client), checks)
    return outcome.text, outcome.exit_status


def policy_dir(tmp_path: Path, delay_reject: bool = True) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    defaults = "" if delay_reject else "[defaults]\ndelay_reject = false\n"
    (directory / "10-test.toml").write_text(defaults + POLICY)
    return directory


def test_stranger_gets_relay_access_denied_at_rcpt_and_exit_5() -> None:
    text, status = dry(
        load_policy(SHIPPED, builtin_lists=CONFIG_LISTS),
        client_address="203.0.113.9",
        helo="app1",
        sender="a@example.com",
        recipients=["b@example.net"],
    )
    assert status == 5
    lines = text.splitlines()
    networks = (
        '  rule "relay-networks" [accept]: no match: '
        'match.client_address: 203.0.113.9 does not match "@relay_networks"'
    )
    waits = (
        '  rule "authenticated" [accept]: might still match, needs match.sasl_username: '
        "decision waits for mail"
    )
    unauthenticated = (
        '  rule "authenticated" [accept]: no match: match.sasl_username: "" does not match "*"'
    )
    apps = (
        '  rule "app-servers" [accept]: no match: '
        'match.client_address: 203.0.113.9 does not match "@app_servers"'
    )
    denied = "554 5.7.1 <b@example.net>: Relay access denied"
    stages = [line for line in lines if not line.startswith(" ")]
    assert stages == [
        "connect client_address=203.0.113.9",
        "helo app1",
        "mail from=<a@example.com>",
        "rcpt to=<b@example.net>",
        "no recipient accepted: no DATA",
        f"result: reject (rule final_action): client sees {denied}",
    ]

    def stage(name: str) -> list[str]:
        start = lines.index(next(x for x in lines if x.startswith(name)))
        end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith(" "))
        return lines[start + 1 : end]

    assert stage("connect")[-3:] == [networks, waits, "  -> continue: 220 relay.test ESMTP"]
    assert stage("helo")[-3:] == [networks, waits, "  -> continue: 250 relay.test"]
    assert stage("mail")[-5:] == [
        networks, unauthenticated, apps, "  no terminal rule matched: continue",
        "  -> continue: 250 2.1.0 Ok",
    ]
    assert stage("rcpt")[-5:] == [
        networks, unauthenticated, apps,
        f"  no terminal rule matched: final_action reject: {denied}",
        f"  -> reject (rule final_action): {denied}",
    ]
    # The SPF rules are for our own domains only: a stranger's sender is not looked up.
    assert (
        '  rule "spf-fail-own-domain" [reject]: no match: '
        'match.sender_domain: example.com does not match "@our_domains"'
    ) in stage("rcpt")


def test_relay_networks_relay_with_exit_0() -> None:
    text, status = dry(
        load_policy(SHIPPED, builtin_lists=CONFIG_LISTS),
        client_address="::1",
        sender="<>",
        recipients=["b@example.net"],
    )
    assert status == 0
    assert text.endswith(
        "result: accept (rule relay-networks): client sees 250 2.0.0 Ok: queued as <dry-run>\n"
    )


def test_declared_size_tempfails_with_exit_4(tmp_path: Path) -> None:
    text, status = dry(
        load_policy(policy_dir(tmp_path)),
        client_address="192.0.2.1",
        sender="a@example.com",
        recipients=["b@example.net"],
        message=b"Subject: x\r\n\r\n" + b"x" * 2000,
    )
    assert status == 4
    assert "mail from=<a@example.com> SIZE=2014\n" in text
    assert "  -> tempfail (rule big), delayed to RCPT\n" in text
    assert text.endswith("result: tempfail (rule big): client sees 452 4.3.1 Too big for now\n")


def test_without_delay_reject_a_connect_reject_ends_the_session(tmp_path: Path) -> None:
    text, status = dry(
        load_policy(policy_dir(tmp_path, delay_reject=False)),
        client_address="203.0.113.66",
        sender="a@example.com",
        recipients=["b@example.net"],
    )
    assert status == 5
    assert "helo" not in text
    assert text.endswith(
        "  -> reject (rule blocked): 554 5.7.1 <>: Access denied\n"
        "result: reject (rule blocked): client sees 554 5.7.1 <>: Access denied\n"
    )


def test_message_headers_are_decoded_for_matching_and_hold_exits_0(tmp_path: Path) -> None:
    message = b"Subject: =?utf-8?q?Ihre_Rechnung?=\r\nFrom: a@example.com\r\n\r\nbody\r\n"
    assert header_fields(message) == (("Subject", "Ihre Rechnung"), ("From", "a@example.com"))
    text, status = dry(
        load_policy(policy_dir(tmp_path)),
        client_address="192.0.2.1",
        sender="a@example.com",
        recipients=["b@example.net"],
        message=message,
    )
    assert status == 0
    assert '  rule "invoices" [hold]: matched\n' in text
    assert "  adds header X-DKIM: none\n" in text
    assert text.endswith(
        "result: hold (rule invoices): client sees 250 2.0.0 Ok: queued as <dry-run>\n"
    )


def test_checks_given_on_the_command_line_decide(tmp_path: Path) -> None:
    text, status = dry(
        load_policy(policy_dir(tmp_path)),
        client_address="192.0.2.1",
        sender="a@example.com",
        recipients=["b@example.net", "c@example.org"],
        checks=StaticChecks(spf="fail"),
    )
    assert status == 5
    assert "  -> reject (rule spf-fail), delayed to RCPT\n" in text
    reply = "550 5.7.23 SPF check failed for example.com"
    assert text.count(f"  -> reject (rule spf-fail): {reply}\n") == 2  # once per recipient


def test_partly_refused_recipients_still_deliver_to_the_rest(tmp_path: Path) -> None:
    (tmp_path / "10.toml").write_text(
        '[[rule]]\nname = "ok"\nmatch.recipient_domain = "example.net"\naction = "accept"\n'
    )
    text, status = dry(
        load_policy(tmp_path),
        client_address="192.0.2.1",
        sender="a@example.com",
        recipients=["x@example.org", "b@example.net"],
    )
    assert status == 0
    assert (
        "  -> reject (rule final_action): 554 5.7.1 <x@example.org>: Relay access denied\n" in text
    )
    assert "data size=0 headers=0\n" in text


CASES = """
[[case]]
name = "app server relays"
client_address = "192.0.2.5"
from = "app@example.com"
to = ["user@example.net"]
expect = "accept"
expect_rule = "apps"

[[case]]
name = "newsletter is discarded"
client_address = "192.0.2.5"
from = "app@example.com"
to = ["user@example.invalid"]
expect = "discard"

[[case]]
name = "spf fail"
client_address = "192.0.2.5"
from = "app@example.com"
to = ["user@example.net"]
spf = "fail"
expect = "reject"
expect_code = 550

[[case]]
name = "invoice"
client_address = "192.0.2.5"
from = "app@example.com"
to = ["user@example.net"]
message = "invoice.eml"
expect = "hold"
"""


def test_cases_file_all_pass(tmp_path: Path) -> None:
    (tmp_path / "cases.toml").write_text(CASES)
    (tmp_path / "invoice.eml").write_bytes(b"Subject: Rechnung 7\r\n\r\nx\r\n")
    text, status = run_cases(runtime(load_policy(policy_dir(tmp_path))), tmp_path / "cases.toml")
    assert (text, status) == (
        "ok   app server relays: accept (rule apps): 250\n"
        "ok   newsletter is discarded: discard (rule sink): 250\n"
        "ok   spf fail: reject (rule spf-fail): 550 5.7.23 SPF check failed for example.com\n"
        "ok   invoice: hold (rule invoices): 250\n"
        "4 cases, 4 passed, 0 failed\n",
        0,
    )


def test_cases_file_reports_failures_with_the_trace(tmp_path: Path) -> None:
    (tmp_path / "cases.toml").write_text(
        '[[case]]\nname = "stranger"\nclient_address = "203.0.113.1"\nfrom = "a@b.example"\n'
        'to = ["c@d.example"]\nexpect = "accept"\n'
        '[[case]]\nname = "code"\nclient_address = "203.0.113.1"\nfrom = "<>"\n'
        'to = ["c@d.example"]\nexpect = "reject"\nexpect_code = 550\n'
    )
    text, status = run_cases(
        runtime(load_policy(SHIPPED, builtin_lists=CONFIG_LISTS)), tmp_path / "cases.toml"
    )
    assert status == 1
    lines = text.splitlines()
    assert lines[0] == (
        "FAIL stranger: expected accept, got reject; "
        "reject (rule final_action): 554 5.7.1 <c@d.example>: Relay access denied"
    )
    assert lines[1] == "     connect client_address=203.0.113.1"
    assert "FAIL code: expected code 550, got 554; reject (rule final_action): " in text
    assert lines[-1] == "2 cases, 0 passed, 2 failed"


def test_cases_file_errors_are_all_reported(tmp_path: Path) -> None:
    cases = tmp_path / "cases.toml"
    cases.write_text(
        '[[case]]\nname = "a"\nclient_address = "192.0.2.1"\nto = "x@y.example"\n'
        'expect = "bounce"\nspf = "maybe"\nmessage = "missing.eml"\n'
    )
    text, status = run_cases(runtime(load_policy(SHIPPED, builtin_lists=CONFIG_LISTS)), cases)
    assert status == 1
    assert text == (
        f'{cases}: case "a": from: required\n'
        f'{cases}: case "a": message: cannot read "{tmp_path}/missing.eml": '
        "No such file or directory\n"
        f'{cases}: case "a": spf: expected one of pass, fail, softfail, neutral, none, '
        "temperror, permerror, got 'maybe'\n"
        f'{cases}: case "a": expect: expected one of accept, reject, tempfail, hold, discard, '
        "got 'bounce'\n"
    )
