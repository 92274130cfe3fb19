"""The outbox on its own (no sockets): positions, retention and history trimming."""

from __future__ import annotations

import json
import sqlite3

from relay.events import outbox
from relay.events.event import Event
from relay.queue.spool import _SCHEMA


def database() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    db.executescript(_SCHEMA + outbox.SCHEMA)
    return db


def event(kind: str, queue_id: str, when: float, message_id: str | None = None) -> Event:
    return Event(kind, queue_id, "app@app.test", "u@dest.test", message_id=message_id,
                 time=when)


def test_delivery_events_take_the_message_id_of_their_received_event():
    db = database()
    outbox.append(db, [event("received", "Q1", 1.0, "Abc@App.Test")])
    outbox.append(db, [event("sent", "Q1", 2.0)])
    rows = outbox.after(db, 0, 10)
    assert [json.loads(r.data)["message_id"] for r in rows] == ["Abc@App.Test"] * 2
    assert db.execute("SELECT DISTINCT message_id FROM event").fetchall() == [("abc@app.test",)]


def test_the_events_of_one_call_each_get_their_own_message_id():
    """Several recipients' results and several messages in one call (a group commit):
    the Message-ID is looked up once per message, and each keeps its own."""
    db = database()
    outbox.append(db, [event("received", "Q1", 1.0, "one@app.test"),
                       event("received", "Q2", 1.0, "two@app.test")])
    outbox.append(db, [event("sent", "Q1", 2.0), event("sent", "Q2", 2.0),
                       event("deferred", "Q1", 2.0), event("sent", "Q3", 2.0),
                       event("bounced", "Q2", 2.0)])
    rows = outbox.after(db, 2, 10)
    assert [(r.type, json.loads(r.data)["message_id"]) for r in rows] == [
        ("sent", "one@app.test"), ("sent", "two@app.test"), ("deferred", "one@app.test"),
        ("sent", ""), ("bounced", "two@app.test")]


def test_a_new_sink_starts_at_the_newest_event_and_advances_only_forward():
    db = database()
    outbox.append(db, [event("received", "Q1", 1.0, ""), event("sent", "Q1", 2.0)])
    assert outbox.position(db, "hook") == 2
    outbox.append(db, [event("received", "Q2", 3.0, "")])
    assert [r.seq for r in outbox.after(db, outbox.position(db, "hook"), 10)] == [3]
    outbox.advance(db, "hook", 3)
    outbox.advance(db, "hook", 1)  # a late, older position changes nothing
    assert outbox.position(db, "hook") == 3


def test_retention_keeps_at_most_max_pending_and_nothing_older_than_max_age():
    db = database()
    outbox.append(db, [event("sent", f"Q{i}", float(i)) for i in range(1, 11)])
    assert outbox.seq_before(db, cutoff=0.0, keep=100, seq=0) == 0  # nothing to drop
    assert outbox.seq_before(db, cutoff=0.0, keep=3, seq=0) == 7  # the newest 3 stay
    assert outbox.seq_before(db, cutoff=5.5, keep=100, seq=0) == 5  # older than 5.5 go
    assert outbox.backlog(db, 7) == (3, 8.0)
    assert outbox.seq_before(db, cutoff=0.0, keep=1, seq=0, types=("bounced",)) == 0


def test_trim_keeps_what_a_sink_still_needs_and_what_is_still_queued():
    db = database()
    db.execute("INSERT INTO message (id, sender, client_address, helo, listener, "
               "sasl_username, received_at, size, state, route, next_attempt, data) "
               "VALUES ('Q2', '', '', '', '', '', 0, 0, 'queued', '', 0, x'')")
    outbox.append(db, [event("received", "Q1", 1.0, ""), event("received", "Q2", 2.0, ""),
                       event("sent", "Q1", 3.0), event("sent", "Q3", 100.0)])
    db.execute("INSERT INTO sink_position (sink, seq) VALUES ('hook', 2)")
    # Q1's "sent" (seq 3) is old enough but the sink has not delivered it; Q2 is queued.
    assert outbox.trim(db, cutoff=50.0, limit=100) == 1
    assert [r.seq for r in outbox.after(db, 0, 10)] == [2, 3, 4]
    outbox.forget_sinks(db, [])
    assert outbox.trim(db, cutoff=50.0, limit=1) == 1
    assert [r.seq for r in outbox.after(db, 0, 10)] == [2, 4]
