"""Connection caps, timeouts, free space and shutdown: 421 at the right moment, others served."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RelayProcess, Sink, free_port, relay_config
from smtpraw import RawSMTP

LIMITS = """
idle_timeout = "1s"
session_timeout = "3s"
max_connections_per_client = 5
"""
TOO_MANY = "421 4.7.0 Too many connections, try again later"
TIMEOUT = "421 4.4.2 Error: timeout exceeded, closing connection"
MESSAGE = b"From: app@example.test\r\nSubject: limits\r\n\r\nHello.\r\n"


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    directory: Path = tmp_path_factory.mktemp("limits")
    sink = Sink()
    sink.start()
    port = free_port()
    relay = RelayProcess(directory, relay_config(sink.port, port, directory / "spool", LIMITS),
                         port).start()
    time.sleep(0.3)  # let the relay forget the connection start() probed the port with
    yield relay
    relay.stop()
    sink.stop()


def send_message(raw: RawSMTP) -> str:
    assert raw.chat(b"EHLO other.test\r\n")[0].startswith("250-")
    said = raw.chat(b"MAIL FROM:<app@example.test>\r\nRCPT TO:<u@dest.test>\r\nDATA\r\n"
                    + MESSAGE + b".\r\n", 4)
    return said[-1]


def test_per_client_cap_gives_421_while_another_address_is_served(relay: RelayProcess):
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(RawSMTP(relay.port)) for _ in range(5)]
        assert all(raw.reply() == "220 relay.test ESMTP" for raw in held)
        with RawSMTP(relay.port) as refused:
            assert refused.reply() == TOO_MANY
            assert refused.closed()
        # 127.0.0.2 is another client (all of 127/8 is loopback): it is served meanwhile.
        with RawSMTP(relay.port, source="127.0.0.2") as other:
            assert other.reply() == "220 relay.test ESMTP"
            assert send_message(other).startswith("250 2.0.0 Ok: queued as")
        held.pop().sock.close()
        time.sleep(0.2)
        with RawSMTP(relay.port) as again:  # a freed slot is usable again
            assert again.reply() == "220 relay.test ESMTP"
    assert "too many connections from 127.0.0.1 (5 of 5)" in relay.log_text()


def test_hundreds_of_idle_connections_are_capped_and_timed_out(sink: Sink, start_relay):
    relay = start_relay(sink.port, extra='idle_timeout = "3s"')
    time.sleep(0.3)  # let the relay forget the connection start() probed the port with
    with contextlib.ExitStack() as stack:
        crowd = [stack.enter_context(RawSMTP(relay.port, source=f"127.0.1.{i % 10 + 1}"))
                 for i in range(150)]
        greetings = [raw.reply() for raw in crowd]
        # 10 addresses x 15 stay under the default cap of 20 per client; the overall 100
        # (the default) is what refuses the last 50.
        assert greetings.count("220 relay.test ESMTP") == 100
        assert greetings.count(TOO_MANY) == 50
        # Over 80 of 100 the relay is under pressure: a client without a stalled session
        # of its own takes the place of the session that stalled longest.
        with RawSMTP(relay.port, source="127.0.0.3") as other:
            assert other.reply() == "220 relay.test ESMTP"
        # The idle ones are dropped after idle_timeout, and the relay serves again.
        admitted = [raw for raw, said in zip(crowd, greetings, strict=True) if said[:3] == "220"]
        said = [raw.reply() for raw in admitted]
        assert said.count(TOO_MANY) == 1 and said.count(TIMEOUT) == 99
        assert all(raw.closed() for raw in admitted)
        with RawSMTP(relay.port, source="127.0.0.3") as other:
            assert other.reply() == "220 relay.test ESMTP"
            assert send_message(other).startswith("250 2.0.0 Ok: queued as")


def test_an_idle_client_gets_421_and_is_closed(relay: RelayProcess):
    with RawSMTP(relay.port) as raw:
        raw.reply()
        started = time.monotonic()
        assert raw.reply() == TIMEOUT
        assert 0.8 < time.monotonic() - started < 2.5
        assert raw.closed()


def test_a_client_trickling_a_command_times_out_while_others_are_served(relay: RelayProcess):
    with RawSMTP(relay.port) as slow, RawSMTP(relay.port, source="127.0.0.2") as other:
        slow.reply()
        other.reply()
        started = time.monotonic()
        with contextlib.suppress(OSError):
            for byte in b"EHLO trickle.test":
                slow.send(bytes([byte]))
                assert other.chat(b"NOOP\r\n") == ["250 2.0.0 Ok"]
                time.sleep(0.25)
        assert time.monotonic() - started < 2.5
        assert slow.reply() == TIMEOUT
        assert other.chat(b"NOOP\r\n") == ["250 2.0.0 Ok"]


def test_data_lines_count_as_progress_but_the_session_has_a_deadline(relay: RelayProcess):
    with RawSMTP(relay.port) as raw:
        raw.reply()
        raw.chat(b"EHLO client.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<u@dest.test>\r\n"
                 b"DATA\r\n", 4)
        # Longer than idle_timeout in all, each line well within it.
        for _ in range(4):
            raw.send(b"line\r\n")
            time.sleep(0.5)
        assert raw.chat(b".\r\n")[0].startswith("250 2.0.0 Ok: queued as")
        with contextlib.suppress(TimeoutError):
            while True:  # NOOPs keep it from idling, not from its 3 s deadline
                time.sleep(0.3)
                said = raw.chat(b"NOOP\r\n")[0]
                if said != "250 2.0.0 Ok":
                    break
        assert said == TIMEOUT
        assert raw.closed()


def test_low_free_space_refuses_mail_with_452(sink: Sink, start_relay):
    relay = start_relay(sink.port, extra='min_free_space = "100000G"')
    with RawSMTP(relay.port) as raw:
        raw.reply()
        raw.chat(b"EHLO client.test\r\n")
        assert raw.chat(b"MAIL FROM:<a@example.test>\r\n") == [
            "452 4.3.1 Insufficient system storage"
        ]
    assert relay.queue_rows() == []


def test_sigterm_says_421_to_idle_clients_and_lets_a_busy_one_finish(
    sink: Sink, start_relay
):
    relay = start_relay(sink.port)
    with RawSMTP(relay.port) as idle, RawSMTP(relay.port) as busy:
        idle.reply()
        busy.reply()
        busy.chat(b"EHLO client.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<u@dest.test>\r\n"
                  b"DATA\r\n", 4)
        busy.send(MESSAGE)
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGTERM)
        assert idle.reply() == "421 4.3.2 Service shutting down, try again later"
        said = busy.chat(b".\r\n", 2)
        assert said[0].startswith("250 2.0.0 Ok: queued as")
        assert said[1] == "421 4.3.2 Service shutting down, try again later"
    assert relay.proc.wait(timeout=15) == 0
