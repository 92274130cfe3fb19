"""Log lines: Postfix-shaped text, and the same fields as JSON."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import select
from pathlib import Path
from typing import TextIO

from relay.ops.logs import (
    JsonFormatter,
    PassHandler,
    TextFormatter,
    fields_of,
    flush_waiting,
)


def test_delivery_line_fields():
    line = ("6614C6DFDCBE101AB6F: to=<b@dest.test>, relay=127.0.0.1:2601, delay=0.01, "
            "attempts=1, status=sent (250 2.0.0 Ok: queued as X)")
    assert fields_of(line) == {
        "queue_id": "6614C6DFDCBE101AB6F", "to": "b@dest.test", "relay": "127.0.0.1:2601",
        "delay": "0.01", "attempts": "1", "status": "sent",
        "reply": "250 2.0.0 Ok: queued as X",
    }


def test_reject_line_fields():
    line = ("NOQUEUE: reject: RCPT from [10.9.8.7]: 554 5.7.1 <x@example.org>: Relay access "
            "denied; from=<a@example.com> to=<x@example.org> helo=<app1> listener=smtp "
            "rule=final_action")
    fields = fields_of(line)
    assert fields["queue_id"] == "NOQUEUE"
    assert (fields["from"], fields["to"], fields["helo"]) == (
        "a@example.com", "x@example.org", "app1")
    assert (fields["listener"], fields["rule"]) == ("smtp", "final_action")


def test_json_formatter_emits_one_object_with_the_fields():
    record = logging.LogRecord("relay.delivery", logging.INFO, __file__, 1,
                               "%s: to=<%s>, status=%s (%s)",
                               ("ABCDEF012345", "b@x.test", "deferred", "451 4.3.0 later"), None)
    entry = json.loads(JsonFormatter(timestamps=False).format(record))
    assert entry == {
        "level": "info", "logger": "relay.delivery",
        "message": "ABCDEF012345: to=<b@x.test>, status=deferred (451 4.3.0 later)",
        "queue_id": "ABCDEF012345", "to": "b@x.test", "status": "deferred",
        "reply": "451 4.3.0 later",
    }



def test_text_formatter_writes_what_logging_formatter_writes():
    """The date is formatted once a second: the lines stay those of logging.Formatter,
    across second boundaries and in any order of times."""
    ours = TextFormatter(timestamps=True)
    stock = logging.Formatter("%(asctime)s %(name)s: %(message)s")
    for created in (1_764_487_000.0, 1_764_487_000.999, 1_764_487_001.0005,
                    1_764_487_001.5, 1_764_486_999.25, 1_764_487_060.042):
        record = logging.LogRecord("relay.delivery", logging.INFO, __file__, 1,
                                   "%s: status=%s", ("ABCDEF012345", "sent"), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == stock.format(record)
    untimed = logging.LogRecord("relay.policy", logging.INFO, __file__, 1, "x", None, None)
    assert TextFormatter(timestamps=False).format(untimed) == "relay.policy: x"


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def pass_logger(stream: TextIO) -> tuple[logging.Logger, PassHandler]:
    handler = PassHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"test-pass-{id(handler)}")
    logger.propagate = False
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    return logger, handler


def test_lines_of_one_loop_pass_go_out_in_one_write_at_its_end() -> None:
    stream = CountingStream()
    logger, _ = pass_logger(stream)

    async def main() -> tuple[str, str]:
        for n in range(5):
            logger.info("line %d", n)
        during = stream.getvalue()
        await asyncio.sleep(0)
        return during, stream.getvalue()

    during, after = asyncio.run(main())
    assert during == ""
    assert after == "".join(f"line {n}\n" for n in range(5))
    assert stream.writes == 1


def test_a_line_logged_where_no_loop_runs_is_written_at_once() -> None:
    stream = CountingStream()
    logger, _ = pass_logger(stream)
    logger.info("starting")
    assert stream.getvalue() == "starting\n"


def test_lines_left_by_a_loop_that_ended_come_out_before_the_next_and_at_shutdown() -> None:
    stream = CountingStream()
    logger, handler = pass_logger(stream)
    loop = asyncio.new_event_loop()
    loop.call_soon(logger.info, "from the first loop")
    loop.call_soon(loop.stop)
    loop.run_forever()  # stops before the flush it scheduled runs
    loop.close()

    async def second() -> None:
        logger.info("from the second loop")
        await asyncio.sleep(0)

    asyncio.run(second())
    assert stream.getvalue() == "from the first loop\nfrom the second loop\n"
    logger.info("ignored")  # no loop: written at once
    assert stream.getvalue().endswith("ignored\n")
    handler.flush()


def test_a_forked_child_does_not_write_the_parents_waiting_lines_again(tmp_path: Path) -> None:
    out = tmp_path / "log"
    with out.open("w") as stream:
        logger, _ = pass_logger(stream)

        async def main() -> None:
            logger.info("before the fork")
            pid = os.fork()
            if pid == 0:
                logger.info("the child")
                logging.shutdown()
                os._exit(0)
            await asyncio.to_thread(os.waitpid, pid, 0)

        asyncio.run(main())
    lines = out.read_text().splitlines()
    assert sorted(lines) == ["before the fork", "the child"]


def test_lines_waiting_are_written_before_a_reply() -> None:
    stream = CountingStream()
    logger, handler = pass_logger(stream)
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [handler]
    try:
        async def main() -> str:
            logger.info("4F2A: client=[127.0.0.1]")
            flush_waiting()  # what the listener does before "250 ... queued as 4F2A"
            return stream.getvalue()

        assert asyncio.run(main()) == "4F2A: client=[127.0.0.1]\n"
    finally:
        root.handlers[:] = saved


def test_a_stream_that_fails_loses_the_lines_and_raises_nothing() -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError("journal gone")

    logger, handler = pass_logger(Broken())

    async def main() -> None:
        logger.info("one")
        await asyncio.sleep(0)  # the flush at the end of the pass fails quietly
        logger.info("two")
        handler.flush()

    asyncio.run(main())
    assert handler.waiting == []


def test_a_pass_with_many_lines_is_written_in_whole_lines_of_at_most_pipe_buf() -> None:
    """Workers share one stderr: a pipe keeps a write of up to PIPE_BUF octets whole."""
    chunks: list[str] = []

    class Recording(io.StringIO):
        def write(self, text: str) -> int:
            chunks.append(text)
            return len(text)

    logger, _ = pass_logger(Recording())
    lines = [f"{n:04d}: " + "x" * 300 for n in range(40)] + ["long: " + "y" * 5000]

    async def main() -> None:
        for line in lines:
            logger.info(line)
        await asyncio.sleep(0)

    asyncio.run(main())
    assert "".join(chunks) == "".join(f"{line}\n" for line in lines)
    assert len(chunks) > 1
    assert all(chunk.endswith("\n") for chunk in chunks)
    assert all(len(chunk.encode()) <= select.PIPE_BUF for chunk in chunks[:-1])
    assert chunks[-1] == lines[-1] + "\n"  # longer than PIPE_BUF: alone
