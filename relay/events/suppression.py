"""The suppression list: recipients that failed permanently, refused at RCPT until they expire.

Local backend: `suppression.db` (SQLite, WAL) at the root of the spool directory, opened
by every worker and by `policy-relay suppress`, so one relay has one list however many
workers it runs and the list can be edited while it runs. Redis backend: one hash per
address at `<key_prefix><address>` that expires by itself, shared by every relay of a
fleet. Addresses are kept in lower case (RFC 5321 section 2.4 lets a receiver treat the
local part case-sensitively, but no receiver in practice does).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from redis import asyncio as aioredis

from relay.events.settings import SuppressionSettings

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppressed (
    address TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    reply TEXT NOT NULL,
    added REAL NOT NULL,
    expires REAL NOT NULL
);
"""


class SuppressionError(Exception):
    """The list could not be read or written (disk, Redis)."""


@dataclass(frozen=True, slots=True)
class Entry:
    address: str
    reason: str  # "bounce" (added by delivery) or what the operator said
    reply: str  # the upstream's reply that suppressed it
    added: float
    expires: float

    def as_dict(self) -> dict[str, Any]:
        return {"address": self.address, "reason": self.reason, "reply": self.reply,
                "added": self.added, "expires": self.expires}


class LocalList:
    """The list in suppression.db; every call runs in one thread of its own."""

    def __init__(self, path: Path, expire: float, clock: Callable[[], float] = time.time):
        self.path = path
        self.expire = expire
        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="suppression")
        self._db: sqlite3.Connection | None = None  # for writes, in the thread
        self._reading: sqlite3.Connection | None = None  # lookups, on the event loop
        self._has_read = False  # whether _reading has read (and so holds the database)
        self._remembered = _Remembered(Path(f"{path}-shm"))

    def __repr__(self) -> str:
        return f"<LocalList {self.path}>"

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, func, *args)
        except (sqlite3.Error, OSError) as exc:
            raise SuppressionError(f"{self.path}: {exc}") from exc

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = _open_database(self.path)
        return self._db

    async def prepare(self) -> None:
        """Create suppression.db now, as the relay's user: a list first written by
        `policy-relay suppress` run as root would not be the relay's to write."""
        await self._run(lambda: self.db)

    async def lookup(self, address: str) -> Entry | None:
        """Asked at every RCPT, so answered on the event loop itself: a primary-key read
        of a local WAL database never waits for a writer and takes a few microseconds,
        less than the hop to a thread and back would; an address asked again while the
        database has not changed since is answered from memory (_Remembered)."""
        return self._read(address)

    def _read(self, address: str) -> Entry | None:
        address = address.lower()
        remembered = self._remembered
        # Our read connection, once it has read, keeps the -shm file in place (SQLite
        # removes it only when the last connection closes): until then nothing is
        # remembered.
        version = remembered.version() if self._has_read else None
        if address in remembered.entries and version == remembered.at:
            entry = remembered.entries[address]
        else:
            entry = self._query(address)
            remembered.keep(version, address, entry)
        return entry if entry is not None and entry.expires > self.clock() else None

    def _query(self, address: str) -> Entry | None:
        try:
            if self._reading is None:
                self._reading = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                                timeout=0.1)
            row = self._reading.execute(
                "SELECT address, reason, reply, added, expires FROM suppressed "
                "WHERE address = ?", (address,)).fetchone()
            self._has_read = True
        except sqlite3.Error as exc:
            if not self.path.exists() or "no such table" in str(exc):
                return None  # nothing was ever suppressed
            raise SuppressionError(f"{self.path}: {exc}") from exc
        return Entry(*row) if row else None

    async def add(self, address: str, reason: str, reply: str,
                  added: float | None = None) -> Entry:
        now = self.clock() if added is None else added
        entry = Entry(address.lower(), reason, reply, now, now + self.expire)

        def put() -> None:
            self.db.execute("INSERT OR REPLACE INTO suppressed VALUES (?, ?, ?, ?, ?)",
                            (entry.address, entry.reason, entry.reply, entry.added,
                             entry.expires))

        await self._run(put)
        return entry

    async def remove(self, address: str) -> bool:
        def delete() -> bool:
            return self.db.execute("DELETE FROM suppressed WHERE address = ?",
                                   (address.lower(),)).rowcount > 0

        return await self._run(delete)

    async def entries(self) -> list[Entry]:
        def select() -> list[Entry]:
            now = self.clock()
            self.db.execute("DELETE FROM suppressed WHERE expires <= ?", (now,))
            return [Entry(*row) for row in self.db.execute(
                "SELECT address, reason, reply, added, expires FROM suppressed "
                "ORDER BY address")]

        return await self._run(select)

    async def close(self) -> None:
        self._remembered.close()
        if self._reading is not None:
            self._reading.close()
            self._reading = None
            self._has_read = False
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)


class _Remembered:
    """Lookups answered from memory while suppression.db has not changed since.

    Whether it changed is read from the header of its write-ahead log index, the -shm
    file SQLite keeps beside a database in WAL mode for every connection of every
    process (https://www.sqlite.org/walformat.html, section 2.1): two copies of 48
    octets, written one after the other by every commit, whatever program made it. An
    unchanged header is one pread, where a query takes a read transaction and two file
    locks on a file that every worker shares. Copies that differ (a commit writing them
    now) or no readable -shm: nothing is remembered, the database is asked."""

    def __init__(self, shm: Path) -> None:
        self.shm = shm
        self._fd = -1
        self.at: bytes | None = None  # the header the entries were read under
        self.entries: dict[str, Entry | None] = {}

    def version(self) -> bytes | None:
        """The header, asked once a connection of ours has read the database (so the
        file is the one SQLite uses, not one removed when every connection closed)."""
        try:
            if self._fd < 0:
                self._fd = os.open(self.shm, os.O_RDONLY | os.O_CLOEXEC)
            header = os.pread(self._fd, 96, 0)
        except OSError:
            self.close()
            return None
        if len(header) < 96 or header[:48] != header[48:]:
            return None
        return header[:48]

    def keep(self, version: bytes | None, address: str, entry: Entry | None) -> None:
        """Remember what the database said of `address`, asked after `version` was read
        (so it is at least that new: a commit in between changes the version, and the
        next lookup forgets it)."""
        if version != self.at or version is None or len(self.entries) >= REMEMBERED:
            self.entries.clear()
            self.at = version
        if version is not None:
            self.entries[address] = entry

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.entries.clear()
        self.at = None


# Addresses remembered at most; beyond, forgotten all at once (RCPT addresses repeat:
# the app servers' customers).
REMEMBERED = 65536


class RedisList:
    """The list in Redis, one hash per address with its own expiry."""

    def __init__(self, url: str, prefix: str, expire: float,
                 clock: Callable[[], float] = time.time, timeout: float = 1.0) -> None:
        self.client = aioredis.Redis.from_url(url, socket_timeout=timeout,
                                              socket_connect_timeout=timeout)
        self.prefix = prefix
        self.expire = expire
        self.clock = clock

    def __repr__(self) -> str:
        return f"<RedisList {self.prefix}*>"

    async def prepare(self) -> None:
        """Nothing to create: Redis keys come and go by themselves."""

    async def lookup(self, address: str) -> Entry | None:
        try:
            raw = await self.client.hgetall(self.prefix + address.lower())
        except Exception as exc:
            raise SuppressionError(f"redis: {exc}") from exc
        return _entry(address.lower(), raw)

    async def add(self, address: str, reason: str, reply: str,
                  added: float | None = None) -> Entry:
        now = self.clock() if added is None else added
        entry = Entry(address.lower(), reason, reply, now, now + self.expire)
        key = self.prefix + entry.address
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping={"reason": reason, "reply": reply, "added": now,
                                        "expires": entry.expires})
                pipe.expireat(key, int(entry.expires) + 1)
                await pipe.execute()
        except Exception as exc:
            raise SuppressionError(f"redis: {exc}") from exc
        return entry

    async def remove(self, address: str) -> bool:
        try:
            return bool(await self.client.delete(self.prefix + address.lower()))
        except Exception as exc:
            raise SuppressionError(f"redis: {exc}") from exc

    async def entries(self) -> list[Entry]:
        found = []
        try:
            async for key in self.client.scan_iter(match=self.prefix + "*", count=500):
                address = key.decode()[len(self.prefix):]
                entry = _entry(address, await self.client.hgetall(key))
                if entry is not None:
                    found.append(entry)
        except Exception as exc:
            raise SuppressionError(f"redis: {exc}") from exc
        return sorted(found, key=lambda e: e.address)

    async def close(self) -> None:
        await self.client.aclose()


def _entry(address: str, raw: Mapping[Any, Any]) -> Entry | None:
    if not raw:
        return None
    return Entry(address, raw[b"reason"].decode(), raw[b"reply"].decode(),
                 float(raw[b"added"]), float(raw[b"expires"]))


SuppressionList = LocalList | RedisList


def _open_database(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(_SCHEMA)
    return db


def create_list(settings: SuppressionSettings, spool_root: Path) -> None:
    """Create the local list's database now, in one process, before the workers open it:
    two first opens at once race on its switch to WAL mode, and the loser is told
    "database is locked" whatever its busy timeout."""
    if settings.backend == "redis":
        return
    path = spool_root / "suppression.db"
    try:
        _open_database(path).close()
    except (sqlite3.Error, OSError) as exc:
        raise SuppressionError(f"{path}: {exc}") from exc


def open_list(settings: SuppressionSettings, spool_root: Path) -> SuppressionList:
    if settings.backend == "redis":
        return RedisList(settings.redis_url, settings.key_prefix, settings.expire)
    return LocalList(spool_root / "suppression.db", settings.expire)
