"""[server] qualify_domain: "root" becomes root@<domain> for clients allowed to relay, in
the live relay and in `policy-relay test` alike (one session model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import RelayProcess, Sink, free_port, relay_config, run_cli
from smtpraw import RawSMTP

MESSAGE = b"From: root\r\nSubject: cron\r\n\r\nbackup done\r\n"
STATUS = re.compile(r"^(\d{3})[ -](?:([245]\.\d{1,3}\.\d{1,3}) )?")


def status(reply: str) -> str:
    """ "NNN X.Y.Z" (or "NNN") of the last line of a reply, as the parity suite compares."""
    match = STATUS.match(reply.splitlines()[-1])
    assert match is not None, reply
    return " ".join(part for part in match.groups() if part)


def start(tmp_path: Path, sink: Sink, networks: str) -> RelayProcess:
    port = free_port()
    text = relay_config(sink.port, port, tmp_path / "spool",
                        f'qualify_domain = "example.test"\nrelay_networks = {networks}')
    return RelayProcess(tmp_path, text, port).start()


def live(relay: RelayProcess, sender: str, recipient: str) -> list[str]:
    """The reply code and enhanced status of EHLO, MAIL, RCPT (and DATA when it may go)."""
    with RawSMTP(relay.port) as raw:
        raw.reply()
        said = raw.chat(b"EHLO localhost\r\n")
        said += raw.chat(f"MAIL FROM:<{sender}>\r\n".encode())
        if said[-1].startswith("250"):
            said += raw.chat(f"RCPT TO:<{recipient}>\r\n".encode())
        if said[-1].startswith("250"):
            said += raw.chat(b"DATA\r\n" + MESSAGE + b".\r\n", 2)
    return [status(line) for line in said]


def dry(relay: RelayProcess, sender: str, recipient: str, message: Path) -> list[str]:
    result = run_cli("test", "--config", str(relay.config), "--json", "--from", sender,
                     "--to", recipient, "--message", str(message))
    steps = json.loads(result.stdout)["steps"]
    return [status(s["reply"]) for s in steps[1:]]


@pytest.mark.parametrize("sender,recipient", [("root", "root"), ("cron", "ops@dest.test")])
def test_unqualified_addresses_of_a_relay_network_get_the_domain(
    tmp_path: Path, sink: Sink, sender: str, recipient: str
):
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE)
    relay = start(tmp_path, sink, '["127.0.0.0/8"]')
    try:
        said = live(relay, sender, recipient)
        assert said == dry(relay, sender, recipient, message)
        assert said == ["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
        [got] = sink.wait_messages(1)
        assert got.sender == f"{sender}@example.test"
        assert got.recipients == [recipient if "@" in recipient else f"{recipient}@example.test"]
        assert f"from=<{sender}@example.test>" in relay.log_text()
    finally:
        relay.stop()


def test_clients_not_allowed_to_relay_are_refused_as_before(tmp_path: Path, sink: Sink):
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE)
    relay = start(tmp_path, sink, '["192.0.2.0/24"]')
    try:
        said = live(relay, "root", "root")
        assert said == dry(relay, "root", "root", message)
        assert said[1] == "501 5.1.7"
    finally:
        relay.stop()
