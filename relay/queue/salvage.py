"""Reading a damaged spool: what is still readable, and copying it into a fresh spool."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from relay.queue.spool import DATA_DIR, Envelope, Spool, integrity_problem
from relay.queue.walcheck import wal_damage


@dataclass(frozen=True, slots=True)
class Survey:
    """What a spool database holds, as far as it can be read."""

    problem: str | None  # the integrity verdict, None when sound
    readable: list[tuple[str, Envelope, bytes, str]]  # id, envelope, bytes, state
    unreadable: int  # message rows that could not be read whole


def survey(database: Path) -> Survey:
    """Read every message row that can be read, one row at a time, so that damage to
    some pages costs only the messages stored there. Read-only: safe on a spool that
    a relay refused, and on one in use."""
    # Read before SQLite replays the log: what the replay would drop is reported, not
    # copied (salvage takes what SQLite reads: the commits before the damage).
    damage = wal_damage(database.with_name(database.name + "-wal"))
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        try:
            problem = integrity_problem(db)
        except sqlite3.DatabaseError as exc:
            problem = str(exc)
        if damage is not None:
            problem = str(damage) if problem is None else f"{damage}; {problem}"
        try:
            (last,) = db.execute("SELECT max(rowid) FROM message").fetchone()
        except sqlite3.DatabaseError:
            last = _last_rowid_by_probing(db)
        readable, unreadable = [], 0
        for rowid in range(1, (last or 0) + 1):
            try:
                row = db.execute(
                    "SELECT id, sender, client_address, helo, listener, sasl_username, "
                    "received_at, route, smtputf8, state, data FROM message WHERE rowid = ?",
                    (rowid,),
                ).fetchone()
                if row is None:
                    continue
                recipients = tuple(
                    address for address, state in db.execute(
                        "SELECT address, state FROM recipient WHERE message_id = ? "
                        "ORDER BY position", (row[0],))
                    if state == "pending"
                )
            except sqlite3.DatabaseError:
                unreadable += 1
                continue
            (queue_id, sender, client, helo, listener, user, received_at, route, utf8,
             state, data) = row
            if not data:  # kept in its own file (relay/queue/spool.py)
                try:
                    data = (database.parent / DATA_DIR / queue_id).read_bytes()
                except OSError:
                    unreadable += 1
                    continue
            if not recipients:
                continue  # nothing left to deliver (failed: kept for the record only)
            envelope = Envelope(sender, recipients, client, helo, listener, user,
                                received_at or time.time(), route, state == "hold",
                                bool(utf8))
            readable.append((queue_id, envelope, bytes(data), state))
        return Survey(problem, readable, unreadable)
    finally:
        db.close()


def _last_rowid_by_probing(db: sqlite3.Connection) -> int:
    """max(rowid) when the table's own answer is unreadable: the last rowid that answers,
    scanning until a long run of rowids answers nothing (delivered messages leave gaps)."""
    last, gap, rowid = 0, 100_000, 0
    while rowid - last < gap:
        rowid += 1
        try:
            if db.execute("SELECT 1 FROM message WHERE rowid = ?", (rowid,)).fetchone():
                last = rowid
        except sqlite3.DatabaseError:
            last = rowid  # a damaged row still counts: it is reported as unreadable
    return last


async def salvage(source: Path, target: Path) -> Survey:
    """Copy every readable message with its pending recipients into a fresh spool at
    `target`; the survey says what was copied and what was not."""
    found = survey(source)
    spool = Spool(target)
    await spool.open()
    try:
        for queue_id, envelope, data, _ in found.readable:
            await spool.store(queue_id, envelope, data)
    finally:
        await spool.close()
    return found
