"""suppression.db is shared by every worker: created once before they open it."""

from __future__ import annotations

import sqlite3
import threading
import time
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


class CountingList(suppression.LocalList):
    """A real list that counts the lookups that went to the database."""

    queries = 0

    def _query(self, address: str) -> suppression.Entry | None:
        self.queries += 1
        return super()._query(address)


async def test_a_lookup_asked_again_is_answered_from_memory_until_any_program_changes_the_list(
    tmp_path: Path,
):
    """Lookups are remembered while suppression.db does not change; a change by this
    process, by another (the CLI, another worker: another LocalList) or by a plain
    sqlite3 connection is seen at the next lookup."""
    path = tmp_path / "suppression.db"
    suppression.create_list(SuppressionSettings(), tmp_path)
    worker, cli = CountingList(path, 3600.0), suppression.LocalList(path, 3600.0)
    try:
        await cli.add("gone@dest.test", "bounce", "550 5.1.1 no such user")
        for _ in range(3):
            assert await worker.lookup("fine@dest.test") is None
            assert (await worker.lookup("Gone@Dest.Test")).reply == "550 5.1.1 no such user"
        assert worker.queries <= 3  # the first of each, and one while the -shm appeared
        asked = worker.queries
        assert await worker.lookup("fine@dest.test") is None
        assert worker.queries == asked

        await cli.add("fine@dest.test", "operator", "suppressed by hand")
        assert (await worker.lookup("fine@dest.test")).reason == "operator"
        assert await cli.remove("gone@dest.test")
        assert await worker.lookup("gone@dest.test") is None

        with sqlite3.connect(path) as foreign:  # not through the relay's code
            foreign.execute("INSERT INTO suppressed VALUES ('new@dest.test', 'x', 'y', 0, ?)",
                            (time.time() + 60,))
        assert (await worker.lookup("new@dest.test")).reason == "x"
        assert worker.queries > asked
    finally:
        await worker.close()
        await cli.close()


async def test_a_change_made_after_every_other_connection_closed_is_seen(tmp_path: Path):
    """SQLite removes the -shm file when the last connection closes; a worker's own read
    connection keeps it in place, so the header it watches stays the one writers use."""
    path = tmp_path / "suppression.db"
    suppression.create_list(SuppressionSettings(), tmp_path)
    worker = CountingList(path, 3600.0)
    try:
        for round_ in range(3):  # every writer gone between changes
            # Remembered first: the answer comes from memory while nothing changes.
            for _ in range(2):
                assert await worker.lookup(f"later{round_}@dest.test") is None
                assert await worker.lookup(f"foreign{round_}@dest.test") is None
            asked = worker.queries
            assert await worker.lookup(f"later{round_}@dest.test") is None
            assert worker.queries == asked
            cli = suppression.LocalList(path, 3600.0)
            await cli.add(f"later{round_}@dest.test", "operator", "by hand")
            await cli.close()
            with sqlite3.connect(path) as foreign:
                foreign.execute("INSERT INTO suppressed VALUES (?, 'x', 'y', 0, ?)",
                                (f"foreign{round_}@dest.test", time.time() + 60))
            foreign.close()
            assert (await worker.lookup(f"later{round_}@dest.test")).reason == "operator"
            assert (await worker.lookup(f"foreign{round_}@dest.test")).reason == "x"
    finally:
        await worker.close()


async def test_a_remembered_entry_still_expires(tmp_path: Path):
    now = [1000.0]
    path = tmp_path / "suppression.db"
    suppression.create_list(SuppressionSettings(), tmp_path)
    worker = CountingList(path, 60.0, clock=lambda: now[0])
    writer = suppression.LocalList(path, 60.0, clock=lambda: now[0])
    try:
        await writer.add("gone@dest.test", "bounce", "550 5.1.1 no such user")
        assert await worker.lookup("gone@dest.test") is not None
        assert await worker.lookup("gone@dest.test") is not None
        asked = worker.queries
        now[0] += 61
        assert await worker.lookup("gone@dest.test") is None
        assert worker.queries == asked  # from memory, and expired all the same
    finally:
        await worker.close()
        await writer.close()
