"""A read-only connection to a spool's database, in a thread of its own.

Sinks read the outbox through it, so their reads never queue behind (or hold up) the
spool's group commits: in WAL mode readers and the writer do not block each other.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class Reader:
    def __init__(self, database: Path) -> None:
        self.database = database
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        self._db: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"<Reader {self.database}>"

    async def read(self, func: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, func)

    def _call(self, func: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            self._db = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True,
                                       check_same_thread=False, timeout=5.0)
        return func(self._db)

    async def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)
