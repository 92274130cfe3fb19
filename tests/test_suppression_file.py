"""suppression.db is shared by every worker: created once before they open it."""

from __future__ import annotations

import threading
from pathlib import Path

from relay.events import suppression
from relay.events.settings import SuppressionSettings


def open_at_once(path: Path, count: int) -> list[Exception]:
    errors: list[Exception] = []

    def open_it() -> None:
        try:
            suppression.LocalList(path, 60.0).db.close()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return errors


def test_workers_opening_the_list_at_once_after_the_relay_created_it_all_succeed(
    tmp_path: Path,
):
    # Two first opens at once race on the switch to WAL mode and one is refused
    # ("database is locked"), which stopped a two-worker relay at start (status 73);
    # the relay creates the file before it starts its workers.
    for attempt in range(40):
        root = tmp_path / str(attempt)
        suppression.create_list(SuppressionSettings(), root)
        assert open_at_once(root / "suppression.db", 3) == []
