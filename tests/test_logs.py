"""Log lines: Postfix-shaped text, and the same fields as JSON."""

from __future__ import annotations

import json
import logging

from relay.ops.logs import JsonFormatter, fields_of


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

