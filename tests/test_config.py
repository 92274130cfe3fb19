"""Loading settings: defaults, the shipped config.toml, flags, and every error at once."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from relay import config, replies

BAD = Path(__file__).parent / "bad_configs"


def without_source(settings: config.Settings) -> config.Settings:
    return dataclasses.replace(settings, source="")


def test_shipped_config_toml_shows_exactly_the_embedded_defaults():
    assert without_source(config.load(ROOT / "config.toml")) == without_source(config.load(None))


def test_embedded_defaults_are_closed_and_local():
    settings = config.load(None)
    assert [(s.host, s.port) for s in settings.listeners] == [("127.0.0.1", 2525)]
    assert [str(n) for n in settings.relay_networks] == ["127.0.0.0/8", "::1/128"]
    assert settings.upstreams["default"].hosts == (("127.0.0.1", 25),)
    assert settings.queue.max_lifetime == 5 * 86400


def test_flags_override_the_file():
    settings = config.load(None, config.Overrides(
        listen=("127.0.0.1:2600", "[::1]:2601"), upstream="mx.example.test:587",
        spool_dir="/tmp/q", hostname="relay.example.test", allow=("10.1.0.0/16",),
    ))
    assert [(s.name, s.host, s.port) for s in settings.listeners] == [
        ("smtp", "127.0.0.1", 2600), ("smtp2", "::1", 2601)]
    assert settings.upstreams["default"].hosts == (("mx.example.test", 587),)
    assert settings.spool_path == Path("/tmp/q")
    assert settings.smtp_hostname == "relay.example.test"
    assert [str(n) for n in settings.relay_networks] == ["10.1.0.0/16"]


def test_bad_flags_are_reported_together():
    with pytest.raises(config.ConfigError) as failed:
        config.load(None, config.Overrides(listen=("nowhere",), allow=("10.0.0.0/40",)))
    assert failed.value.messages == [
        "--listen: expected \"ADDRESS:PORT\", got 'nowhere'",
        "--allow: expected an IP address or CIDR network, got '10.0.0.0/40'",
    ]


@pytest.mark.parametrize("case", sorted(p.stem for p in BAD.glob("*.toml")))
def test_check_reports_each_broken_config(case: str):
    result = run_cli("check", "--config", f"{case}.toml", cwd=BAD)
    assert result.returncode == 78
    assert result.stderr == (BAD / f"{case}.expected").read_text()


def test_check_accepts_the_shipped_config():
    result = run_cli("check", "--config", "config.toml")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"config.toml: ok\n{ROOT / 'policies'}: ok (9 rules)\n"


def test_version():
    result = run_cli("--version")
    assert result.stdout.startswith("policy-relay ")


def test_every_reply_in_the_table_agrees_with_its_class():
    for reply in replies.TABLE:
        assert str(reply.code)[0] == reply.status[0], reply
        assert str(reply) == f"{reply.code} {reply.status} {reply.text}"


@pytest.mark.parametrize("code,status", [(451, "5.7.1"), (250, "4.0.0"), (550, "2.1.0")])
def test_a_reply_whose_classes_disagree_cannot_exist(code: int, status: str):
    with pytest.raises(ValueError):
        replies.Reply(code, status, "text")


CHANGED = """
[server]
hostname = "relay.example.test"
max_message_size = "10M"
workers = 2
idle_timeout = "90s"

[listener.smtp]
address = "127.0.0.1:2600"

[listener.submission]
address = "127.0.0.1:2601"
auth_plaintext_loopback = true

[upstream.default]
hosts = ["smtp.example.test:587"]
pool_size = 4

[upstream.bulk]
hosts = ["bulk.example.test:25"]

[queue]
retry_schedule = ["1m", "5m"]

[ratelimit]
redis_url = "redis://relay:hunter2@10.0.0.5:6379/0"

[[events.sink]]
name = "fleet"
type = "redis"
url = "redis://relay:hunter2@10.0.0.5:6379/1"
events = ["bounced"]
"""


@pytest.mark.parametrize("changed", [False, True])
def test_config_dump_loads_back_as_the_same_config(tmp_path: Path, changed: bool):
    original = tmp_path / "config.toml"
    original.write_text(CHANGED)
    args = ["config", "dump", "--config", str(original)] + (["--changed"] if changed else [])
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout and "<redacted>" in result.stdout
    pasted = tmp_path / "pasted.toml"
    pasted.write_text(result.stdout.replace("<redacted>", "hunter2"))
    assert without_source(config.load(pasted)) == without_source(config.load(original))
    assert "300.0" not in result.stdout and "metrics_listen" not in result.stdout


def test_config_dump_changed_is_only_what_differs():
    result = run_cli("config", "dump", "--changed", "--config", "config.toml")
    assert (result.returncode, result.stdout) == (0, "")
    result = run_cli("config", "dump", "--changed", "--config",
                     str(BAD / "many-errors.toml"))
    assert result.returncode == 78


def test_sizes_and_durations_are_strict(tmp_path: Path):
    path = tmp_path / "config.toml"
    for text in ('max_message_size = "25MB"', 'max_message_size = "25 M"',
                 'idle_timeout = "5 min"', 'idle_timeout = "1.5.3s"'):
        path.write_text(f"[server]\n{text}\n")
        with pytest.raises(config.ConfigError):
            config.load(path)
    path.write_text('[server]\nmax_message_size = "25m"\nidle_timeout = "1.5s"\n')
    settings = config.load(path)
    assert settings.inbound.max_message_size == 25 * 1024 * 1024


def test_hostname_defaults_to_the_name_hostname_f_gives():
    binary = shutil.which("hostname")
    if binary is None:
        pytest.skip("no hostname command to compare with")
    expected = subprocess.run([binary, "-f"], capture_output=True, text=True, timeout=10)
    if expected.returncode != 0:
        pytest.skip(f"hostname -f fails here: {expected.stderr.strip()}")
    assert config.load(None).smtp_hostname == expected.stdout.strip()
    assert config.is_localhost("localhost") and config.is_localhost("LOCALHOST.localdomain")
    assert not config.is_localhost("relay.example.com")
