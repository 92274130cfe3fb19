"""Rewriting without sockets: address maps, header edits over bytes, and their loading."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from relay.config import Settings
from relay.policy.dryrun import run_cases
from relay.policy.engine import Facts, StaticChecks, evaluate
from relay.policy.headeredits import address_spans, drops, masquerade_from, strip_fields
from relay.policy.maps import AddressMap, MapError, compile_map
from relay.policy.rewrite import Archive, MapEdit, Rewrites, Strip, apply
from relay.policy.rules import load_policy
from relay.runtime import Runtime
from relay.schema import ConfigError


def make_map(entries: dict[str, str]) -> AddressMap:
    errors: list[str] = []
    compiled = compile_map("test", [(k, v, "") for k, v in entries.items()], errors.append)
    assert compiled is not None, errors
    return compiled


def map_errors(entries: dict[str, str]) -> list[str]:
    errors: list[str] = []
    assert compile_map("test", [(k, v, "") for k, v in entries.items()], errors.append) is None
    return errors


APPS = make_map({
    "www-data@app1.internal": "noreply@example.com",
    "@app2.internal": "@example.com",
    "@legacy.internal": "legacy@example.com",
    r"re:^(.+)\.(.+)@apps\.internal$": "$2+$1@example.com",
})


@pytest.mark.parametrize(("address", "expected"), [
    ("www-data@app1.internal", "noreply@example.com"),
    ("WWW-Data@App1.Internal", "noreply@example.com"),  # keys match regardless of case
    ("cron@app1.internal", None),  # only the exact address
    ("Cron@app2.internal", "Cron@example.com"),  # @domain value keeps the local part
    ("x@sub.app2.internal", None),  # a domain key is not its subdomains
    ("anything@legacy.internal", "legacy@example.com"),
    ("billing.eu@apps.internal", "eu+billing@example.com"),
    ("", None),  # the null sender is never rewritten
])
def test_map_lookup_order_and_forms(address: str, expected: str | None) -> None:
    assert APPS.lookup(address) == expected


def test_exact_key_wins_over_domain_and_pattern() -> None:
    amap = make_map({"re:.*@a\\.test$": "re@example.com", "@a.test": "domain@example.com",
                     "x@a.test": "exact@example.com"})
    assert amap.lookup("x@a.test") == "exact@example.com"
    assert amap.lookup("y@a.test") == "domain@example.com"


def test_pattern_that_makes_no_address_raises() -> None:
    amap = make_map({r"re:^(x*)y@b\.test$": "$1@example.com"})
    assert amap.lookup("xy@b.test") == "x@example.com"
    with pytest.raises(MapError, match=r"became <@example\.com>"):
        amap.lookup("y@b.test")


@pytest.mark.parametrize(("entries", "error"), [
    ({"a@x.test": "b@y.test", "b@y.test": "a@x.test"},
     '"a@x.test": rewrites to "b@y.test", which the map rewrites again to "a@x.test"'),
    ({"@old.test": "@new.test", "@new.test": "@old.test"},
     '"@old.test": rewrites to "@new.test", which the map rewrites again to "user@old.test"'),
    ({"a@x.test": "b@y.test", "@y.test": "c@z.test"},
     '"a@x.test": rewrites to "b@y.test", which the map rewrites again to "c@z.test"'),
    ({"re:^(a)@x\\.test$": "$2@y.test"},
     '"re:^(a)@x\\.test$": $2 in \'$2@y.test\': the expression has 1 group(s)'),
    ({"re:^(a@x": "a@y.test"},
     '"re:^(a@x": invalid regular expression: missing ), unterminated subpattern at '
     "position 1"),
    ({"a@x.test": "$1@y.test"},
     "\"a@x.test\": '$1@y.test': $1 .. $9 only in the value of a re: key"),
    ({"a@x.test": "not an address"},
     "\"a@x.test\": value 'not an address': control character or space in address"),
    ({"@x": "a@y.test"}, '"@x": domain not fully qualified'),
])
def test_bad_maps_are_refused(entries: dict[str, str], error: str) -> None:
    assert any(e.startswith(error) for e in map_errors(entries)), map_errors(entries)


def test_a_fixed_point_is_no_loop() -> None:
    # Rewriting everything to one address: its result maps to itself.
    amap = make_map({"re:.*": "noreply@example.com"})
    assert amap.lookup("noreply@example.com") == "noreply@example.com"


# --- From: masquerading over bytes ---------------------------------------------------------

FROM_MAP = make_map({"@app1.internal": "noreply@example.com"})


@pytest.mark.parametrize(("field", "expected"), [
    (b"From: www-data@app1.internal\r\n", b"From: noreply@example.com\r\n"),
    (b"From: Web App <www-data@app1.internal>\r\n", b"From: Web App <noreply@example.com>\r\n"),
    (b'From: "Doe, John (ops)" <john@App1.Internal>\r\n',
     b'From: "Doe, John (ops)" <noreply@example.com>\r\n'),
    # An encoded word in the display name stays byte for byte (RFC 2047).
    (b"From: =?utf-8?Q?J=C3=B6rg_M=C3=BCller?= <jm@app1.internal>\r\n",
     b"From: =?utf-8?Q?J=C3=B6rg_M=C3=BCller?= <noreply@example.com>\r\n"),
    # Folded: the continuation line keeps its place.
    (b"From: A very long display name that the client folded\r\n <www-data@app1.internal>\r\n",
     b"From: A very long display name that the client folded\r\n <noreply@example.com>\r\n"),
    # A comment after a bare address, and a mailbox list.
    (b"From: cron@app1.internal (Cron Daemon), Boss <boss@example.org>\r\n",
     b"From: noreply@example.com (Cron Daemon), Boss <boss@example.org>\r\n"),
    # A group (RFC 6854): its display name is not an address.
    (b"From: Apps: a@app1.internal, b@example.org;\r\n",
     b"From: Apps: noreply@example.com, b@example.org;\r\n"),
    # A display name that looks like an address is left alone.
    (b'From: "root@app1.internal" <root@example.org>\r\n',
     b'From: "root@app1.internal" <root@example.org>\r\n'),
    (b"From: Nobody <someone@example.org>\r\n", b"From: Nobody <someone@example.org>\r\n"),
])
def test_from_address_mapped_display_name_kept(field: bytes, expected: bytes) -> None:
    head = b"Subject: hi\r\n" + field + b"To: <u@dest.test>\r\n"
    new, _ = masquerade_from(head, FROM_MAP.lookup)
    assert new == b"Subject: hi\r\n" + expected + b"To: <u@dest.test>\r\n"


def test_every_from_field_is_mapped() -> None:
    head = b"From: a@app1.internal\r\nSubject: x\r\nfrom: B <b@app1.internal>\r\n"
    new, changed = masquerade_from(head, FROM_MAP.lookup)
    assert new == (b"From: noreply@example.com\r\nSubject: x\r\n"
                   b"from: B <noreply@example.com>\r\n")
    assert changed == [("a@app1.internal", "noreply@example.com"),
                       ("b@app1.internal", "noreply@example.com")]


def test_reply_to_set_in_place_or_after_from() -> None:
    head = b"From: A <a@app1.internal>\r\nSubject: x\r\n"
    new, _ = masquerade_from(head, FROM_MAP.lookup, "help@example.com")
    assert new == (b"From: A <noreply@example.com>\r\nReply-To: help@example.com\r\n"
                   b"Subject: x\r\n")
    head = b"Reply-To: old@app1.internal\r\nFrom: a@app1.internal\r\nReply-To: two@x.test\r\n"
    new, _ = masquerade_from(head, FROM_MAP.lookup, "help@example.com")
    assert new == b"Reply-To: help@example.com\r\nFrom: noreply@example.com\r\n"
    # No From: rewritten: Reply-To stays as it was.
    head = b"From: a@example.org\r\nReply-To: r@example.org\r\n"
    assert masquerade_from(head, FROM_MAP.lookup, "help@example.com") == (head, [])


def test_address_spans_in_angle_brackets_with_obsolete_route() -> None:
    value = " Joe <@relay.test:joe@app1.internal>"
    (start, end), = address_spans(value)
    assert value[start:end] == "joe@app1.internal"


# --- removed fields over bytes -------------------------------------------------------------

HEAD = (
    b"Received: from app1 (app1.internal [10.1.2.3])\r\n\tby mx.internal; Mon, 30 Nov 2026\r\n"
    b"Received: from gw.example.org ([198.51.100.7]) by mx; Mon, 30 Nov 2026\r\n"
    b"Received: from v6 ([IPv6:fd00::5]) by mx; Mon, 30 Nov 2026\r\n"
    b"Received: from lo (localhost [127.0.0.1]) by mx; Mon, 30 Nov 2026\r\n"
    b"From: a@example.org\r\n"
    b"X-Mailer: PHP/8.2\r\n"
    b"X-PHP-Originating-Script: 1000:mail.php\r\n"
    b"X-Internal-Host: app1\r\n\tcontinued\r\n"
    b"x-internal-id: 7\r\n"
    b"Subject: X-Mailer stays in a value\r\n"
)


def test_strip_headers_by_name_and_pattern_with_continuations() -> None:
    drop = drops({"x-mailer", "x-php-originating-script"}, [re.compile("^X-Internal-", re.I)])
    new, removed = strip_fields(HEAD, drop)
    assert removed == ["X-Mailer", "X-PHP-Originating-Script", "X-Internal-Host",
                       "x-internal-id"]
    assert new == HEAD.replace(b"X-Mailer: PHP/8.2\r\n", b"").replace(
        b"X-PHP-Originating-Script: 1000:mail.php\r\n", b"").replace(
        b"X-Internal-Host: app1\r\n\tcontinued\r\n", b"").replace(b"x-internal-id: 7\r\n", b"")


def test_strip_received_internal_keeps_public_hops() -> None:
    new, removed = strip_fields(HEAD, drops((), ()), internal_received=True)
    assert removed == ["Received"] * 3
    assert new == HEAD[HEAD.index(b"Received: from gw"):].replace(
        HEAD[HEAD.index(b"Received: from v6"):HEAD.index(b"From:")], b"")


# --- applying the whole ---------------------------------------------------------------------

MESSAGE = (b"From: W <www-data@app1.internal>\r\nX-Mailer: PHP\r\n\r\n"
           b"From: body stays\r\nX-Mailer: body\r\n")


def test_apply_changes_envelope_header_and_never_the_body() -> None:
    rewrites = Rewrites(
        sender=("s", MapEdit(APPS)),
        recipient=("r", MapEdit(make_map({"@app2.internal": "ops@example.com"}))),
        header_from=("f", MapEdit(APPS)),
        archives=(("a", Archive(("archive@example.com", "ops@example.com"), "bulk", "")),),
        strips=(("x", Strip(frozenset({"x-mailer"}), (), False, "X-Mailer")),),
    )
    result = apply(rewrites, "www-data@app1.internal",
                   ("root@app2.internal", "cron@app2.internal", "u@dest.test"), MESSAGE)
    assert result.sender == "noreply@example.com"
    # Two recipients that became one are delivered once.
    assert result.recipients == ("ops@example.com", "u@dest.test")
    assert result.message == (b"From: W <noreply@example.com>\r\n\r\n"
                              b"From: body stays\r\nX-Mailer: body\r\n")
    # An archive address already among the recipients is not sent a second copy.
    assert [(c.recipients, c.route, c.sender) for c in result.copies] == [
        (("archive@example.com",), "bulk", "")]
    assert result.changes == (
        "rewrite_sender <www-data@app1.internal> -> <noreply@example.com> (rule s)",
        "rewrite_recipient <root@app2.internal> -> <ops@example.com> (rule r)",
        "rewrite_recipient <cron@app2.internal> -> <ops@example.com> (rule r)",
        "rewrite_recipient <ops@example.com> twice: delivered once (rule r)",
        "rewrite_header_from www-data@app1.internal -> noreply@example.com (rule f)",
        "strip X-Mailer (rule x)",
        "archive copy to <archive@example.com> from <> route bulk (rule a)",
    )


def test_null_sender_is_never_rewritten() -> None:
    result = apply(Rewrites(sender=("s", MapEdit(make_map({"re:.*": "x@example.com"})))),
                   "", ("u@dest.test",), MESSAGE)
    assert result.sender == "" and result.changes == ()


# --- loading --------------------------------------------------------------------------------


def test_file_map_is_read_with_lines(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    (policies / "maps").mkdir(parents=True)
    (policies / "maps" / "senders.txt").write_text(
        "# app servers\nwww-data@app1.internal  noreply@example.com\n@app2.internal @example.com\n")
    (policies / "10.toml").write_text(
        '[maps]\nsenders = "file:maps/senders.txt"\n'
        '[[rule]]\nname = "s"\naction = "rewrite_sender"\nmap = "@senders"\n'
        '[[rule]]\nname = "all"\nmatch.client_address = "0.0.0.0/0"\naction = "accept"\n')
    policy = load_policy(policies)
    assert policy.maps["senders"].lookup("x@app2.internal") == "x@example.com"
    (policies / "maps" / "senders.txt").write_text("one two three\n@a.test @b.test\n"
                                                  "@b.test @a.test\n")
    with pytest.raises(ConfigError) as info:
        load_policy(policies)
    assert info.value.messages == [
        "policies/10.toml: maps.senders: policies/maps/senders.txt:1: expected \"key value\" "
        "(two words), got 'one two three'",
        'policies/10.toml: maps.senders: policies/maps/senders.txt:2: "@a.test": rewrites to '
        '"@b.test", which the map rewrites again to "user@a.test" (a map is applied once: '
        "write the final address)",
        'policies/10.toml: maps.senders: policies/maps/senders.txt:3: "@b.test": rewrites to '
        '"@a.test", which the map rewrites again to "user@b.test" (a map is applied once: '
        "write the final address)",
    ]


def test_first_rewrite_of_a_kind_wins_archives_and_strips_add_up(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "10.toml").write_text(
        '[[rule]]\nname = "first"\naction = "rewrite_sender"\n'
        'map = { "@a.test" = "x@example.com" }\n'
        '[[rule]]\nname = "second"\naction = "rewrite_sender"\n'
        'map = { "@a.test" = "y@example.com" }\n'
        '[[rule]]\nname = "arch1"\naction = "archive"\narchive_to = "one@example.com"\n'
        '[[rule]]\nname = "arch2"\naction = "archive"\narchive_to = ["two@example.com"]\n'
        'archive_route = "bulk"\n'
        '[[rule]]\nname = "all"\nmatch.client_address = "0.0.0.0/0"\naction = "accept"\n'
        '[[rule]]\nname = "below"\naction = "strip"\nstrip_headers = ["X-Never"]\n')
    policy = load_policy(policies, upstream_groups={"default", "bulk"})
    facts = Facts("192.0.2.1", sender="s@a.test", recipients=("u@dest.test",),
                  message=b"From: s@a.test\r\n\r\n")
    decision = asyncio.run(evaluate(policy, "data", facts, StaticChecks(), trace=True))
    rewrites = decision.rewrites
    assert rewrites.sender is not None and rewrites.sender[0] == "first"
    assert [(rule, a.recipients, a.route) for rule, a in rewrites.archives] == [
        ("arch1", ("one@example.com",), None), ("arch2", ("two@example.com",), "bulk")]
    assert rewrites.strips == ()  # below the accept rule: never reached
    assert ("rule \"second\" [rewrite_sender]: matched, map inline (ignored: rule 'first' "
            "already rewrites)") in decision.trace


def test_a_message_without_body_is_all_header() -> None:
    result = apply(Rewrites(header_from=("f", MapEdit(APPS))), "s@a.test", ("u@dest.test",),
                   b"From: www-data@app1.internal\r\nSubject: no body\r\n")
    assert result.message == b"From: noreply@example.com\r\nSubject: no body\r\n"


def test_cases_file_checks_the_rewritten_envelope(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "10.toml").write_text(
        '[[rule]]\nname = "s"\naction = "rewrite_sender"\n'
        'map = { "@app1.internal" = "noreply@example.com" }\n'
        '[[rule]]\nname = "r"\naction = "rewrite_recipient"\n'
        'map = { "root@app1.internal" = "ops@example.com" }\n'
        '[[rule]]\nname = "all"\nmatch.client_address = "192.0.2.0/24"\naction = "accept"\n')
    (tmp_path / "cases.toml").write_text(
        '[[case]]\nname = "as the company"\nclient_address = "192.0.2.1"\n'
        'from = "www-data@app1.internal"\nto = ["root@app1.internal", "u@dest.test"]\n'
        'expect = "accept"\nexpect_sender = "noreply@example.com"\n'
        'expect_recipients = ["ops@example.com", "u@dest.test"]\n'
        '[[case]]\nname = "wrong on purpose"\nclient_address = "192.0.2.1"\n'
        'from = "www-data@app1.internal"\nto = ["root@app1.internal"]\n'
        'expect = "accept"\nexpect_sender = "www-data@app1.internal"\n'
        'expect_recipients = ["root@app1.internal"]\n'
        '[[case]]\nname = "refused stores nothing"\nclient_address = "203.0.113.1"\n'
        'from = "www-data@app1.internal"\nto = ["u@dest.test"]\n'
        'expect = "reject"\nexpect_sender = "<>"\n')
    runtime = Runtime(Settings(hostname="relay.test"), load_policy(policies))
    text, status = run_cases(runtime, tmp_path / "cases.toml")
    lines = text.splitlines()
    assert status == 1
    assert lines[0] == "ok   as the company: accept (rule all): 250"
    assert lines[1] == (
        "FAIL wrong on purpose: expected sender <www-data@app1.internal>, got "
        "<noreply@example.com>; expected recipients <root@app1.internal>, got "
        "<ops@example.com>; accept (rule all): 250")
    assert any(line.startswith("FAIL refused stores nothing: expected sender <>, got "
                               "nothing stored;") for line in lines)
    assert lines[-1] == "3 cases, 1 passed, 2 failed"
