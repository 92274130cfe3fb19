"""Log lines: Postfix-shaped text, and the same fields as JSON."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

from relay.ops.logs import JsonFormatter, LoopBatchedHandler, fields_of


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


class Writes(io.StringIO):
    """A stream that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def batched() -> tuple[logging.Logger, Writes]:
    stream = Writes()
    handler = LoopBatchedHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"test.batched.{id(stream)}")
    logger.propagate = False
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    return logger, stream


async def test_lines_of_one_loop_pass_are_written_together_once_it_is_over():
    logger, stream = batched()
    logger.info("one")
    logger.info("two")
    assert stream.writes == []  # the pass that logged them is not over
    await asyncio.sleep(0)
    assert stream.writes == ["one\ntwo\n"]
    logger.info("three")
    await asyncio.sleep(0)
    assert stream.writes == ["one\ntwo\n", "three\n"]


async def test_a_line_from_another_thread_comes_after_those_waiting():
    logger, stream = batched()
    logger.info("on the loop")
    await asyncio.to_thread(logger.info, "in a thread")
    assert stream.getvalue() == "on the loop\nin a thread\n"


def test_without_a_loop_a_line_is_written_at_once():
    logger, stream = batched()
    logger.info("now")
    assert stream.writes == ["now\n"]


def test_a_forked_child_does_not_write_the_parents_waiting_lines_again(tmp_path: Path):
    out = tmp_path / "out"
    script = f"""
import asyncio, logging, os
from relay.ops.logs import LoopBatchedHandler
stream = open({str(out)!r}, "a", buffering=1)
handler = LoopBatchedHandler(stream)
logging.getLogger().handlers[:] = [handler]
logging.getLogger().setLevel(logging.INFO)

async def main():
    logging.info("before the fork")
    pid = os.fork()
    if pid == 0:
        logging.shutdown()
        os._exit(0)
    os.waitpid(pid, 0)

asyncio.run(main())
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    assert out.read_text() == "before the fork\n"
