"""`policy-relay trace`: a message's history (decision trace and delivery attempts) found by
queue id, Message-ID or recipient, in the events of every spool shard.

Read straight from the spool databases (read-only), so it works for messages long gone
from the queue and while the relay is stopped; the relay's own writes are not blocked
(SQLite WAL readers never block the writer).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any


def shards(spool_root: Path) -> list[Path]:
    """spool.db of worker 0 (the spool root) and of each worker-N below it."""
    found = [spool_root / "spool.db", *sorted(spool_root.glob("worker-*/spool.db"))]
    return [p for p in found if p.exists()]


def find(spool_root: Path, query: str) -> list[list[dict[str, Any]]]:
    """The histories that match `query`: each a list of events, oldest first. A refused
    command (nothing stored) is a history of its own."""
    key = query.strip().strip("<>").lower()
    histories: list[list[dict[str, Any]]] = []
    for path in shards(spool_root):
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            ids = [row[0] for row in db.execute(
                "SELECT DISTINCT queue_id FROM event WHERE queue_id != '' AND "
                "(queue_id = ? OR message_id = ? OR recipient = ?)",
                (query.strip().upper(), key, key))]
            marks = ", ".join("?" * len(ids))
            rows = db.execute(
                f"SELECT queue_id, data FROM event WHERE queue_id IN ({marks}) "
                "OR (queue_id = '' AND recipient = ?) ORDER BY seq", (*ids, key)).fetchall()
        finally:
            db.close()
        by_message: dict[str, list[dict[str, Any]]] = {}
        for queue_id, data in rows:
            event = json.loads(data)
            if queue_id:
                by_message.setdefault(queue_id, []).append(event)
            else:
                histories.append([event])
        histories.extend(by_message.values())
    return sorted(histories, key=lambda h: h[0]["time"])


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def text(histories: list[list[dict[str, Any]]]) -> str:
    out = []
    for history in histories:
        first = history[0]
        if first["queue_id"]:
            out.append(f"message {first['queue_id']}: Message-ID <{first['message_id']}>, "
                       f"from <{first['sender'] or ''}>, client [{first['client_address']}], "
                       f"listener {first['listener']}")
        else:
            out.append(f"NOQUEUE: client [{first['client_address']}], "
                       f"from <{first['sender'] or ''}>, listener {first['listener']}")
        for event in history:
            out.append(f"  {_when(event['time'])} {event['type']}{_detail(event)}")
            for line in event.get("trace") or ():
                out.append(f"      {line}")
    return "\n".join(out) + "\n" if out else ""


def _detail(event: dict[str, Any]) -> str:
    parts = []
    if event.get("recipient"):
        parts.append(f"to=<{event['recipient']}>")
    elif event.get("recipients"):
        parts.append("to=" + ",".join(f"<{r}>" for r in event["recipients"]))
    for key in ("stage", "rule", "size", "attempts", "relay", "tls", "by"):
        if event.get(key) not in (None, ""):
            parts.append(f"{key}={event[key]}")
    if event.get("next_attempt"):
        parts.append(f"next_attempt={_when(event['next_attempt'])}")
    if event.get("reply"):
        parts.append(f'reply="{event["reply"]}"')
    return " " + " ".join(parts) if parts else ""
