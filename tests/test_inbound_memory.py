"""Large messages go to disk as they arrive: memory follows the budget, not message sizes,
and the line checks still see every octet."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiosmtplib
import pytest
from conftest import RelayProcess, Sink, run_cli
from smtpraw import RawSMTP

from relay.checks.dkim import generate_key

BUDGET = 16 * 2**20
MESSAGES = 20
SIZE = 5 * 2**20


def big_message(size: int, subject: str = "big") -> bytes:
    # Lines that start with a dot land on every side of the reads' boundaries.
    line = b".dot-stuffed line of a large message " + b"x" * 40 + b"\r\n"
    head = f"From: app@example.test\r\nSubject: {subject}\r\n\r\n".encode()
    return head + line * (size // len(line))


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def signing_section(directory: Path) -> str:
    """[dkim] with a key for example.test, the From: domain of big_message()."""
    pem, _ = generate_key("ed25519")
    (directory / "example.test").mkdir(parents=True)
    (directory / "example.test" / "s1.key").write_bytes(pem)
    return f'\n[dkim]\nkey_directory = "{directory}"\n'


@pytest.mark.parametrize("signing", [False, True], ids=["unsigned", "dkim-signed"])
async def test_concurrent_large_messages_are_all_accepted_within_the_memory_budget(
    sink: Sink, start_relay, tmp_path: Path, signing: bool
):
    # Signed, each message's body is hashed from its file in pieces (relay/checks/
    # bodyhash.py): read back whole, the signatures alone would go over the bound below.
    sections = signing_section(tmp_path / "keys") if signing else ""
    relay: RelayProcess = start_relay(sink.port, extra=f'max_data_memory = "{BUDGET}"',
                                      sections=sections)
    assert relay.proc is not None
    resting = status_kb(relay.proc.pid, "VmRSS")
    message = big_message(SIZE)

    async def send(i: int) -> str:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port,
                                   timeout=120) as client:
            return (await client.sendmail("app@example.test", [f"r{i}@dest.test"],
                                          message))[1]

    replies = await asyncio.gather(*(send(i) for i in range(MESSAGES)))
    assert all(r.startswith("2.0.0 Ok: queued as") for r in replies), replies
    # The highest resident size the relay ever had: held whole, the messages alone
    # would be 100 MB; streamed, what they hold is bounded by the budget.
    assert status_kb(relay.proc.pid, "VmHWM") - resting < 3 * BUDGET
    got = sink.wait_messages(MESSAGES, timeout=120)
    assert all(m.data.endswith(message) for m in got)
    assert all((b"DKIM-Signature:" in m.data) == signing for m in got)
    assert not os.listdir(relay.spool_db.parent / "incoming")


@pytest.mark.parametrize(("flaw", "reply"), [
    (b"a bare\nline feed", "550 5.5.2"),
    (b"y" * 1200, "500 5.5.2"),
])
def test_a_flaw_deep_in_a_large_message_is_found_in_what_went_to_disk(
    sink: Sink, start_relay, tmp_path: Path, flaw: bytes, reply: str
):
    relay: RelayProcess = start_relay(sink.port)
    message = big_message(2 * 2**20)
    middle = message.index(b"\r\n", len(message) // 2) + 2
    flawed = message[:middle] + flaw + b"\r\n" + message[middle:]
    with RawSMTP(relay.port) as raw:
        raw.reply()
        raw.chat(b"EHLO client.test\r\n")
        said = raw.chat(b"MAIL FROM:<app@example.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n", 3)
        assert said[-1].startswith("354")
        raw.send(flawed.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        assert raw.reply().startswith(reply)
    assert not relay.queue_rows()
    assert not os.listdir(relay.spool_db.parent / "incoming")
    # The dry run reads the message whole and says the same (one set of checks).
    path = tmp_path / "flawed.eml"
    path.write_bytes(flawed)
    dry = run_cli("test", "--config", str(relay.config), "--from", "app@example.test",
                  "--to", "b@dest.test", "--message", str(path))
    assert dry.returncode == 5 and reply in dry.stdout, dry.stdout + dry.stderr


async def test_a_disk_that_refuses_the_large_part_gets_451_and_a_condition(
    sink: Sink, start_relay
):
    relay: RelayProcess = start_relay(sink.port)
    incoming = relay.spool_db.parent / "incoming"
    incoming.rmdir()
    incoming.write_bytes(b"")  # what was a directory cannot take files now
    message = big_message(2 * 2**20)

    async def send() -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port,
                                   timeout=60) as client:
            await client.sendmail("app@example.test", ["b@dest.test"], message)

    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send()
    assert (refused.value.code, refused.value.message[:5]) == (451, "4.3.0")
    incoming.unlink()
    incoming.mkdir()
    await send()
    assert len(sink.wait_messages(1)) == 1
    log = relay.log_text()
    assert log.count("spool_unwritable started: cannot write to ") == 1
    assert log.count("spool_unwritable ended after") == 1
    assert "Traceback" not in log
