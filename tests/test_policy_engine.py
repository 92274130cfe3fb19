"""Evaluating policies: every field, value form and action, and the stage-by-stage walk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relay.policy import Facts, Policy, StaticChecks, evaluate, load_policy
from relay.policy.rules import Stage

SHIPPED = Path(__file__).parent.parent / "policies"


def load(tmp_path: Path, text: str, files: dict[str, str] | None = None) -> Policy:
    (tmp_path / "10-test.toml").write_text(text)
    for name, content in (files or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    return load_policy(tmp_path)


MESSAGE = (b"Subject: Your invoice 42\r\nFrom: Billing <a@example.com>\r\nX-Empty:\r\n\r\n"
           b"body\r\n")
BASE: dict[str, Any] = {
    "client_address": "192.0.2.10",
    "listener": "smtp",
    "helo_name": "APP1.example.com",
    "sasl_username": "",
    "sender": "a@example.com",
    "recipient": "b@example.net",
    "recipients": (),
    "size": 1000,
    "message": MESSAGE,
    "tls": False,
}

# (conditions written in a rule, stage, fact overrides, checks, expected match)
MATCHES: list[tuple[str, Stage, dict[str, Any], dict[str, Any], bool]] = [
    # client_address: IPs and CIDR networks, v4 and v6, any-of lists
    ('match.client_address = "192.0.2.10"', "connect", {}, {}, True),
    ('match.client_address = "192.0.2.0/24"', "connect", {}, {}, True),
    ('match.client_address = "198.51.100.0/24"', "connect", {}, {}, False),
    ('match.client_address = ["198.51.100.1", "192.0.2.0/25"]', "connect", {}, {}, True),
    (
        'match.client_address = "2001:db8::/32"',
        "connect",
        {"client_address": "2001:db8::5"},
        {},
        True,
    ),
    (
        'match.client_address = "192.0.2.0/24"',
        "connect",
        {"client_address": "::ffff:192.0.2.10"},
        {},
        True,
    ),
    ('match.client_address = "::/0"', "connect", {}, {}, False),
    ('match.client_address = "0.0.0.0/0"', "connect", {"client_address": "unix:"}, {}, False),
    # listener
    ('match.listener = "smtp"', "connect", {}, {}, True),
    ('match.listener = "submission"', "connect", {}, {}, False),
    # helo_name: exact (case-insensitive), glob, re:
    ('match.helo_name = "app1.example.com"', "helo", {}, {}, True),
    ('match.helo_name = "*.example.com"', "helo", {}, {}, True),
    ('match.helo_name = "re:^app[0-9]+\\\\."', "helo", {}, {}, True),
    ('match.helo_name = "re:^web"', "helo", {}, {}, False),
    # sasl_username: "*" any authenticated, "" unauthenticated
    ('match.sasl_username = "*"', "mail", {}, {}, False),
    ('match.sasl_username = "*"', "mail", {"sasl_username": "bob"}, {}, True),
    ('match.sasl_username = ""', "mail", {}, {}, True),
    ('match.sasl_username = "bob"', "mail", {"sasl_username": "Bob"}, {}, True),
    # sender: exact, glob, domain, subdomains only, null sender, re:
    ('match.sender = "A@Example.COM"', "mail", {}, {}, True),
    ('match.sender = "*@example.com"', "mail", {}, {}, True),
    ('match.sender = "example.com"', "mail", {}, {}, True),
    ('match.sender = ".example.com"', "mail", {}, {}, False),
    ('match.sender = ".example.com"', "mail", {"sender": "a@mx.example.com"}, {}, True),
    ('match.sender = "<>"', "mail", {"sender": ""}, {}, True),
    ('match.sender = "<>"', "mail", {}, {}, False),
    ('match.sender = "*@example.com"', "mail", {"sender": ""}, {}, False),
    ('match.sender = "re:^a@"', "mail", {}, {}, True),
    # sender_domain
    ('match.sender_domain = "EXAMPLE.com"', "mail", {}, {}, True),
    ('match.sender_domain = ".example.com"', "mail", {}, {}, False),
    ('match.sender_domain = ".example.com"', "mail", {"sender": "a@b.c.example.com"}, {}, True),
    ('match.sender_domain = "*.org"', "mail", {}, {}, False),
    # recipient, recipient_domain; at data: any accepted recipient
    ('match.recipient = "b@example.net"', "rcpt", {}, {}, True),
    ('match.recipient = "c@example.net"', "rcpt", {}, {}, False),
    (
        'match.recipient = "c@example.net"',
        "data",
        {"recipients": ("b@example.net", "c@example.net")},
        {},
        True,
    ),
    ('match.recipient_domain = "example.net"', "rcpt", {}, {}, True),
    ('match.recipient_domain = ["example.org", ".example.net"]', "rcpt", {}, {}, False),
    # recipient_count: at rcpt the accepted ones plus this one; at data the accepted ones
    ('match.recipient_count = ">1"', "rcpt", {"recipients": ("x@example.org",)}, {}, True),
    ('match.recipient_count = "=1"', "rcpt", {}, {}, True),
    ('match.recipient_count = ">=3"', "rcpt", {"recipients": ("x@example.org",)}, {}, False),
    ("match.recipient_count = 2", "data", {"recipients": ("x@y.org", "z@y.org")}, {}, True),
    # size with K/M/G; declared at MAIL or real at DATA
    ('match.size = ">25M"', "mail", {"size": 30 * 1024 * 1024}, {}, True),
    ('match.size = ">25M"', "data", {}, {}, False),
    ('match.size = ["<=1K", ">1G"]', "data", {"size": 1024}, {}, True),
    # header."Name": "*" = present (even empty), glob, re:
    ('match.header."Subject" = "*"', "data", {}, {}, True),
    ('match.header."X-Empty" = "*"', "data", {}, {}, True),
    ('match.header."List-Id" = "*"', "data", {}, {}, False),
    ('match.header."subject" = "*INVOICE*"', "data", {}, {}, True),
    ('match.header."From" = "re:<a@example\\\\.com>$"', "data", {}, {}, True),
    ('match.header."Subject" = "re:^Re:"', "data", {}, {}, False),
    # tls
    ("match.tls = true", "mail", {"tls": True}, {}, True),
    ("match.tls = true", "mail", {}, {}, False),
    # spf, dkim, dkim_domain from the checks
    ('match.spf = "fail"', "mail", {}, {"spf": "fail"}, True),
    ('match.spf = ["pass", "neutral"]', "mail", {}, {"spf": "softfail"}, False),
    ('match.dkim = "pass"', "data", {}, {"dkim": ("pass", "example.com")}, True),
    ('match.dkim_domain = ".example.com"', "data", {}, {"dkim": ("pass", "example.com")}, False),
    ('match.dkim_domain = "example.com"', "data", {}, {"dkim": ("pass", "example.com")}, True),
    ('match.dkim_domain = "*"', "data", {}, {"dkim": ("none", "")}, False),
    # unless: the rule is skipped when any listed condition matches
    ('match.client_address = "192.0.2.0/24"\nunless.sender = "<>"', "mail", {}, {}, True),
    (
        'match.client_address = "192.0.2.0/24"\nunless.sender = ["x@y.org", "<>"]',
        "mail",
        {"sender": ""},
        {},
        False,
    ),
    # lists
    ('match.client_address = "@nets"', "connect", {}, {}, True),
    ('match.sender = "@senders"', "mail", {"sender": "c@mail.example.org"}, {}, True),
    # over_limit (a message-counted limit is known at mail)
    ('over_limit = "hourly"', "mail", {}, {"over_limits": frozenset({"hourly"})}, True),
    ('over_limit = "hourly"', "mail", {}, {}, False),
]

LISTS = """
[lists]
nets = ["198.51.100.0/24", "file:lists/nets.txt"]
senders = ["nobody@example.org", ".example.org"]

[limit.hourly]
key = ["client_address"]
count = "message"
rate = "100/1h"
burst = 10
"""


def facts_for(stage: Stage, overrides: dict[str, Any]) -> Facts:
    values = {**BASE, **overrides}
    order = ("connect", "helo", "mail", "rcpt", "data")
    known = order.index(stage)
    if known < 1:
        values["helo_name"] = ""
    if known < 2:
        values["sender"], values["sasl_username"], values["size"] = None, "", None
    if known != 3:
        values["recipient"] = None
    if known < 3:
        values["recipients"] = ()
    elif known == 4 and "recipients" not in overrides:
        values["recipients"] = ("b@example.net",)
    if known < 4:
        values["message"] = None
        values["size"] = overrides.get("size") if known >= 2 else None
    return Facts(**values)


@pytest.mark.parametrize(("conditions", "stage", "overrides", "checks", "matched"), MATCHES)
async def test_field_matching(
    tmp_path: Path,
    conditions: str,
    stage: Stage,
    overrides: dict[str, Any],
    checks: dict[str, Any],
    matched: bool,
) -> None:
    policy = load(
        tmp_path,
        f'[defaults]\nfinal_action = "tempfail"\n{LISTS}\n'
        f'[[rule]]\nname = "r"\n{conditions}\naction = "reject"\n',
        {"lists/nets.txt": "# test\n192.0.2.0/28\n"},
    )
    decision = await evaluate(policy, stage, facts_for(stage, overrides), StaticChecks(**checks))
    expected = (
        "reject"
        if matched
        else ("continue" if stage in ("connect", "helo", "mail") else "tempfail")
    )
    assert decision.action == expected, decision


# --- actions ---------------------------------------------------------------------------------

RCPT = Facts("192.0.2.10", helo_name="app1", sender="a@example.com", recipient="b@example.net")


async def test_reject_interpolates_fields_into_its_reply(tmp_path: Path) -> None:
    policy = load(
        tmp_path,
        '[[rule]]\nname = "no"\naction = "reject"\n'
        'message = "550 5.7.1 {sender} may not send to {recipient} from {client_address}"\n',
    )
    decision = await evaluate(policy, "rcpt", RCPT, StaticChecks())
    assert (decision.action, decision.rule) == ("reject", "no")
    assert str(decision.reply) == (
        "550 5.7.1 a@example.com may not send to b@example.net from 192.0.2.10"
    )


@pytest.mark.parametrize(
    ("action", "reply"),
    [
        ("reject", "550 5.7.1 Message rejected by policy"),
        ("tempfail", "451 4.7.1 Try again later"),
        ("defer", "451 4.7.1 Try again later"),
        ("accept", None),
        ("hold", None),
        ("discard", None),
    ],
)
async def test_terminal_actions_and_default_replies(
    tmp_path: Path, action: str, reply: str | None
) -> None:
    policy = load(tmp_path, f'[[rule]]\nname = "x"\naction = "{action}"\n')
    decision = await evaluate(policy, "rcpt", RCPT, StaticChecks())
    assert decision.action == ("tempfail" if action == "defer" else action)
    assert (str(decision.reply) if decision.reply else None) == reply
    assert decision.rule == "x"


async def test_accept_with_a_custom_2xx_message(tmp_path: Path) -> None:
    policy = load(tmp_path, '[[rule]]\nname = "x"\naction = "hold"\nmessage = "250 2.0.0 Held"\n')
    decision = await evaluate(policy, "data", RCPT, StaticChecks())
    assert (decision.action, str(decision.reply)) == ("hold", "250 2.0.0 Held")


async def test_tag_route_and_log_are_not_terminal(tmp_path: Path) -> None:
    policy = load(
        tmp_path,
        """
[[rule]]
name = "tag-dkim"
match.dkim = ["none", "fail"]
action = "tag"
add_headers = { "X-Relay-DKIM" = "{dkim} via {client_address}", "X-Relay" = "yes" }

[[rule]]
name = "bulk"
match.header."List-Unsubscribe" = "*"
action = "route"
route = "bulk"

[[rule]]
name = "other-route"
action = "route"
route = "default"

[[rule]]
name = "rollout"
match.sender_domain = "example.com"
action = "log"
log_action = "reject"
message = "550 5.7.20 No passing DKIM signature for {sender_domain}"

[[rule]]
name = "tag-late"
action = "tag"
add_headers = { "X-Late" = "{recipient_count}" }

[[rule]]
name = "apps"
match.client_address = "192.0.2.0/24"
action = "accept"
""",
    )
    facts = Facts(
        "192.0.2.10",
        sender="a@example.com",
        recipients=("b@example.net", "c@example.net"),
        size=10,
        message=b"List-Unsubscribe: <mailto:u@example.com>\r\n\r\n",
    )
    decision = await evaluate(policy, "data", facts, StaticChecks(dkim=("fail", "x.org")))
    assert (decision.action, decision.rule, decision.reply) == ("accept", "apps", None)
    assert decision.add_headers == (
        ("X-Relay-DKIM", "fail via 192.0.2.10"),
        ("X-Relay", "yes"),
        ("X-Late", "2"),
    )
    assert decision.route == "bulk"  # the first matching route rule wins
    assert decision.would == (
        ("rollout", "would reject: 550 5.7.20 No passing DKIM signature for example.com"),
    )


async def test_retry_after_comes_from_the_rules_limit(tmp_path: Path) -> None:
    policy = load(
        tmp_path,
        '[limit.hourly]\nkey = ["client_address"]\nrate = "10/1h"\nburst = 1\n'
        '[[rule]]\nname = "slow"\nover_limit = "hourly"\naction = "tempfail"\n'
        'message = "451 4.7.1 Rate limit exceeded for {client_address}, retry in {retry_after}s"\n',
    )
    checks = StaticChecks(over_limits=frozenset({"hourly"}), retry_after=359.2)
    decision = await evaluate(policy, "mail", Facts("192.0.2.10", sender="a@b.example"), checks)
    assert str(decision.reply) == "451 4.7.1 Rate limit exceeded for 192.0.2.10, retry in 360s"


async def test_interpolated_client_text_cannot_break_the_reply_line(tmp_path: Path) -> None:
    policy = load(
        tmp_path, '[[rule]]\nname = "x"\naction = "reject"\nmessage = "550 5.7.1 {helo_name}"\n'
    )
    facts = Facts("192.0.2.1", helo_name="evil\r\n250 ok")
    decision = await evaluate(policy, "helo", facts, StaticChecks())
    assert str(decision.reply) == "550 5.7.1 evil??250 ok"


# --- the walk across stages --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "sender", "action", "reply"),
    [
        ("127.0.0.1", "a@example.com", "accept", None),
        ("::1", "", "accept", None),
        ("192.0.2.77", "a@example.com", "accept", None),
        ("192.0.2.77", "", "reject", "554 5.7.1 <b@example.net>: Relay access denied"),
        (
            "203.0.113.5",
            "a@example.com",
            "reject",
            "554 5.7.1 <b@example.net>: Relay access denied",
        ),
    ],
)
async def test_shipped_policy_is_closed_by_default_at_rcpt(
    client: str, sender: str, action: str, reply: str | None
) -> None:
    policy = load_policy(SHIPPED, builtin_lists={"relay_networks": ("127.0.0.0/8", "::1/128")})
    facts = Facts(client, sender=sender, recipient="b@example.net")
    decision = await evaluate(policy, "rcpt", facts, StaticChecks())
    assert decision.action == action
    assert (str(decision.reply) if decision.reply else None) == reply


async def test_before_rcpt_no_final_action_applies() -> None:
    policy = load_policy(SHIPPED, builtin_lists={"relay_networks": ("127.0.0.0/8", "::1/128")})
    for stage, facts in (
        ("connect", Facts("203.0.113.5")),
        ("helo", Facts("203.0.113.5", helo_name="x")),
        ("mail", Facts("203.0.113.5", helo_name="x", sender="a@example.com")),
    ):
        decision = await evaluate(policy, stage, facts, StaticChecks())  # type: ignore[arg-type]
        assert (decision.action, decision.reply) == ("continue", None)


async def test_pending_accept_stops_the_walk_until_its_field_is_known(tmp_path: Path) -> None:
    policy = load(
        tmp_path,
        '[[rule]]\nname = "signed"\nmatch.dkim = "pass"\naction = "accept"\n',
    )
    checks = StaticChecks(dkim=("fail", "example.com"))
    decision = await evaluate(policy, "rcpt", RCPT, checks, trace=True)
    assert decision.action == "continue"
    assert decision.trace == (
        'rule "signed" [accept]: might still match, needs match.dkim: decision waits for data',
    )
    assert checks.calls == []  # DKIM is not known before data: never asked
    data = Facts("192.0.2.10", sender="a@example.com", recipients=("b@example.net",), size=5)
    decision = await evaluate(policy, "data", data, checks)
    assert (decision.action, decision.rule) == ("reject", "final_action")
    assert str(decision.reply) == "554 5.7.1 <b@example.net>: Relay access denied"


async def test_pending_accept_that_can_no_longer_match_is_passed_over(tmp_path: Path) -> None:
    policy = load(
        tmp_path,
        '[[rule]]\nname = "apps-signed"\nmatch.client_address = "192.0.2.0/24"\n'
        'match.dkim = "pass"\naction = "accept"\n',
    )
    stranger = Facts("203.0.113.5", sender="a@example.com", recipient="b@example.net")
    decision = await evaluate(policy, "rcpt", stranger, StaticChecks(), trace=True)
    assert decision.action == "reject"
    assert decision.trace[0] == (
        'rule "apps-signed" [accept]: cannot match: match.client_address: 203.0.113.5 '
        'does not match "192.0.2.0/24"'
    )


async def test_pending_reject_is_tested_at_data_and_does_not_block(tmp_path: Path) -> None:
    policy = load(
        tmp_path,
        '[[rule]]\nname = "no-invoices"\nmatch.header."Subject" = "*invoice*"\n'
        'action = "reject"\nmessage = "550 5.7.1 No invoices"\n'
        '[[rule]]\nname = "apps"\nmatch.client_address = "192.0.2.0/24"\naction = "accept"\n',
    )
    decision = await evaluate(policy, "rcpt", RCPT, StaticChecks())
    assert (decision.action, decision.rule) == ("accept", "apps")
    data = Facts(
        "192.0.2.10", sender="a@example.com", recipients=("b@example.net",), message=MESSAGE
    )
    decision = await evaluate(policy, "data", data, StaticChecks())
    assert (decision.action, str(decision.reply)) == ("reject", "550 5.7.1 No invoices")


async def test_size_is_known_at_mail_only_when_declared(tmp_path: Path) -> None:
    policy = load(
        tmp_path,
        '[[rule]]\nname = "too-big"\nmatch.size = ">10M"\naction = "reject"\n'
        'message = "552 5.3.4 Message size exceeds fixed limit"\n'
        '[[rule]]\nname = "all"\naction = "accept"\n',
    )
    undeclared = Facts("192.0.2.1", sender="a@example.com")
    assert (await evaluate(policy, "mail", undeclared, StaticChecks())).action == "accept"
    declared = Facts("192.0.2.1", sender="a@example.com", size=11 * 1024 * 1024)
    decision = await evaluate(policy, "mail", declared, StaticChecks())
    assert (decision.action, decision.rule) == ("reject", "too-big")
    real = Facts("192.0.2.1", sender="a@example.com", recipients=("b@x.org",), size=11 << 20)
    assert (await evaluate(policy, "data", real, StaticChecks())).rule == "too-big"


async def test_reject_at_connect_is_found_again_at_rcpt_naming_the_recipient(
    tmp_path: Path,
) -> None:
    policy = load(
        tmp_path,
        '[[rule]]\nname = "blocked"\nmatch.client_address = "203.0.113.0/24"\n'
        'action = "reject"\nmessage = "554 5.7.1 <{recipient}>: Access denied"\n',
    )
    assert policy.delay_reject
    connect = await evaluate(policy, "connect", Facts("203.0.113.5"), StaticChecks())
    assert connect.refused and connect.rule == "blocked"
    rcpt = Facts("203.0.113.5", sender="a@example.com", recipient="b@example.net")
    decision = await evaluate(policy, "rcpt", rcpt, StaticChecks())
    assert str(decision.reply) == "554 5.7.1 <b@example.net>: Access denied"


async def test_lazy_checks_run_only_when_the_cheap_conditions_match(tmp_path: Path) -> None:
    policy = load(
        tmp_path,
        '[[rule]]\nname = "spf-own"\nmatch.sender_domain = "example.com"\nmatch.spf = "fail"\n'
        'action = "reject"\n'
        '[[rule]]\nname = "spf-temp"\nmatch.spf = "temperror"\naction = "tempfail"\n'
        '[[rule]]\nname = "all"\naction = "accept"\n',
    )
    checks = StaticChecks(spf="pass")
    other = Facts("192.0.2.1", sender="a@example.org")
    assert (await evaluate(policy, "connect", Facts("192.0.2.1"), checks)).action == "accept"
    assert checks.calls == []  # "all" decides at connect; spf rules are not yet known
    assert (await evaluate(policy, "mail", other, checks)).action == "accept"
    assert checks.calls == ["spf"]  # asked once for two rules, only by "spf-temp"


@pytest.mark.parametrize(
    ("final", "action", "reply"),
    [
        (
            'final_action = "tempfail"',
            "tempfail",
            "451 4.7.1 <b@example.net>: Relay access temporarily denied",
        ),
        ('final_action = "accept"', "accept", None),
        (
            'final_message = "550 5.7.1 No relaying to {recipient_domain}"',
            "reject",
            "550 5.7.1 No relaying to example.net",
        ),
    ],
)
async def test_final_action_and_message(
    tmp_path: Path, final: str, action: str, reply: str | None
) -> None:
    policy = load(tmp_path, f"[defaults]\n{final}\n")
    decision = await evaluate(policy, "rcpt", RCPT, StaticChecks())
    assert (decision.action, decision.rule) == (action, "final_action")
    assert (str(decision.reply) if decision.reply else None) == reply
