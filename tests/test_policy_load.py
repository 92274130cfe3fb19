"""Loading policies: the shipped set, merging across files, and broken sets with their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import ConfigError
from relay.policy import load_policy

HERE = Path(__file__).parent
BAD = HERE / "bad_policies"
SHIPPED = HERE.parent / "policies"


def write(directory: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return directory


@pytest.mark.parametrize("case", sorted(p.name for p in BAD.iterdir() if p.is_dir()))
def test_bad_policy_set_reports_exact_errors(case: str) -> None:
    # Each folder is a policies directory; expected.txt holds every error (or, for a set
    # that loads, every warning prefixed "warning: "), named relative to the folder's parent.
    directory = BAD / case
    expected = (directory / "expected.txt").read_text().splitlines()
    try:
        policy = load_policy(directory, upstream_groups={"default", "bulk"})
    except ConfigError as exc:
        got = exc.messages
    else:
        got = [f"warning: {w}" for w in policy.warnings]
    assert got == expected


def test_errors_from_several_files_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_policy(BAD / "several_files", upstream_groups={"default"})
    files = {m.split(":", 1)[0] for m in info.value.messages}
    assert files == {
        "several_files/10-relay.toml",
        "several_files/20-limits.toml",
        "several_files/30-size.toml",
    }
    assert str(info.value).count("\n") == len(info.value.messages) - 1


def test_shipped_policies_load_cleanly() -> None:
    policy = load_policy(
        SHIPPED, upstream_groups={"default"},
        builtin_lists={"relay_networks": ("127.0.0.0/8", "::1/128")},
    )
    assert policy.warnings == ()
    assert [r.name for r in policy.rules] == [
        "spf-fail-own-domain", "spf-temperror-own-domain", "spf-other-own-domain",
        "dmarc-outbound-own-domain", "dkim-results", "suppressed-recipients",
        "relay-networks", "authenticated", "app-servers",
    ]
    assert policy.final_action == "reject"
    assert policy.delay_reject is True
    assert policy.lists["app_servers"] == ("192.0.2.0/24", "2001:db8:20::/48")


def test_files_load_in_name_order_and_merge_lists_and_limits(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "20-late.toml": '[[rule]]\nname = "second"\nmatch.client_address = "@b"\n'
            'action = "accept"\n',
            "10-early.toml": '[lists]\na = ["192.0.2.1"]\nb = ["192.0.2.2"]\n'
            '[[rule]]\nname = "first"\nmatch.client_address = "@a"\naction = "accept"\n'
            '[limit.rcpt]\nkey = ["client_address"]\nrate = "10/1m"\nburst = 5\n'
            'count = "recipient"\n',
            "30-x.toml": '[[rule]]\nname = "third"\nover_limit = "rcpt"\naction = "tempfail"\n',
            "notes.txt": "not a policy file",
        },
    )
    policy = load_policy(tmp_path)
    assert [r.name for r in policy.rules] == ["first", "second", "third"]
    assert policy.files == tuple(
        f"{tmp_path.name}/{n}" for n in ("10-early.toml", "20-late.toml", "30-x.toml")
    )
    assert policy.limits["rcpt"].count == "recipient"
    assert policy.rules[2].stage == 3  # a recipient-counting limit is known at rcpt


def test_file_lists_skip_comments_and_are_reread_on_every_load(tmp_path: Path) -> None:
    listed = tmp_path / "lists" / "apps.txt"
    write(
        tmp_path,
        {
            "10.toml": '[lists]\napps = ["file:lists/apps.txt", "192.0.2.9"]\n'
            '[[rule]]\nname = "apps"\nmatch.client_address = "@apps"\naction = "accept"\n',
            "lists/apps.txt": "# app servers\n\n192.0.2.1   # web1\n2001:db8::/64\n",
        },
    )
    assert load_policy(tmp_path).lists["apps"] == ("192.0.2.1", "2001:db8::/64", "192.0.2.9")
    listed.write_text("198.51.100.0/24\nnot-an-address\n")
    with pytest.raises(ConfigError) as info:
        load_policy(tmp_path)
    assert info.value.messages == [
        f'{tmp_path.name}/10.toml: rule "apps": match.client_address: list "apps" '
        f"({tmp_path.name}/lists/apps.txt:2): expected an IP address or CIDR network, "
        "got 'not-an-address'"
    ]


def test_unused_lists_and_limits_are_warnings(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "10.toml": '[lists]\nspare = ["x"]\n[limit.idle]\nkey = ["sender"]\n'
            'rate = "1/1s"\nburst = 1\n',
        },
    )
    policy = load_policy(tmp_path)
    assert policy.warnings == (
        f"{tmp_path.name}/10.toml: lists.spare: not used by any rule",
        f"{tmp_path.name}/10.toml: limit.idle: not used by any rule",
    )


def test_empty_directory_is_closed(tmp_path: Path) -> None:
    policy = load_policy(tmp_path)
    assert policy.rules == ()
    assert policy.final_action == "reject"
    assert policy.final_reply is not None
    assert str(policy.final_reply.reply) == "554 5.7.1 <{recipient}>: Relay access denied"


def test_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_policy(tmp_path / "nope")
    assert info.value.messages == [f"{tmp_path / 'nope'}: not a directory"]


def test_defer_is_stored_as_tempfail_with_the_default_reply(tmp_path: Path) -> None:
    write(tmp_path, {"10.toml": '[[rule]]\nname = "later"\naction = "defer"\n'})
    (rule,) = load_policy(tmp_path).rules
    assert rule.action == "tempfail"
    assert rule.reply is not None and str(rule.reply.reply) == "451 4.7.1 Try again later"
