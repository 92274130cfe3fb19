"""Log lines: Postfix-shaped text, and the same fields as JSON."""

from __future__ import annotations

import json
import logging

from relay.ops.logs import JsonFormatter, TextFormatter, fields_of


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
