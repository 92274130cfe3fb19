"""Log output: Postfix-shaped text lines, or the same fields as one JSON object a line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import sys
import time
import traceback
from asyncio import AbstractEventLoop
from asyncio import _get_running_loop as asyncio_running_loop
from collections.abc import Iterator
from typing import TextIO

# "4F2A1C9B7E: to=<a@b>, relay=host:25, status=sent (250 ...)" and
# "NOQUEUE: reject: RCPT from [10.0.0.1]: 554 ...; from=<a@b> to=<c@d> rule=x".
_QUEUE_ID = re.compile(r"^(?P<id>NOQUEUE|[0-9A-F]{10,}):\s")
_FIELD = re.compile(r"(?P<key>[a-z_]+)=(?P<value><[^>]*>|\[[^\]]*\]|[^\s,;]+)")
_STATUS_REPLY = re.compile(r"status=\w+ \((?P<reply>.*)\)$")


def refusal_line(
    stage: str, client: str, reply: object, *, sender: str | None, helo: str,
    listener: str, rule: str, recipient: str | None = None, detail: str = "",
) -> str:
    """Every refusal in one shape, whoever refused (a rule, a limit, the server):

    NOQUEUE: reject: RCPT from [10.9.8.7]: 554 5.7.1 ...; from=<a@b> to=<c@d> helo=<app1>
    listener=smtp rule=final_action

    `from=<>` before MAIL too (Postfix prints what it has); `rule` names the policy
    rule, or the server setting that refused (max_connections, require_tls, ...).
    """
    fields = [f"from=<{sender or ''}>"]
    if recipient is not None:
        fields.append(f"to=<{recipient}>")
    fields.append(f"helo=<{helo}>")
    if detail:
        fields.append(detail)
    fields += [f"listener={listener}", f"rule={rule}"]
    return f"NOQUEUE: reject: {stage} from [{client}]: {reply}; {' '.join(fields)}"


def fields_of(message: str) -> dict[str, str]:
    """The key=value fields of one of our log lines, for structured output."""
    fields: dict[str, str] = {}
    match = _QUEUE_ID.match(message)
    if match:
        fields["queue_id"] = match.group("id")
    for found in _FIELD.finditer(message):
        value = found.group("value")
        if value.startswith("<") and value.endswith(">"):
            value = value[1:-1]
        fields.setdefault(found.group("key"), value)
    if reply := _STATUS_REPLY.search(message):
        fields["reply"] = reply.group("reply")
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, the message and its fields."""

    def __init__(self, timestamps: bool) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {}
        if self.timestamps:
            entry["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
                f".{int(record.msecs):03d}Z"
            )
        entry.update(level=record.levelname.lower(), logger=record.name, message=message)
        entry.update(fields_of(message))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """"2026-11-30 07:36:06,123 relay.delivery: <message>", as logging.Formatter writes
    it, with the date and time formatted once a second rather than for every line."""

    def __init__(self, timestamps: bool) -> None:
        super().__init__(("%(asctime)s " if timestamps else "") + "%(name)s: %(message)s")
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


class PassHandler(logging.StreamHandler[TextIO]):
    """Writes the lines logged in one pass of the event loop together, in one write at
    the end of the pass (or sooner: flush_waiting), rather than a system call for each
    (two lines a message, under load several messages a pass). A line logged where no
    loop runs (start, stop, another thread) is written at once, after those still
    waiting. A process killed outright loses at most the lines of the pass it was in;
    one that exits flushes them (logging.shutdown)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.waiting: list[str] = []
        self._flush_on: AbstractEventLoop | None = None  # the loop a flush is due on
        # A child forked with lines waiting would write them a second time.
        os.register_at_fork(before=self.flush, after_in_child=self._forget)

    def emit(self, record: logging.LogRecord) -> None:
        # Called with the handler's lock held (logging.Handler.handle).
        try:
            self.waiting.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        loop = asyncio_running_loop()
        if loop is None:
            self._write()
        elif self._flush_on is not loop:
            self._flush_on = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._flush_on = None
            self._write()
        finally:
            self.release()

    def _forget(self) -> None:
        # In a child just forked: a line logged after the flush above, by another
        # thread, is the parent's to write.
        self.waiting = []
        self._flush_on = None

    def _write(self) -> None:
        if not self.waiting:
            return
        lines, self.waiting = self.waiting, []
        try:
            for chunk in _chunks(lines):
                self.stream.write(chunk)
                self.stream.flush()
        except Exception:
            # What logging.Handler.handleError does, without a record to name: say so on
            # the original stderr if it still takes it, never raise into the caller.
            if logging.raiseExceptions and sys.__stderr__ is not None:
                with contextlib.suppress(OSError):
                    traceback.print_exc(file=sys.__stderr__)


def _chunks(lines: list[str]) -> Iterator[str]:
    """`lines` joined in writes of at most PIPE_BUF octets (a longer line alone): the
    workers share one stderr, and a pipe keeps a write of up to PIPE_BUF whole, so no
    line of one worker lands inside another's."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        length = len(line.encode("utf-8", "surrogateescape"))
        if chunk and size + length > select.PIPE_BUF:
            yield "".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += length
    if chunk:
        yield "".join(chunk)


def flush_waiting() -> None:
    """Write the lines still waiting, now: called before the process tells anyone
    anything (a reply to an SMTP client, the control socket or a metrics scrape; a
    state to systemd or to the supervisor), so that no one hears of an outcome before
    its log line exists (whoever reads the log for the queue id in a 250 finds it)."""
    for handler in logging.root.handlers:
        if isinstance(handler, PassHandler) and handler.waiting:
            handler.flush()


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr; under journald ($JOURNAL_STREAM) the journal stamps each line."""
    timestamps = "JOURNAL_STREAM" not in os.environ
    handler = PassHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(timestamps))
    else:
        handler.setFormatter(TextFormatter(timestamps))
    # No format of ours shows the process, thread or multiprocessing names, nor the
    # source file and line of the call: not looking them up saves a system call, two
    # lookups and a walk up the stack for every line (the logging module's own advice,
    # "Optimization" in its documentation).
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logging._srcfile = None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command at INFO; our own lines carry what an operator needs.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, root.level))
