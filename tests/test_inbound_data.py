"""DATA read in chunks: the end of data, dot-unstuffing and the limits wherever a read
boundary falls, and the memory budget for message data."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RelayProcess, Sink, free_port, relay_config, relay_with_sink, wait_until
from smtpraw import RawSMTP

from relay.message import has_long_line, longest_line

HELLO = b"EHLO client.test\r\n"
ENVELOPE = b"MAIL FROM:<app@example.test>\r\nRCPT TO:<user@dest.test>\r\nDATA\r\n"
HEAD = b"From: app@example.test\r\nSubject: chunks\r\n\r\n"


def start(directory: Path, sink: Sink, extra: str) -> RelayProcess:
    port = free_port()
    return RelayProcess(directory, relay_config(sink.port, port, directory / "spool", extra),
                        port).start()


@pytest.fixture(scope="module")
def relay_and_sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RelayProcess, Sink]]:
    with relay_with_sink(tmp_path_factory.mktemp("data"), 'max_message_size = "4M"') as both:
        yield both


@pytest.fixture
def relay(relay_and_sink: tuple[RelayProcess, Sink]) -> RelayProcess:
    return relay_and_sink[0]


@pytest.fixture
def sink(relay_and_sink: tuple[RelayProcess, Sink]) -> Iterator[Sink]:
    relay, sink = relay_and_sink
    sink.handler.messages.clear()
    yield sink
    wait_until(lambda: not relay.queue_rows(), what="the spool to empty")


def session(relay: RelayProcess) -> RawSMTP:
    raw = RawSMTP(relay.port)
    assert raw.reply() == "220 relay.test ESMTP"
    assert raw.chat(HELLO)[0].startswith("250-relay.test")
    return raw


def send_in_pieces(raw: RawSMTP, data: bytes, cuts: list[int]) -> None:
    """Each piece in its own segment, with a pause so the relay reads it alone."""
    for piece_start, piece_end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        raw.send(data[piece_start:piece_end])
        time.sleep(0.02)


@pytest.mark.parametrize("cut", range(1, 6))
def test_end_of_data_split_across_reads_still_ends_the_message(
    relay: RelayProcess, sink: Sink, cut: int
):
    body = HEAD + b"Hello.\r\n"
    with session(relay) as raw:
        raw.chat(ENVELOPE, 3)
        # The cut falls inside CRLF "." CRLF (cut 1..5 octets before its end).
        wire = body + b".\r\n"
        send_in_pieces(raw, wire, [len(wire) - cut])
        assert raw.reply().startswith("250 2.0.0")
    [got] = sink.wait_messages(1)
    assert got.data.endswith(body)


def test_dot_stuffed_lines_are_unstuffed_wherever_reads_end(relay: RelayProcess, sink: Sink):
    body = HEAD + b".\r\n..\r\n.x\r\nmid . dot\r\n...three\r\n"
    wire = HEAD + b"..\r\n...\r\n..x\r\nmid . dot\r\n....three\r\n.\r\n"
    with session(relay) as raw:
        raw.chat(ENVELOPE, 3)
        # Cut right after each CRLF, so the stuffed dot starts a read.
        cuts = [i + 2 for i in range(len(HEAD), len(wire) - 3) if wire[i:i + 2] == b"\r\n"]
        send_in_pieces(raw, wire, cuts)
        assert raw.reply().startswith("250 2.0.0")
    [got] = sink.wait_messages(1)
    assert got.data.endswith(body)


def test_a_message_whose_first_line_is_stuffed_keeps_it(relay: RelayProcess, sink: Sink):
    with session(relay) as raw:
        raw.chat(ENVELOPE, 3)
        assert raw.chat(b"..first\r\n.\r\n")[0].startswith("250 2.0.0")
    [got] = sink.wait_messages(1)
    assert got.data.endswith(b"\r\n.first\r\n")


def test_commands_pipelined_behind_the_final_dot_are_answered(relay: RelayProcess, sink: Sink):
    with session(relay) as raw:
        raw.chat(ENVELOPE, 3)
        answers = raw.chat(HEAD + b"one\r\n.\r\n" + ENVELOPE, 4)
        assert answers[0].startswith("250 2.0.0")
        assert answers[1:] == ["250 2.1.0 Ok", "250 2.1.5 Ok",
                               "354 End data with <CR><LF>.<CR><LF>"]
        assert raw.chat(HEAD + b"two\r\n.\r\nQUIT\r\n", 2)[1].startswith("221")
    got = sink.wait_messages(2)
    assert sorted(m.data.rsplit(b"\r\n", 2)[-2] for m in got) == [b"one", b"two"]


@pytest.mark.parametrize("dot", [b"", b"."])
def test_a_line_of_exactly_max_line_length_is_accepted(
    relay: RelayProcess, sink: Sink, dot: bytes
):
    line = dot + b"y" * (998 - len(dot))  # 998 octets once unstuffed, 999 on the wire
    with session(relay) as raw:
        raw.chat(ENVELOPE, 3)
        # The long line straddles two reads.
        send_in_pieces(raw, HEAD + dot + line + b"\r\n.\r\n", [len(HEAD) + 500])
        assert raw.reply().startswith("250 2.0.0")
    [got] = sink.wait_messages(1)
    assert got.data.endswith(b"\r\n" + line + b"\r\n")


@pytest.mark.parametrize("length", [998, 999])
def test_the_line_limit_holds_in_the_part_of_a_large_message_on_disk(
    relay: RelayProcess, sink: Sink, length: int
):
    """Past the first 256K a message goes to disk; a line there one octet over
    max_line_length (which the reader lets through, as aiosmtpd does) is refused by the
    same check as in the in-memory part, and the log names its length."""
    filler = (b"f" * 76 + b"\r\n") * (600_000 // 78)
    body = HEAD + filler + b"z" * length + b"\r\n" + filler + b".end\r\n"
    wire = body.replace(b"\r\n.", b"\r\n..")
    with session(relay) as raw:
        raw.chat(ENVELOPE, 3)
        [reply] = raw.chat(wire + b".\r\n")
    if length == 998:
        assert reply.startswith("250 2.0.0")
        [got] = sink.wait_messages(1)
        assert got.data.endswith(body)
    else:
        assert reply == "500 5.5.2 Error: line too long"
        wait_until(lambda: "line of 999 octets" in relay.log_text(), what="the refusal's log")
        assert not sink.handler.messages


def test_a_reload_that_lowers_max_line_length_holds_in_the_part_on_disk(
    tmp_path: Path, sink: Sink
):
    """The reader's own limit is the one in force when the connection opened; the
    session's is the one its transaction runs on. A line between the two, past the part
    kept in memory, is measured all the same and refused."""
    relay = start(tmp_path, sink, 'max_message_size = "4M"\nmax_line_length = 2000')
    try:
        with session(relay) as raw:
            assert relay.proc is not None
            relay.config.write_text(relay.config.read_text().replace(
                "max_line_length = 2000", "max_line_length = 998"))
            relay.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "reloaded configuration" in relay.log_text(),
                       what="the reload")
            raw.chat(ENVELOPE, 3)
            filler = (b"f" * 76 + b"\r\n") * (600_000 // 78)
            [reply] = raw.chat(HEAD + filler + b"z" * 1500 + b"\r\n" + filler + b".\r\n")
        assert reply == "500 5.5.2 Error: line too long"
        wait_until(lambda: "line of 1500 octets" in relay.log_text(), what="the refusal's log")
    finally:
        relay.stop()
    assert not sink.handler.messages


def test_a_line_far_over_the_limit_is_read_to_the_end_and_refused(relay: RelayProcess, sink: Sink):
    with session(relay) as raw:
        raw.chat(ENVELOPE, 3)
        assert raw.chat(HEAD + b"w" * 50_000 + b"\r\nmore\r\n.\r\n") == [
            "500 5.5.2 Error: line too long"
        ]
        # The session goes on: the next transaction is fine.
        raw.chat(ENVELOPE, 3)
        assert raw.chat(HEAD + b"fine\r\n.\r\n")[0].startswith("250 2.0.0")
    assert len(sink.wait_messages(1)) == 1


def test_a_message_over_the_size_limit_gets_552_after_its_end(relay: RelayProcess, sink: Sink):
    with session(relay) as raw:
        raw.chat(ENVELOPE, 3)
        chunk = b"x" * 76 + b"\r\n"
        big = HEAD + chunk * (5 * 2**20 // len(chunk))
        raw.send(big)
        assert raw.chat(b".\r\n") == ["552 5.3.4 Message size exceeds fixed limit"]
        raw.chat(ENVELOPE, 3)
        assert raw.chat(HEAD + b"fine\r\n.\r\n")[0].startswith("250 2.0.0")
    assert len(sink.wait_messages(1)) == 1


def test_a_large_message_arrives_byte_for_byte(relay: RelayProcess, sink: Sink):
    rng = random.Random(9)
    lines = [bytes(rng.choice(b"abc. ") for _ in range(rng.randrange(0, 200)))
             for _ in range(20_000)]
    body = HEAD + b"".join(line + b"\r\n" for line in lines)
    wire = HEAD + b"".join((b"." if line.startswith(b".") else b"") + line + b"\r\n"
                           for line in lines)
    with session(relay) as raw:
        raw.chat(ENVELOPE, 3)
        assert raw.chat(wire + b".\r\n")[0].startswith("250 2.0.0")
    [got] = sink.wait_messages(1)
    assert got.data.endswith(body)


def test_bare_lf_before_a_split_end_of_data_is_refused(relay: RelayProcess, sink: Sink):
    with session(relay) as raw:
        raw.chat(ENVELOPE, 3)
        # "\n.\r\n" is no end of data; the real one follows in a later read.
        send_in_pieces(raw, HEAD + b"a\n.\r\nMAIL FROM:<x@y.test>\r\n.\r\n", [len(HEAD) + 2])
        assert raw.reply() == ("550 5.5.2 Message contains bare CR, bare LF or NUL; "
                               "not accepted")


def test_message_data_over_the_memory_budget_gets_452_and_nothing_is_stored(
    tmp_path: Path,
):
    sink = Sink()
    sink.start()
    relay = start(tmp_path, sink, 'max_message_size = "64K"\nmax_data_memory = "16K"')
    try:
        with session(relay) as first, session(relay) as second:
            first.chat(ENVELOPE, 3)
            # The first client holds 12K of the budget with a message not yet ended...
            first.send(HEAD + (b"f" * 78 + b"\r\n") * 150)
            time.sleep(0.2)
            # ...so the second one's 8K do not fit: read to the end, then 452.
            second.chat(ENVELOPE, 3)
            assert second.chat(HEAD + (b"s" * 78 + b"\r\n") * 100 + b".\r\n") == [
                "452 4.3.1 Insufficient system storage"
            ]
            assert first.chat(b".\r\n")[0].startswith("250 2.0.0")
            # With the budget free again, the second client's retry fits.
            second.chat(ENVELOPE, 3)
            assert second.chat(HEAD + (b"s" * 78 + b"\r\n") * 100 + b".\r\n")[0].startswith(
                "250 2.0.0")
        got = sink.wait_messages(2)
        assert sorted(len(m.data) > 11_000 for m in got) == [False, True]
        assert "message data in memory over 16384 bytes" in relay.log_text()
    finally:
        relay.stop()
        sink.stop()


@pytest.mark.parametrize("seed", range(20))
def test_has_long_line_agrees_with_splitting_into_lines(seed: int):
    rng = random.Random(seed)
    limit = rng.choice([1, 5, 20, 998])
    data = b"".join(b"q" * rng.choice([0, limit - 1, limit, limit + 1, rng.randrange(3 * limit)])
                    + b"\r\n" for _ in range(rng.randrange(0, 30)))
    assert has_long_line(data, limit) == (longest_line(data) > limit)
    # A last line without its CRLF yet counts once it is over the limit.
    tail = b"t" * rng.choice([limit, limit + 1])
    assert has_long_line(data + tail, limit) == (longest_line(data + tail) > limit)
