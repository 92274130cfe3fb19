"""The events table in spool.db: written in the spool's own transactions, read by sinks.

An event is inserted by the same transaction as the change it describes (a message
stored, a recipient's result, an operator's hold), so a crash neither loses one nor
leaves one for a change that did not happen. The table is also the message history that
`policy-relay trace` reads: rows stay `history` seconds (and as long as their message is
queued), or longer while a sink has not delivered them.

Only queue ids and times are indexed: both grow with time, so a new entry goes at the
right edge of its index. An index of Message-IDs or recipients would dirty a page at a
random place for every event, in every group commit, on the path of every message;
`policy-relay trace` by Message-ID or recipient reads the history instead (0.2 s for a
million events from a warm page cache).

Each sink keeps its position (the last sequence number it delivered) in `sink_position`;
a sink seen for the first time starts at the newest event, not at the whole history.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from relay.events.event import Event

SCHEMA = """
CREATE TABLE IF NOT EXISTS event (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    time REAL NOT NULL,
    queue_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS event_queue_id ON event (queue_id);
CREATE INDEX IF NOT EXISTS event_time ON event (time);
CREATE TABLE IF NOT EXISTS sink_position (
    sink TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Stored:
    """An event as read back: its sequence number in this spool, type, time and JSON."""

    seq: int
    type: str
    time: float
    data: str


# json.dumps with separators builds an encoder for every call; two events a message.
_compact = json.JSONEncoder(separators=(",", ":")).encode


def append(db: sqlite3.Connection, events: Iterable[Event]) -> None:
    """Insert `events` (inside the caller's transaction)."""
    # The events of one call are nearly always about one message (a recipient's result
    # each): its Message-ID is looked up once.
    found: dict[str, str] = {}
    for event in events:
        message_id = event.message_id
        if message_id is None:
            message_id = found.get(event.queue_id)
        if message_id is None:
            row = db.execute(
                # The column is lower case for lookups; the record keeps what was sent.
                "SELECT json_extract(data, '$.message_id') FROM event WHERE queue_id = ? "
                "AND type = 'received' LIMIT 1", (event.queue_id,)).fetchone() \
                if event.queue_id else None
            message_id = found[event.queue_id] = row[0] if row else ""
        db.execute(
            "INSERT INTO event (type, time, queue_id, message_id, recipient, data) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (event.type, event.time, event.queue_id, message_id.lower(),
             (event.recipient or "").lower(),
             _compact(event.record(message_id))),
        )


def position(db: sqlite3.Connection, sink: str) -> int:
    """Where `sink` stands; a new sink starts at the newest event."""
    row = db.execute("SELECT seq FROM sink_position WHERE sink = ?", (sink,)).fetchone()
    if row is not None:
        return int(row[0])
    newest = db.execute("SELECT COALESCE(MAX(seq), 0) FROM event").fetchone()[0]
    db.execute("INSERT INTO sink_position (sink, seq) VALUES (?, ?)", (sink, newest))
    return int(newest)


def advance(db: sqlite3.Connection, sink: str, seq: int) -> None:
    db.execute("UPDATE sink_position SET seq = MAX(seq, ?) WHERE sink = ?", (seq, sink))


def _waiting(seq: int, types: Sequence[str]) -> tuple[str, list[object]]:
    """The WHERE clause (and its arguments) of the events after `seq` of `types` (all
    types when empty)."""
    if not types:
        return "seq > ?", [seq]
    return f"seq > ? AND type IN ({', '.join('?' * len(types))})", [seq, *types]


def after(db: sqlite3.Connection, seq: int, limit: int,
          types: Sequence[str] = ()) -> list[Stored]:
    """Up to `limit` events after `seq`, oldest first; only `types` when given."""
    where, args = _waiting(seq, types)
    rows = db.execute(f"SELECT seq, type, time, data FROM event WHERE {where} "
                      "ORDER BY seq LIMIT ?", (*args, limit)).fetchall()
    return [Stored(*row) for row in rows]


def backlog(db: sqlite3.Connection, seq: int,
            types: Sequence[str] = ()) -> tuple[int, float | None]:
    """(events waiting after `seq`, time of the oldest of them or None)."""
    where, args = _waiting(seq, types)
    count, oldest = db.execute(f"SELECT COUNT(*), MIN(time) FROM event WHERE {where}",
                               args).fetchone()
    return int(count), oldest


def seq_before(db: sqlite3.Connection, cutoff: float, keep: int, seq: int,
               types: Sequence[str] = ()) -> int:
    """The position that leaves at most `keep` events after `seq`, none older than
    `cutoff` (retention): `seq` itself when nothing needs dropping."""
    where, args = _waiting(seq, types)
    old = db.execute(f"SELECT MAX(seq) FROM event WHERE {where} AND time < ?",
                     (*args, cutoff)).fetchone()[0]
    new = max(seq, old or 0)
    over = db.execute(f"SELECT seq FROM event WHERE {where} ORDER BY seq DESC "
                      "LIMIT 1 OFFSET ?", (*args, keep)).fetchone()
    if over is not None:
        new = max(new, int(over[0]))
    return new


def trim(db: sqlite3.Connection, cutoff: float, limit: int) -> int:
    """Forget up to `limit` events older than `cutoff` that every sink has delivered and
    whose message has left the queue; returns how many."""
    floor = db.execute("SELECT MIN(seq) FROM sink_position").fetchone()[0]
    cursor = db.execute(
        "DELETE FROM event WHERE seq IN (SELECT seq FROM event WHERE time < ? AND seq <= ? "
        "AND queue_id NOT IN (SELECT id FROM message) LIMIT ?)",
        (cutoff, floor if floor is not None else 1 << 62, limit),
    )
    return cursor.rowcount


def forget_sinks(db: sqlite3.Connection, keep: Iterable[str]) -> None:
    """Drop the positions of sinks no longer configured (they would pin the history)."""
    names = tuple(keep)
    db.execute(f"DELETE FROM sink_position WHERE sink NOT IN ({', '.join('?' * len(names))})",
               names)
