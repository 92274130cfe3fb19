"""TLS (STARTTLS and implicit), require_tls, AUTH only over TLS, the users file, swaks."""

from __future__ import annotations

import base64
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import pytest
import trustme
from conftest import ROOT, RelayProcess, Sink, free_port, wait_until
from smtpraw import RawSMTP

from relay.inbound import users

PASSWORD = "correct horse"
MESSAGE = b"From: app@example.test\r\nTo: ops@dest.test\r\nSubject: tls\r\n\r\nHello.\r\n"


@dataclass
class TLSRelay:
    relay: RelayProcess
    sink: Sink
    ca: trustme.CA
    directory: Path
    ports: dict[str, int]

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def write_cert(ca: trustme.CA, directory: Path) -> bytes:
    leaf = ca.issue_cert("relay.test", "127.0.0.1")
    leaf.private_key_pem.write_to_path(str(directory / "key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    return leaf.cert_chain_pems[0].bytes()


def passwd(users_file: Path, user: str, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "passwd", "--file", str(users_file), user],
        input=password + "\n", capture_output=True, text=True, timeout=60, cwd=ROOT,
    )


def start(directory: Path, sink: Sink, ca: trustme.CA) -> TLSRelay:
    write_cert(ca, directory)
    users_file = directory / "users"
    assert passwd(users_file, "alice", PASSWORD).returncode == 0
    ports = {name: free_port() for name in ("submission", "smtps", "strict", "local")}
    tls = f'tls_cert = "{directory}/cert.pem"\ntls_key = "{directory}/key.pem"'
    auth = f'auth = "optional"\nusers_file = "{users_file}"'
    text = f"""
[server]
hostname = "relay.test"
workers = 1  # one spool.db to look into
# Loopback clients may not relay on their address: only AUTH lets them.
relay_networks = ["192.0.2.0/24"]
max_auth_failures = 3

[listener.submission]
address = "127.0.0.1:{ports['submission']}"
tls = "starttls"
{tls}
{auth}

[listener.smtps]
address = "127.0.0.1:{ports['smtps']}"
tls = "implicit"
{tls}
auth = "required"
users_file = "{users_file}"

[listener.strict]
address = "127.0.0.1:{ports['strict']}"
tls = "starttls"
{tls}
require_tls = true

[listener.local]
address = "127.0.0.1:{ports['local']}"
{auth}
auth_plaintext_loopback = true

[upstream.default]
hosts = ["127.0.0.1:{sink.port}"]

[queue]
spool_dir = "{directory}/spool"
minimal_backoff = "0.3s"

[metrics]
listen = ""

[control]
socket = "{directory}/control.sock"
"""
    relay = RelayProcess(directory, text, ports["submission"]).start()
    for port in ports.values():
        wait_until(lambda p=port: _listening(p), what=f"port {port}")
    return TLSRelay(relay, sink, ca, directory, ports)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def tls_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSRelay]:
    sink = Sink()
    sink.start()
    setup = start(tmp_path_factory.mktemp("tls"), sink, trustme.CA())
    yield setup
    setup.relay.stop()
    sink.stop()


@pytest.fixture
def relay(tls_relay: TLSRelay) -> TLSRelay:
    tls_relay.sink.handler.messages.clear()
    return tls_relay


def plain(login: str, password: str) -> bytes:
    return base64.b64encode(f"\0{login}\0{password}".encode())


def test_no_auth_before_starttls_and_538_if_tried(relay: TLSRelay):
    with RawSMTP(relay.ports["submission"]) as raw:
        raw.reply()
        [ehlo] = raw.chat(b"EHLO client.test\r\n")
        assert ehlo.endswith("250-SMTPUTF8\n250 STARTTLS")
        assert "AUTH" not in ehlo
        assert raw.chat(b"AUTH PLAIN " + plain("alice", PASSWORD) + b"\r\n") == [
            "538 5.7.11 Encryption required for requested authentication mechanism"
        ]


async def test_auth_after_starttls_lets_a_client_relay(relay: TLSRelay):
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.ports["submission"],
                             start_tls=True, tls_context=relay.client_context())
    async with client:
        await client.ehlo()
        assert "starttls" not in client.esmtp_extensions
        assert client.server_auth_methods == ["plain", "login"]
        await client.mail("app@example.test")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt("ops@dest.test")
        assert refused.value.code == 554  # not in relay_networks, not logged in
        await client.rset()
        response = await client.auth_plain("alice", PASSWORD)
        assert (response.code, response.message) == (235, "2.7.0 Authentication successful")
        _, reply = await client.sendmail("app@example.test", ["ops@dest.test"], MESSAGE)
    assert reply.startswith("2.0.0 Ok: queued as")
    [got] = relay.sink.wait_messages(1)
    assert b"(policy-relay) with ESMTPSA id" in got.data
    assert "AUTH PLAIN ok: user=alice client=[127.0.0.1] listener=submission" in (
        relay.relay.log_text()
    )


async def test_auth_login_mechanism_works_too(relay: TLSRelay):
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.ports["submission"],
                             start_tls=True, tls_context=relay.client_context())
    async with client:
        await client.ehlo()
        response = await client.auth_login("alice", PASSWORD)
        assert response.code == 235


def test_wrong_credentials_get_535_and_repeated_failures_421(relay: TLSRelay):
    context = relay.client_context()
    # A source address of its own: failures are counted per client address.
    with RawSMTP(relay.ports["submission"], source="127.0.0.5") as raw:
        raw.reply()
        raw.chat(b"EHLO client.test\r\n")
        assert raw.chat(b"STARTTLS\r\n") == ["220 2.0.0 Ready to start TLS"]
        raw.starttls(context)
        raw.chat(b"EHLO client.test\r\n")
        said = raw.chat(b"AUTH PLAIN " + plain("alice", "wrong") + b"\r\n"
                        b"AUTH PLAIN " + plain("mallory", PASSWORD) + b"\r\n"
                        b"AUTH PLAIN " + plain("alice", "guess") + b"\r\n", 3)
        assert said == ["535 5.7.8 Authentication credentials invalid"] * 2 + [
            "421 4.7.0 Too many authentication failures, closing connection"
        ]
        assert raw.closed()
    with RawSMTP(relay.ports["submission"], source="127.0.0.5") as raw:
        raw.reply()
        raw.chat(b"EHLO client.test\r\n")
        raw.chat(b"STARTTLS\r\n")
        raw.starttls(context)
        raw.chat(b"EHLO client.test\r\n")
        # Even the right password: this client is shut out for a while.
        assert raw.chat(b"AUTH PLAIN " + plain("alice", PASSWORD) + b"\r\n") == [
            "421 4.7.0 Too many authentication failures, closing connection"
        ]


def test_implicit_tls_with_auth_required(relay: TLSRelay):
    with RawSMTP(relay.ports["smtps"], tls=relay.client_context()) as raw:
        assert raw.reply() == "220 relay.test ESMTP"
        [ehlo] = raw.chat(b"EHLO client.test\r\n")
        assert ehlo.endswith("250-SMTPUTF8\n250 AUTH PLAIN LOGIN")
        assert "STARTTLS" not in ehlo
        assert raw.chat(b"STARTTLS\r\n") == ["503 5.5.1 Error: TLS already active"]
        assert raw.chat(b"MAIL FROM:<app@example.test>\r\n") == [
            "530 5.7.0 Authentication required"
        ]
        assert raw.chat(b"AUTH PLAIN " + plain("alice", PASSWORD) + b"\r\n") == [
            "235 2.7.0 Authentication successful"
        ]
        said = raw.chat(b"MAIL FROM:<app@example.test>\r\nRCPT TO:<ops@dest.test>\r\nDATA\r\n"
                        + MESSAGE + b".\r\n", 4)
        assert said[3].startswith("250 2.0.0 Ok: queued as")
    [got] = relay.sink.wait_messages(1)
    assert b"with ESMTPSA id" in got.data


def test_require_tls_refuses_mail_before_starttls(relay: TLSRelay):
    with RawSMTP(relay.ports["strict"]) as raw:
        raw.reply()
        raw.chat(b"EHLO client.test\r\n")
        assert raw.chat(b"MAIL FROM:<app@example.test>\r\n") == [
            "530 5.7.0 Must issue a STARTTLS command first"
        ]
        raw.chat(b"STARTTLS\r\n")
        raw.starttls(relay.client_context())
        raw.chat(b"EHLO client.test\r\n")
        assert raw.chat(b"MAIL FROM:<app@example.test>\r\n") == ["250 2.1.0 Ok"]


def test_commands_pipelined_after_starttls_are_discarded(relay: TLSRelay):
    with RawSMTP(relay.ports["submission"]) as raw:
        raw.reply()
        raw.chat(b"EHLO client.test\r\n")
        # STARTTLS command injection (CVE-2011-0411): a man in the middle appends
        # a plaintext command to the STARTTLS segment.
        assert raw.chat(b"STARTTLS\r\nMAIL FROM:<mitm@evil.test>\r\n") == [
            "220 2.0.0 Ready to start TLS"
        ]
        raw.starttls(relay.client_context())
        raw.chat(b"EHLO client.test\r\n")
        assert raw.chat(b"RCPT TO:<ops@dest.test>\r\n") == ["503 5.5.1 Error: need MAIL command"]


def test_plaintext_auth_only_where_a_listener_allows_it_for_loopback(relay: TLSRelay):
    with RawSMTP(relay.ports["local"]) as raw:
        raw.reply()
        [ehlo] = raw.chat(b"EHLO client.test\r\n")
        assert ehlo.endswith("250 AUTH PLAIN LOGIN")
        assert raw.chat(b"AUTH PLAIN " + plain("alice", PASSWORD) + b"\r\n") == [
            "235 2.7.0 Authentication successful"
        ]


def _swaks_tls() -> bool:
    # swaks does TLS through Net::SSLeay (Debian: libnet-ssleay-perl, only "recommended").
    return shutil.which("swaks") is not None and subprocess.run(
        ["perl", "-MNet::SSLeay", "-e", "1"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _swaks_tls(), reason="swaks or its Net::SSLeay is not installed")
@pytest.mark.parametrize("listener,tls_flag", [("submission", "--tls"),
                                               ("smtps", "--tls-on-connect")])
def test_swaks_with_tls_and_auth(relay: TLSRelay, listener: str, tls_flag: str):
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{relay.ports[listener]}", tls_flag,
         "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", PASSWORD,
         "--from", "cron@example.test", "--to", "ops@dest.test", "--helo", "app1.test",
         "--header", "Subject: swaks tls"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<~  235 2.7.0 Authentication successful" in result.stdout
    assert "<~  250 2.0.0 Ok: queued as" in result.stdout
    [got] = relay.sink.wait_messages(1)
    assert b"Subject: swaks tls" in got.data


def test_passwd_writes_a_salted_scrypt_entry(tmp_path: Path):
    users_file = tmp_path / "users"
    assert passwd(users_file, "bob", "pw1").returncode == 0
    assert passwd(users_file, "carol", "pw1").returncode == 0
    result = passwd(users_file, "bob", "pw2")
    assert result.stdout == f"{users_file}: password set for bob\n"
    entries = users.read_users(users_file)
    assert sorted(entries) == ["bob", "carol"]
    assert entries["bob"].startswith("$scrypt$ln=15,r=8,p=1$")
    assert users.check(users_file, b"bob", b"pw2")
    assert not users.check(users_file, b"bob", b"pw1")
    assert not users.check(users_file, b"nobody", b"pw1")
    # Readable by the group of its directory (the service's, under systemd), nobody else.
    assert users_file.stat().st_mode & 0o777 == 0o640
    assert users_file.stat().st_gid == users_file.parent.stat().st_gid
    assert passwd(users_file, "bad:name", "x").returncode == 64


def test_sighup_reloads_the_certificate(tmp_path: Path):
    sink = Sink()
    sink.start()
    ca = trustme.CA()
    setup = start(tmp_path, sink, ca)
    try:
        port = setup.ports["smtps"]
        before = ssl.get_server_certificate(("127.0.0.1", port))
        new = write_cert(ca, tmp_path)
        assert setup.relay.proc is not None
        setup.relay.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded TLS certificate" in setup.relay.log_text(),
                   what="the reload")
        after = ssl.get_server_certificate(("127.0.0.1", port))
        assert after != before
        assert ssl.PEM_cert_to_DER_cert(after) == ssl.PEM_cert_to_DER_cert(new.decode())
        # STARTTLS listeners share the context, so they serve the new one too.
        with RawSMTP(setup.ports["submission"]) as raw:
            raw.reply()
            raw.chat(b"EHLO client.test\r\nSTARTTLS\r\n", 2)
            raw.starttls(setup.client_context())
            assert raw.sock.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(
                new.decode())
    finally:
        setup.relay.stop()
        sink.stop()


# -- every refusal in one log shape ------------------------------------------------------


def refusal_lines(relay: TLSRelay, code: str) -> list[str]:
    return [line.split("relay.inbound: ", 1)[1] for line in relay.relay.log_text().splitlines()
            if "NOQUEUE: reject: " in line and f"]: {code} " in line]


def test_530_538_and_535_are_logged_like_every_other_refusal(relay: TLSRelay):
    with RawSMTP(relay.ports["strict"]) as raw:
        raw.reply()
        raw.chat(b"EHLO client.test\r\n")
        raw.chat(b"MAIL FROM:<app@example.test>\r\n")
    with RawSMTP(relay.ports["submission"]) as raw:
        raw.reply()
        raw.chat(b"EHLO client.test\r\n")
        raw.chat(b"AUTH PLAIN " + plain("alice", PASSWORD) + b"\r\n")
    with RawSMTP(relay.ports["submission"], source="127.0.0.9") as raw:
        raw.reply()
        raw.chat(b"EHLO client.test\r\n")
        raw.chat(b"STARTTLS\r\n")
        raw.starttls(relay.client_context())
        raw.chat(b"EHLO client.test\r\n")
        raw.chat(b"AUTH PLAIN " + plain("alice", "wrong") + b"\r\n")
    # Other tests on this relay log 535s too: wait for this session's own line.
    wait_until(lambda: any("[127.0.0.9]" in line for line in refusal_lines(relay, "535")),
               what="the 535 line")
    assert ("NOQUEUE: reject: MAIL from [127.0.0.1]: 530 5.7.0 Must issue a STARTTLS command "
            "first; from=<> helo=<client.test> listener=strict rule=require_tls"
            ) in refusal_lines(relay, "530")
    assert ("NOQUEUE: reject: AUTH from [127.0.0.1]: 538 5.7.11 Encryption required for "
            "requested authentication mechanism; from=<> helo=<client.test> "
            "listener=submission rule=auth_needs_tls") in refusal_lines(relay, "538")
    assert ("NOQUEUE: reject: AUTH from [127.0.0.9]: 535 5.7.8 Authentication credentials "
            "invalid; from=<> helo=<client.test> sasl_method=PLAIN sasl_username=alice "
            "listener=submission rule=auth_failed") in refusal_lines(relay, "535")


async def test_the_message_line_names_the_user_and_the_message_id(relay: TLSRelay):
    with RawSMTP(relay.ports["smtps"], tls=relay.client_context()) as raw:
        raw.reply()
        raw.chat(b"EHLO client.test\r\n")
        raw.chat(b"AUTH PLAIN " + plain("alice", PASSWORD) + b"\r\n")
        said = raw.chat(b"MAIL FROM:<app@example.test>\r\nRCPT TO:<ops@dest.test>\r\nDATA\r\n"
                        + b"Message-ID: <m1@app.test>\r\n" + MESSAGE + b".\r\n", 4)
        queue_id = said[3].rsplit(" ", 1)[1]
    line = next(line for line in relay.relay.log_text().splitlines()
                if f"{queue_id}: client=" in line)
    assert "listener=smtps, sasl_username=alice, message_id=<m1@app.test>, rule=" in line
