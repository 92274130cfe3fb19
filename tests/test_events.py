"""Delivery events: the webhook (signed batches, every event type, outages, a SIGKILL),
retention, the file and Redis sinks, the suppression list and `policy-relay trace`.

The relay runs as a real process with a real upstream (aiosmtpd) and a real HTTP
receiver on loopback that checks signatures the way an app would.
"""

from __future__ import annotations

import json
import re
import smtplib
import sqlite3
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    RelayProcess,
    Sink,
    free_port,
    relay_config,
    run_cli,
    wait_until,
)
from webhookserver import Receiver

from relay.events.event import TYPES

SECRET = b"s3cret-for-the-tests"

POLICY = r"""
[defaults]
final_action  = "reject"
final_message = "554 5.7.1 <{recipient}>: Relay access denied"

[[rule]]
name = "suppressed-recipients"
match.suppressed = true
action  = "reject"
message = "550 5.1.1 <{recipient}>: recipient suppressed since {suppressed}"

[[rule]]
name = "unknown-user"
match.recipient = "nobody@dest.test"
action  = "reject"
message = "550 5.1.1 <{recipient}>: User unknown"

[[rule]]
name = "hold-senders"
match.sender = "hold@app.test"
action = "hold"

[[rule]]
name = "discard-invalid"
match.recipient_domain = "example.invalid"
action = "discard"

[[rule]]
name = "relay-networks"
match.client_address = "@relay_networks"
action = "accept"
"""


def message(message_id: str, subject: str = "events") -> bytes:
    return (f"From: app@app.test\r\nTo: user@dest.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{message_id}>\r\n\r\nHello.\r\n").encode()


def send(relay: RelayProcess, sender: str, recipients: list[str],
         data: bytes) -> dict[str, tuple[int, bytes]]:
    """One SMTP transaction with smtplib; the refused recipients and their replies."""
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        return client.sendmail(sender, recipients, data)


def queue_id_of(relay: RelayProcess, message_id: str) -> str:
    with sqlite3.connect(relay.spool_db) as db:
        row = db.execute("SELECT queue_id FROM event WHERE message_id = ? AND "
                         "type = 'received'", (message_id,)).fetchone()
    assert row is not None, f"no received event for {message_id}"
    return str(row[0])


def stored_events(relay: RelayProcess) -> list[dict[str, object]]:
    with sqlite3.connect(relay.spool_db) as db:
        return [json.loads(d) for (d,) in db.execute("SELECT data FROM event ORDER BY seq")]


class Env:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.receiver = Receiver(SECRET).start()
        self.sink = Sink()
        self.sink.start()
        (directory / "policies").mkdir()
        (directory / "policies" / "10-test.toml").write_text(POLICY)
        (directory / "hook.secret").write_bytes(SECRET + b"\n")
        self.relay: RelayProcess | None = None

    def start(self, events: str = "", queue: str = "", metrics: str = "") -> RelayProcess:
        port = free_port()
        text = relay_config(self.sink.port, port, self.directory / "spool",
                            f'policies_dir = "{self.directory / "policies"}"',
                            metrics=metrics)
        text = text.replace("[queue]\n", f"[queue]\n{queue}\n")
        text += f"""
[events]
{events}

[[events.sink]]
name = "hook"
type = "webhook"
url = "{self.receiver.url}"
secret_file = "{self.directory / 'hook.secret'}"
max_backoff = "0.5s"
"""
        self.relay = RelayProcess(self.directory, text, port).start()
        return self.relay

    def close(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        self.sink.stop()
        self.receiver.stop()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    environment = Env(tmp_path)
    yield environment
    environment.close()


def cli(relay: RelayProcess, *args: str) -> str:
    result = run_cli(*args, "--config", str(relay.config))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def control(relay: RelayProcess, *args: str) -> None:
    result = run_cli("queue", *args, "--control-socket", str(relay.control_socket))
    assert result.returncode == 0, result.stdout + result.stderr


def test_webhook_receives_every_event_type_with_valid_signatures(env: Env):
    env.sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    env.sink.handler.rcpt_replies["later@dest.test"] = "451 4.3.0 Try again later"
    relay = env.start(queue='max_lifetime = "3s"')

    send(relay, "app@app.test", ["ok@dest.test"], message("sent-1@app.test"))
    refused = send(relay, "app@app.test", ["ok@dest.test", "nobody@dest.test"],
                   message("refused-1@app.test"))
    assert refused["nobody@dest.test"][0] == 550
    send(relay, "app@app.test", ["gone@dest.test"], message("bounced-1@app.test"))
    send(relay, "app@app.test", ["later@dest.test"], message("expired-1@app.test"))
    send(relay, "hold@app.test", ["ok@dest.test"], message("released-1@app.test"))
    send(relay, "hold@app.test", ["ok@dest.test"], message("deleted-1@app.test"))
    send(relay, "app@app.test", ["x@example.invalid"], message("discarded-1@app.test"))
    wait_until(lambda: len(relay.queue_rows()) >= 2 and
               sum(1 for e in stored_events(relay) if e["type"] == "held") == 2,
               20, "two held messages")
    control(relay, "release", queue_id_of(relay, "released-1@app.test"))
    control(relay, "delete", queue_id_of(relay, "deleted-1@app.test"))

    def types() -> set[str]:
        return {str(e["type"]) for e in env.receiver.received()}

    wait_until(lambda: types() >= set(TYPES), 30, f"every event type (have {types()})")
    assert env.receiver.bad_signatures == 0
    events = env.receiver.received()
    ids = [e["id"] for e in events]
    assert len(set(ids)) == len(ids)
    by_message = {}
    for event in events:
        by_message.setdefault(event["message_id"], []).append(event)
    sent = by_message["sent-1@app.test"]
    assert [e["type"] for e in sent] == ["received", "sent"]
    assert sent[0]["rule"] == "relay-networks" and sent[0]["client_address"] == "127.0.0.1"
    assert sent[1]["recipient"] == "ok@dest.test"
    assert sent[1]["reply"].startswith("250 ") and sent[1]["relay"].startswith("sink.test[")
    [refusal] = [e for e in events if e["type"] == "refused"]
    assert (refusal["stage"], refusal["rule"], refusal["recipient"]) == (
        "RCPT", "unknown-user", "nobody@dest.test")
    assert refusal["reply"].startswith("550 5.1.1")
    bounced = by_message["bounced-1@app.test"]
    assert bounced[-1]["type"] == "bounced" and bounced[-1]["reply"].startswith("550 5.1.1")
    # The notification to the sender is a message of the relay's own, with its events.
    notice = f"{bounced[0]['queue_id']}.dsn@relay.test"
    wait_until(lambda: any(e["message_id"] == notice and e["type"] == "sent"
                           for e in env.receiver.received()), 20, "the bounce's delivery")
    [made] = [e for e in env.receiver.received()
              if e["message_id"] == notice and e["type"] == "received"]
    assert (made["rule"], made["sender"], made["recipients"]) == ("bounce", "", ["app@app.test"])
    expired = [e["type"] for e in by_message["expired-1@app.test"]]
    assert expired[0] == "received" and expired[-1] == "expired" and "deferred" in expired
    assert [e["type"] for e in by_message["released-1@app.test"]] == [
        "received", "held", "released", "sent"]
    assert [e["type"] for e in by_message["deleted-1@app.test"]] == [
        "received", "held", "deleted"]
    assert [e["type"] for e in by_message["discarded-1@app.test"]] == ["discarded"]


def test_events_wait_out_a_receiver_outage_and_a_sigkill_in_order(env: Env):
    metrics = f"127.0.0.1:{free_port()}"
    env.receiver.down = True
    relay = env.start(metrics=metrics)
    for i in range(5):
        send(relay, "app@app.test", [f"user{i}@dest.test"], message(f"outage-{i}@app.test"))
    env.sink.wait_messages(5)
    wait_until(lambda: env.receiver.refused >= 2, 20, "the relay to try the receiver twice")

    def pending() -> float:
        text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10).read().decode()
        found = re.search(r'^relay_events_pending\{sink="hook"\} (\S+)$', text, re.M)
        assert found is not None, text
        assert re.search(r'^relay_events_oldest_pending_age_seconds\{sink="hook"\} ', text,
                         re.M), text
        return float(found.group(1))

    # received and sent for each of 5 messages (the last "sent" may still be on its way
    # to the spool when the upstream has the message)
    wait_until(lambda: pending() == 10, 20, "ten events pending")
    relay.kill()
    written = stored_events(relay)
    env.receiver.down = False
    relay.start()
    wait_until(lambda: len(env.receiver.received()) >= len(written), 30, "every event")
    got = env.receiver.received()
    assert {e["id"] for e in got} == {e["id"] for e in written}  # none lost, none invented
    assert env.receiver.bad_signatures == 0
    for i in range(5):
        mine = [e["type"] for e in got if e["message_id"] == f"outage-{i}@app.test"]
        assert mine[:2] == ["received", "sent"], mine
    wait_until(lambda: pending() == 0, 10, "the pending gauge to fall to 0")


def test_retention_drops_what_waits_too_long_and_logs_the_count(env: Env):
    env.receiver.down = True
    relay = env.start(events="max_pending = 2")
    for i in range(3):
        send(relay, "app@app.test", [f"user{i}@dest.test"], message(f"kept-{i}@app.test"))
    env.sink.wait_messages(3)
    # The upstream has a message before the relay has stored its "sent" event.
    wait_until(lambda: len(stored_events(relay)) == 6, 20, "received and sent of each")
    written = 6

    def dropped() -> int:
        return sum(int(n) for n in re.findall(r"sink hook: dropped (\d+) undelivered events",
                                              relay.log_text()))

    wait_until(lambda: dropped() >= written - 2, 20, "the retention drops in the log")
    assert "retention: max_pending=2" in relay.log_text()
    env.receiver.down = False
    wait_until(lambda: len(env.receiver.received()) + dropped() >= written, 20,
               "the kept events")
    # What was not dropped arrives: the newest ones, exactly max_pending of them (by
    # their order in the spool: deliveries and new messages interleave).
    assert len(env.receiver.received()) == written - dropped() == 2
    newest = [e["id"] for e in stored_events(relay)[-2:]]
    assert [e["id"] for e in env.receiver.received()] == newest


def test_a_recipient_refused_550_5_1_1_is_suppressed_until_removed(tmp_path: Path, sink: Sink):
    # The shipped policy, with its suppressed-recipients rule.
    sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    sink.handler.rcpt_replies["blocked@dest.test"] = "550 5.7.1 Refused by policy"
    port = free_port()
    relay = RelayProcess(tmp_path, relay_config(
        sink.port, port, tmp_path / "spool", f'policies_dir = "{ROOT / "policies"}"'), port)
    relay.start()
    try:
        send(relay, "app@app.test", ["gone@dest.test", "blocked@dest.test"],
             message("first@app.test"))
        wait_until(lambda: "suppressed (550 5.1.1" in relay.log_text(), 20,
                   "the bounce to suppress gone@dest.test")
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            send(relay, "app@app.test", ["gone@dest.test"], message("second@app.test"))
        code, text = refused.value.recipients["gone@dest.test"]
        assert code == 550
        assert re.match(rb"5\.1\.1 <gone@dest\.test>: recipient suppressed since "
                        rb"\d{4}-\d\d-\d\d after a permanent failure", text), text
        # A 5.7.x policy block is about the message, not the address: not suppressed.
        assert send(relay, "app@app.test", ["blocked@dest.test"], message("third@app.test")) == {}
        listed = cli(relay, "suppress", "list")
        assert "gone@dest.test" in listed and "550 5.1.1 No such user" in listed
        assert "blocked@dest.test" not in listed
        assert "gone@dest.test: removed" in cli(relay, "suppress", "remove", "gone@dest.test")
        assert send(relay, "app@app.test", ["gone@dest.test"], message("fourth@app.test")) == {}
    finally:
        relay.stop()


def test_suppress_add_import_and_export_round_trip(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text(f'[queue]\nspool_dir = "{tmp_path / "spool"}"\n')
    flags = ("--config", str(config))
    assert run_cli("suppress", "add", "A@Example.org", *flags).returncode == 0
    listing = tmp_path / "list.txt"
    listing.write_text("# from the old system\nb@example.org\n\nnot json {\n")
    imported = run_cli("suppress", "import", str(listing), *flags)
    assert imported.returncode == 0, imported.stderr
    assert "2 addresses imported" in imported.stdout
    exported = run_cli("suppress", "export", *flags).stdout.splitlines()
    entries = [json.loads(line) for line in exported]
    assert [e["address"] for e in entries] == ["a@example.org", "b@example.org", "not json {"]
    assert entries[0]["reason"] == "operator" and entries[1]["reason"] == "import"
    again = tmp_path / "again.jsonl"
    again.write_text("\n".join(exported[:1]) + "\n")
    run_cli("suppress", "remove", "a@example.org", *flags)
    assert run_cli("suppress", "import", str(again), *flags).returncode == 0
    restored = json.loads(run_cli("suppress", "export", *flags).stdout.splitlines()[0])
    assert restored == entries[0]
    missing = run_cli("suppress", "remove", "nobody@example.org", *flags)
    assert missing.returncode == 1 and "not on the list" in missing.stderr


def test_trace_by_message_id_after_delivery_shows_the_rule_and_the_attempts(env: Env):
    env.sink.handler.data_replies.append("451 4.3.0 Busy, try later")
    relay = env.start()
    send(relay, "app@app.test", ["user@dest.test"], message("trace-1@app.test"))
    env.sink.wait_messages(1)
    wait_until(lambda: relay.queue_rows() == [], 20, "the message to leave the queue")
    queue_id = queue_id_of(relay, "trace-1@app.test")

    text = cli(relay, "trace", "<trace-1@app.test>")
    assert f"message {queue_id}: Message-ID <trace-1@app.test>" in text
    assert re.search(r"received to=<user@dest\.test> rule=relay-networks", text), text
    assert 'rule "relay-networks" [accept]: matched' in text
    assert re.search(r'deferred to=<user@dest\.test> attempts=1 .*reply="451 4\.3\.0 Busy', text)
    assert re.search(r'sent to=<user@dest\.test> attempts=2 .*reply="250 ', text), text
    [history] = json.loads(cli(relay, "trace", "trace-1@app.test", "--json"))
    assert [e["type"] for e in history] == ["received", "deferred", "sent"]
    assert cli(relay, "trace", queue_id) == text
    assert f"message {queue_id}" in cli(relay, "trace", "USER@dest.test")
    missing = run_cli("trace", "nothing@app.test", "--config", str(relay.config))
    assert missing.returncode == 1 and "nothing found" in missing.stderr


def test_file_and_redis_sinks_get_the_events_their_filter_asks_for(tmp_path: Path, sink: Sink):
    redisserver = pytest.importorskip("redisserver")
    redis = redisserver.RedisServer()
    redis.start()
    sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    port = free_port()
    text = relay_config(sink.port, port, tmp_path / "spool") + f"""
[[events.sink]]
name = "log"
type = "file"
path = "{tmp_path / 'events.jsonl'}"

[[events.sink]]
name = "stream"
type = "redis"
url = "{redis.url}"
stream = "relay:bounces"
events = ["bounced"]
"""
    relay = RelayProcess(tmp_path, text, port).start()
    try:
        send(relay, "app@app.test", ["ok@dest.test", "gone@dest.test"], message("f-1@app.test"))
        lines = tmp_path / "events.jsonl"

        def logged() -> list[dict[str, str]]:
            # The bounce's own delivery to the sender writes events of its own.
            text = lines.read_text() if lines.exists() else ""
            return [e for e in map(json.loads, text.splitlines())
                    if e["message_id"] == "f-1@app.test"]

        wait_until(lambda: len(logged()) >= 3, 20, "three events in the file")
        assert [(e["type"], e["recipient"]) for e in logged()] == [
            ("received", None), ("sent", "ok@dest.test"), ("bounced", "gone@dest.test")]
        import redis as redislib

        client = redislib.Redis.from_url(redis.url)
        wait_until(lambda: client.xlen("relay:bounces") >= 1, 20, "the stream entry")
        [(_, fields)] = client.xrange("relay:bounces")
        assert fields[b"type"] == b"bounced"
        assert json.loads(fields[b"event"])["recipient"] == "gone@dest.test"
        client.close()
    finally:
        relay.stop()
        redis.stop()


def test_with_workers_every_shard_sends_its_events_and_trace_reads_them_all(env: Env):
    port = free_port()
    text = relay_config(env.sink.port, port, env.directory / "spool",
                        f'policies_dir = "{env.directory / "policies"}"\nworkers = 2')
    text += f"""
[[events.sink]]
name = "hook"
type = "webhook"
url = "{env.receiver.url}"
secret_file = "{env.directory / 'hook.secret'}"
"""
    env.relay = RelayProcess(env.directory, text, port).start()
    # New connections spread over both workers (SO_REUSEPORT): with 12 of them, both get
    # some (all on one worker: a chance of 1 in 2048).
    for i in range(12):
        send(env.relay, "app@app.test", [f"user{i}@dest.test"], message(f"w-{i}@app.test"))
    env.sink.wait_messages(12)
    shards = [env.directory / "spool" / "spool.db",
              env.directory / "spool" / "worker-1" / "spool.db"]
    wait_until(lambda: all(p.exists() for p in shards), 10, "both shards")

    def sent() -> set[str]:
        return {e["message_id"] for e in env.receiver.received() if e["type"] == "sent"}

    wait_until(lambda: len(sent()) == 12, 30, "a sent event for every message")
    assert env.receiver.bad_signatures == 0
    for path in shards:
        with sqlite3.connect(path) as db:
            row = db.execute("SELECT message_id FROM event WHERE type = 'received' "
                             "LIMIT 1").fetchone()
        assert row is not None, f"no mail went through {path}"
        assert f"Message-ID <{row[0]}>" in cli(env.relay, "trace", row[0])


def test_a_fleet_shares_the_suppression_list_in_redis(tmp_path: Path, sink: Sink):
    redisserver = pytest.importorskip("redisserver")
    redis = redisserver.RedisServer()
    redis.start()
    relays: list[RelayProcess] = []
    try:
        sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
        shared = f'\n[suppression]\nbackend = "redis"\nredis_url = "{redis.url}"\n'
        for name in ("one", "two"):  # two relays, each with its own spool
            directory = tmp_path / name
            directory.mkdir()
            port = free_port()
            relays.append(RelayProcess(directory, relay_config(
                sink.port, port, directory / "spool",
                f'policies_dir = "{ROOT / "policies"}"') + shared, port).start())
        one, two = relays
        send(one, "app@app.test", ["gone@dest.test"], message("fleet-1@app.test"))
        wait_until(lambda: "suppressed (550 5.1.1" in one.log_text(), 20, "the suppression")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            send(two, "app@app.test", ["gone@dest.test"], message("fleet-2@app.test"))
        assert "gone@dest.test" in cli(two, "suppress", "list")
        cli(two, "suppress", "remove", "gone@dest.test")
        assert send(one, "app@app.test", ["gone@dest.test"], message("fleet-3@app.test")) == {}
    finally:
        for relay in relays:
            relay.stop()
        redis.stop()
