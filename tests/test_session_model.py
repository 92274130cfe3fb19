"""The one session model in a live relay: the HELO stage runs, SPF sees the HELO name, and
a reload reaches the next transaction of an open connection."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest
from conftest import RelayProcess, Sink, run_cli, wait_until
from dnsserver import DnsServer, dnsmasq

MESSAGE = b"From: app@example.test\r\nSubject: model\r\n\r\nbody\r\n"

POLICY = """
[[rule]]
name = "bad-helo"
match.helo_name = "bad.example"
action = "reject"
message = "550 5.7.1 Go away, {helo_name}"

[[rule]]
name = "blocked"
match.sender = "@blocked"
action = "reject"

[[rule]]
name = "spf-header"
match.sender = "<>"
action = "tag"
add_headers = { "X-Null-SPF" = "{spf}" }

[[rule]]
name = "loopback"
match.client_address = "127.0.0.0/8"
action = "accept"
"""


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    # The HELO identity's SPF record (RFC 7208 section 2.3): only it can say "pass" for
    # the null sender, since there is no MAIL FROM domain to look up.
    with dnsmasq({"helo.test": "v=spf1 ip4:127.0.0.1 -all"}) as server:
        yield server


def write_policy(directory: Path, blocked: str = "nobody@example.test") -> Path:
    policies = directory / "policies"
    policies.mkdir(exist_ok=True)
    lists = f'[lists]\nblocked = ["{blocked}"]\n'
    (policies / "10-test.toml").write_text(lists + POLICY)
    return policies


@pytest.fixture
def relay(tmp_path: Path, sink: Sink, dns: DnsServer, start_relay) -> RelayProcess:
    policies = write_policy(tmp_path)
    return start_relay(
        sink.port, extra=f'policies_dir = "{policies}"',
        sections=f'\n[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\ntimeout = "1s"\n',
    )


async def test_a_helo_rule_refuses_a_live_session_at_rcpt(relay: RelayProcess):
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port,
                               local_hostname="bad.example") as client:
        await client.ehlo()
        # delay_reject (the default): the refusal comes at RCPT, naming the recipient.
        assert (await client.mail("app@example.test")).code == 250
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt("ops@dest.test")
    assert (refused.value.code, refused.value.message) == (550, "5.7.1 Go away, bad.example")
    assert "rule=bad-helo" in relay.log_text()


def test_the_dry_run_says_the_same_for_that_helo(relay: RelayProcess):
    result = run_cli("test", "--config", str(relay.config), "--helo", "bad.example",
                     "--from", "app@example.test", "--to", "ops@dest.test")
    assert result.returncode == 5, result.stdout + result.stderr
    assert result.stdout.endswith(
        "result: reject (rule bad-helo): client sees 550 5.7.1 Go away, bad.example\n"
    )


async def test_spf_for_the_null_sender_checks_the_helo_name(relay: RelayProcess, sink: Sink):
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port,
                               local_hostname="helo.test") as client:
        await client.sendmail("", ["ops@dest.test"], MESSAGE)
    [got] = sink.wait_messages(1)
    assert b"X-Null-SPF: pass\r\n" in got.data
    head = got.data.split(b"\r\n\r\n")[0]
    unfolded = head.replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ").split(b"\r\n")
    [received_spf] = [line for line in unfolded if line.startswith(b"Received-SPF:")]
    assert received_spf.startswith(b"Received-SPF: pass")
    assert b" helo=helo.test;" in received_spf


async def test_a_reload_reaches_the_next_transaction_of_an_open_connection(
    relay: RelayProcess, tmp_path: Path
):
    assert relay.proc is not None
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port) as client:
        await client.sendmail("app@example.test", ["ops@dest.test"], MESSAGE)
        write_policy(tmp_path, blocked="app@example.test")
        relay.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded configuration" in relay.log_text(), what="the reload")
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            await client.sendmail("app@example.test", ["ops@dest.test"], MESSAGE)
    [rejected] = refused.value.recipients
    assert (rejected.code, rejected.message) == (550, "5.7.1 Message rejected by policy")


@pytest.mark.parametrize("address", ["root", '"quoted"@example.org', "user%host@example.org"])
def test_the_dry_run_refuses_what_the_relay_refuses(address: str):
    result = run_cli("test", "--from", "app@example.test", "--to", address)
    assert result.returncode == 5, result.stdout + result.stderr
    assert "  -> reject (the server's own check): 501 5.1.3 Bad recipient address syntax\n" \
        in result.stdout
    assert result.stdout.endswith("client sees 501 5.1.3 Bad recipient address syntax\n")


HELO_POLICY = """
[[rule]]
name = "helo-spf"
match.spf_helo = ["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
match.spf = ["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
action = "tag"
add_headers = { "X-HELO-SPF" = "{spf_helo} {spf}" }

[[rule]]
name = "loopback"
match.client_address = "127.0.0.0/8"
action = "accept"
"""


async def test_helo_identity_is_its_own_field_and_recorded(
    tmp_path: Path, sink: Sink, dns: DnsServer, start_relay
):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "10-test.toml").write_text(HELO_POLICY)
    relay = start_relay(
        sink.port, extra=f'policies_dir = "{policies}"',
        sections=f'\n[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\ntimeout = "1s"\n',
    )
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port,
                               local_hostname="helo.test") as client:
        await client.sendmail("app@example.test", ["ops@dest.test"], MESSAGE)
        await client.sendmail("", ["ops@dest.test"], MESSAGE)
    mailfrom, null = sink.wait_messages(2)
    # RFC 7208 section 2.3: the HELO name has its own result, beside MAIL FROM's.
    assert b"X-HELO-SPF: pass none\r\n" in mailfrom.data
    head = mailfrom.data.split(b"\r\n\r\n")[0]
    unfolded = head.replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    assert b"spf=none smtp.mailfrom=app@example.test; spf=pass smtp.helo=helo.test" in unfolded
    received = [line for line in unfolded.split(b"\r\n") if line.startswith(b"Received-SPF:")]
    assert len(received) == 2
    assert any(b"identity=helo;" in r and b"helo=helo.test;" in r for r in received)
    # RFC 7208 section 2.4: for the null sender the two are one check, recorded once.
    assert b"X-HELO-SPF: pass pass\r\n" in null.data
    null_head = null.data.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    assert null_head.count(b"Received-SPF:") == 1
    assert b"spf=pass smtp.helo=helo.test" in null_head
