"""The durable queue: every accepted message and its per-recipient state, on stable storage.

Layout: one SQLite database (`spool.db`) in WAL mode with `synchronous=FULL`.

Why SQLite rather than one file per message with rename and directory fsync:
- A message and its envelope are one transaction: after a crash either both exist or
  neither does, so a message whose DATA was interrupted never appears and there are no
  leftovers to clean up (Postfix and OpenSMTPD need a startup sweep for that).
- Per-recipient state changes (sent, deferred, failed) are small updates in place, not
  rewrites of a file.
- Group commit comes for free: messages that finish DATA at the same moment, and delivery
  results that arrive meanwhile, are written in one transaction and share one flush of
  the write-ahead log, while each client still gets its 250 only after the commit that
  contains its own message returned.
With `synchronous=FULL` SQLite fsyncs the WAL at every commit; the directory is fsync'd
once at open so the WAL file's own directory entry is durable too.

A message up to INLINE_MAX (256 KiB: what app servers send, nearly always) keeps its
bytes in its row's `data` column, made durable by the group commit's one WAL fsync. A
larger one lives in a file of its own, `data/<queue id>`: the write-ahead log stays small
whatever the messages weigh, and delivery reads it in pieces (relay/queue/content.py)
instead of whole. The file is written and fsync'd, and the `data` directory fsync'd,
before the transaction that inserts the row commits; the file is removed after the
transaction that deletes the row committed. So a committed row always has its bytes,
and a crash leaves at most files without a row, removed at the next open.

One connection, used by one caller at a time (an asyncio lock). The statements of a
group commit run on the event loop: microseconds each, on pages SQLite or the OS has
cached. Everything that waits for the disk runs in one dedicated thread: the COMMIT
(the log write and its fsync), opening and checking the database, and every read.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from relay.events import outbox
from relay.events.event import Event
from relay.message import write_all
from relay.ops.conditions import DISK_FULL, SPOOL_UNWRITABLE, Conditions
from relay.queue.content import Content
from relay.queue.onethread import OneThread
from relay.queue.walcheck import wal_damage

T = TypeVar("T")

log = logging.getLogger("relay.spool")

DATA_DIR = "data"  # one file per large message, named by its queue id
# A message up to this size is stored in its spool.db row: the group commit's one WAL
# fsync makes it durable together with every other message of the batch. A larger one
# gets a file of its own (written and fsync'd before the row that names it commits), so
# that no large message is ever held whole in memory. Both the same as the part of a
# message the listener holds in memory (relay/inbound/protocol.py).
INLINE_MAX = 256 * 1024
INCOMING_DIR = "incoming"  # messages being received (relay/inbound/protocol.py)
COPY_PIECE = 1024 * 1024
# Passes of the event loop a group commit waits for while each brings more writes
# (Spool._gather). Measured with bench/: one worker under load made 497 commits in two
# seconds instead of 912, for 4 % less CPU a message, and p99 was no higher.
GATHER_PASSES = 4

MessageState = Literal["queued", "hold", "failed"]
RecipientState = Literal["pending", "sent", "failed"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    client_address TEXT NOT NULL,
    helo TEXT NOT NULL,
    listener TEXT NOT NULL,
    sasl_username TEXT NOT NULL,
    received_at REAL NOT NULL,
    size INTEGER NOT NULL,
    state TEXT NOT NULL,
    route TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    smtputf8 INTEGER NOT NULL DEFAULT 0,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS recipient (
    message_id TEXT NOT NULL REFERENCES message(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    address TEXT NOT NULL,
    state TEXT NOT NULL,
    reply TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (message_id, position)
);
CREATE INDEX IF NOT EXISTS message_due ON message (state, next_attempt);
"""

_MESSAGE_COLUMNS = (
    "id, sender, client_address, helo, listener, sasl_username, received_at, size, "
    "state, route, attempts, next_attempt, last_error, smtputf8"
)

_COLUMN_NAMES = tuple(name.strip() for name in _MESSAGE_COLUMNS.split(","))


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the SMTP session learned about a message, as it is stored."""

    sender: str  # "" is the null sender <>
    recipients: tuple[str, ...]
    client_address: str
    helo: str
    listener: str
    sasl_username: str = ""
    received_at: float = 0.0
    route: str = "default"
    hold: bool = False
    # RFC 6531: the message needs SMTPUTF8 upstream (UTF-8 addresses or headers).
    smtputf8: bool = False


@dataclass(frozen=True, slots=True)
class Recipient:
    position: int
    address: str
    state: RecipientState
    reply: str


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A stored message's envelope and delivery state (its bytes are loaded separately)."""

    id: str
    sender: str
    client_address: str
    helo: str
    listener: str
    sasl_username: str
    received_at: float
    size: int
    state: MessageState
    route: str
    attempts: int
    next_attempt: float
    last_error: str
    smtputf8: bool
    recipients: tuple[Recipient, ...]

    @property
    def pending(self) -> tuple[Recipient, ...]:
        return tuple(r for r in self.recipients if r.state == "pending")


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one delivery attempt for one recipient."""

    position: int
    state: RecipientState  # "pending" means deferred: try again later
    reply: str


def fresh(queue_id: str, envelope: Envelope, size: int) -> QueuedMessage:
    """The QueuedMessage that store() of `envelope` just wrote (no attempts yet)."""
    return QueuedMessage(
        id=queue_id, sender=envelope.sender, client_address=envelope.client_address,
        helo=envelope.helo, listener=envelope.listener,
        sasl_username=envelope.sasl_username, received_at=envelope.received_at, size=size,
        state="hold" if envelope.hold else "queued", route=envelope.route, attempts=0,
        next_attempt=envelope.received_at, last_error="", smtputf8=envelope.smtputf8,
        recipients=tuple(Recipient(i, address, "pending", "")
                         for i, address in enumerate(envelope.recipients)),
    )


class SpoolError(Exception):
    """The spool could not store or update a message (disk full, I/O error, corruption)."""


class SpoolUnusable(SpoolError):
    """The spool cannot be opened for this relay; the message is one line for the
    operator and `exit_status` the sysexits.h code the process exits with."""

    exit_status = 74  # EX_IOERR


class SpoolCannotCreate(SpoolUnusable):
    """The spool directory or its files cannot be created or opened (permissions, a
    read-only file system)."""

    exit_status = 73  # EX_CANTCREAT


class SpoolBusy(SpoolUnusable):
    """Another process owns the spool (a second relay, or workers of a dead one)."""

    exit_status = 75  # EX_TEMPFAIL: it may be free later


class SpoolDamaged(SpoolUnusable):
    """The database fails its integrity check, or committed data has gone missing."""


def new_queue_id() -> str:
    # Time-ordered (microseconds) plus randomness: unique across restarts and relays.
    # Not secret, so the random module (reseeded in each forked worker) rather than a
    # system call for random bytes at every message.
    return f"{time.time_ns() // 1000:013X}{random.getrandbits(24):06X}"


class Spool:
    """The queue on disk. Open it with `await spool.open()` before use."""

    def __init__(self, directory: Path, conditions: Conditions | None = None) -> None:
        self.directory = directory
        # Where the listener writes the part of a large message past its first octets
        # while it arrives; stored messages are copied from there into data/.
        self.incoming = directory / INCOMING_DIR
        # A full disk or an unwritable spool is a condition: logged when it starts and
        # when it ends (with the count of refused writes), never once per message.
        self.conditions = conditions or Conditions()
        self._thread = OneThread("spool")
        self._db: sqlite3.Connection | None = None
        # Writes waiting for the next group commit: a function run inside the
        # transaction, and the future that gets its result once the commit returned.
        # A write may wait for a file (a message's bytes) to be on disk first.
        self._pending: list[tuple[Callable[[], Any], asyncio.Future[Any],
                                  asyncio.Future[None] | None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._lock: int | None = None  # the open lock file, held for the spool's lifetime
        # Inside a group commit: whether rows naming new files were inserted, and the
        # ids whose files go once the commit returned.
        self._new_files = False
        self._removed: list[str] = []
        self.commits = 0  # group commits so far (each one WAL flush)
        # One user of the connection at a time: a group commit (its statements on the
        # event loop, its COMMIT in the thread) or a read (in the thread).
        self._busy = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<Spool {self.directory}>"

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        """`func` in the spool's thread, once nothing else uses the connection."""
        async with self._busy:
            return await self._in_thread(func, *args)

    async def _in_thread(self, func: Callable[..., T], *args: Any) -> T:
        try:
            return await self._thread.run(func, *args)
        except sqlite3.Error as exc:
            raise SpoolError(str(exc)) from exc

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as exc:
            raise SpoolCannotCreate(f"cannot create spool directory {self.directory}: "
                                    f"{exc.strerror}") from exc
        self._lock = _own(self.directory)
        database = self.directory / "spool.db"
        wal = self.directory / "spool.db-wal"
        if _size(wal) > 0 and _size(database) == 0:
            # SQLite would start a new, empty database and drop the log's commits.
            raise SpoolDamaged(f"spool {database} is empty or missing next to a non-empty "
                               f"{wal.name}: committed mail would be lost; see "
                               "`policy-relay spool check`")
        if (damage := wal_damage(wal)) is not None:
            # Checked before SQLite opens the log: its replay would stop at the damage
            # and the next checkpoint would overwrite the commits after it.
            raise _damaged(database, str(damage))
        try:
            db = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            problem = integrity_problem(db)
            if problem is None:
                db.executescript(_SCHEMA + outbox.SCHEMA)
        except sqlite3.OperationalError as exc:
            if "malformed" not in str(exc) and "not a database" not in str(exc):
                # Permissions, a read-only file system, a full disk: not damage.
                raise SpoolCannotCreate(f"cannot open spool {database}: {exc}") from exc
            problem = str(exc)
        except sqlite3.DatabaseError as exc:
            problem = str(exc)
        if problem is not None:
            raise _damaged(database, problem)
        self._db = db
        self._adopt_files(db)
        _fsync_directory(self.directory)

    def _adopt_files(self, db: sqlite3.Connection) -> None:
        """Make the data directory, and remove the files a crash left without a row
        (a message whose commit never returned: its client got no 250)."""
        directory = self.directory / DATA_DIR
        try:
            directory.mkdir(exist_ok=True, mode=0o750)
            names = set(os.listdir(directory))
            self.incoming.mkdir(exist_ok=True, mode=0o750)
            for name in os.listdir(self.incoming):  # messages whose DATA never ended
                (self.incoming / name).unlink(missing_ok=True)
        except OSError as exc:
            raise SpoolCannotCreate(f"cannot create {exc.filename}: {exc.strerror}") from exc
        stored = {queue_id for (queue_id,) in db.execute("SELECT id FROM message")}
        orphans = names - stored
        for name in orphans:
            (directory / name).unlink(missing_ok=True)
        if orphans:
            log.info("spool %s: removed %d message files without a committed message (an "
                     "interrupted DATA)", self.directory, len(orphans))
        missing = db.execute(
            "SELECT count(*) FROM message WHERE length(data) = 0").fetchone()[0] - len(
            stored & names)
        if missing > 0:
            raise _damaged(self.directory / "spool.db",
                           f"{missing} stored messages have no file in {directory}")

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._thread.close()
        if self._lock is not None:
            os.close(self._lock)  # releases the lock
            self._lock = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError("spool is not open")
        return self._db

    # -- storing ----------------------------------------------------------------------

    async def store(
        self, queue_id: str, envelope: Envelope, data: bytes | Sequence[bytes],
        tail: Path | None = None, *, events: Sequence[Event] = (),
        copies: Sequence[tuple[tuple[str, Envelope], Sequence[Event]]] = (),
    ) -> dict[str, Content]:
        """Write a message durably, with its `events`; only when this returns may 250
        be sent. Returns the bytes stored for it and each copy, by queue id, for
        delivery to read.

        `data` may come in parts (headers to prepend, then the message as received),
        followed by the contents of the file `tail` (the rest of a large message). Up to
        INLINE_MAX they go into the row; beyond, into a file, written one after the
        other, never joined in memory, the tail copied a piece at a time. `copies` are
        messages of their own with the same bytes (archive copies, relay.policy.rewrite),
        each with its events, stored in the same transaction (all or none); a file of
        the message's has a hard link per copy."""
        parts = (data,) if isinstance(data, bytes) else tuple(data)
        size = sum(len(part) for part in parts) + (tail.stat().st_size if tail else 0)
        inline = b"".join(parts) if tail is None and size <= INLINE_MAX else b""

        def insert() -> None:
            self._insert(queue_id, envelope, size, events, inline)
            for (copy_id, copy), copy_events in copies:
                self._insert(copy_id, copy, size, copy_events, inline)

        ids = [queue_id, *(copy_id for (copy_id, _), _ in copies)]
        if inline:
            await self._write(insert)
            return dict.fromkeys(ids, Content.of(inline))
        path, *links = (self.data_path(name) for name in ids)
        # Files are written and fsync'd in parallel threads; the group commit waits for
        # those of its messages, so their rows (and any delivery results meanwhile)
        # still share one commit.
        written = asyncio.get_running_loop().run_in_executor(
            None, _write_file, path, parts, tail, links)
        try:
            await self._write(insert, prepared=written)
        except SpoolError:
            if not _why(written):
                for name in (path, *links):
                    name.unlink(missing_ok=True)  # ours, and no row names it
            raise
        return {name: Content(self.data_path(name), size) for name in ids}

    def post(self, events: Sequence[Event]) -> None:
        """Record events that change no message (a refused command, a discard) in the
        next group commit, without waiting for it: the SMTP reply does not wait."""
        self.post_write(functools.partial(outbox.append, events=events))

    def post_write(self, func: Callable[[sqlite3.Connection], object]) -> None:
        """As write(), but nobody waits for it (a failure is logged by the spool, as
        every refused write is)."""
        future = asyncio.ensure_future(self.write(func))
        future.add_done_callback(_quiet)

    async def write(self, func: Callable[[sqlite3.Connection], T]) -> T:
        """Run `func` on the spool's connection in the next group commit."""
        return await self._write(lambda: func(self.db))

    def data_path(self, queue_id: str) -> Path:
        return self.directory / DATA_DIR / queue_id

    async def _write(
        self, func: Callable[..., T], *args: Any, prepared: asyncio.Future[None] | None = None
    ) -> T:
        """Run `func` in the next group commit (once `prepared` is done, and not if it
        failed); return its result once that commit returned (and with it, under
        synchronous=FULL, the WAL is on stable storage)."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((lambda: func(*args), done, prepared))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await done

    async def _flush(self) -> None:
        # Group commit: whatever arrived while the previous commit was running goes
        # into the next transaction together: new messages and delivery results alike.
        while self._pending:
            await self._gather()
            batch, self._pending = self._pending, []
            preparations = [p for _, _, p in batch if p is not None]
            if preparations:
                await asyncio.wait(preparations)
            failed = {i: SpoolError(f"cannot write the message file: {_why(p)}")
                      for i, (_, _, p) in enumerate(batch) if p is not None and _why(p)}
            ops = [op for i, (op, _, _) in enumerate(batch) if i not in failed]
            try:
                committed = iter(await self._group_commit(ops))
            except Exception as exc:  # every waiter must hear about the failure
                committed = iter([SpoolError(str(exc))] * len(ops))
            outcomes = [failed[i] if i in failed else next(committed) for i in range(len(batch))]
            for (_, done, _), outcome in zip(batch, outcomes, strict=True):
                self._note(outcome)
                if done.done():
                    continue
                if isinstance(outcome, BaseException):
                    done.set_exception(outcome)
                else:
                    done.set_result(outcome)

    async def _gather(self) -> None:
        """Let the loop run a pass before committing, and more while each pass brings more
        writes (at most GATHER_PASSES): under load sessions end DATA pass after pass,
        and every commit costs a thread hop, an fsync and the frames of the pages it
        touches, shared by the messages it carries. A write alone waits one pass more."""
        for _ in range(GATHER_PASSES):
            waiting = len(self._pending)
            await asyncio.sleep(0)
            if len(self._pending) == waiting:
                return

    @property
    def writable(self) -> bool:
        """False while the spool refuses writes."""
        return not any(self.conditions.active(name) for name in (DISK_FULL, SPOOL_UNWRITABLE))

    def write_failed(self, why: str) -> None:
        """A write for the spool outside it failed (a message arriving, relay/inbound):
        it counts as the spool's own."""
        self._note(SpoolError(why))

    def _note(self, outcome: object) -> None:
        if isinstance(outcome, BaseException):
            # SQLite says "database or disk is full"; the OS says ENOSPC.
            full = any(sign in str(outcome) for sign in ("is full", os.strerror(errno.ENOSPC)))
            self.conditions.failing(
                DISK_FULL if full else SPOOL_UNWRITABLE,
                f"cannot write to the spool {self.directory}: {outcome}",
                unit="refused writes", blocks_mail=True,
                consequence="new mail gets 451 and delivery results wait until it can")
        else:
            for name in (DISK_FULL, SPOOL_UNWRITABLE):
                self.conditions.cleared(name)

    async def _group_commit(self, ops: Sequence[Callable[[], Any]]) -> list[Any]:
        """One transaction for all `ops`: one that fails is undone alone and its waiter
        gets the error; the others commit.

        The statements run here, on the event loop: each takes microseconds, and run in
        the spool's thread they would contend with the loop for the interpreter at every
        statement (sqlite3 lets it go around each step), which cost a fifth of the
        spool's CPU. Only the COMMIT, which writes the log and waits for fsync, goes to
        the thread."""
        async with self._busy:
            try:
                outcomes = self._apply(ops)
            except BaseException:
                self._abandon()
                raise
            try:
                await self._in_thread(self._commit)
            except asyncio.CancelledError:
                raise  # the thread goes on to finish the COMMIT: nothing to undo here
            except BaseException:
                self._abandon()
                raise
            return outcomes

    def _apply(self, ops: Sequence[Callable[[], Any]]) -> list[Any]:
        """Begin the transaction and run `ops` in it; their outcomes."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            return [op() for op in ops]  # nearly always: no savepoints needed
        except sqlite3.Error:
            # Start again, each op in a savepoint of its own. Ops change nothing but
            # the database and _removed, so running them twice is safe.
            if db.in_transaction:
                db.execute("ROLLBACK")
            self._removed.clear()
            db.execute("BEGIN IMMEDIATE")
            return [self._alone(op) for op in ops]

    def _commit(self) -> None:
        """Make the open transaction durable (spool thread), then remove the files of
        the messages it deleted."""
        if self._new_files:
            # The files' directory entries are durable before the rows naming them.
            _fsync_directory(self.directory / DATA_DIR)
        self.db.execute("COMMIT")
        self._new_files = False
        self.commits += 1
        for queue_id in self._removed:
            self.data_path(queue_id).unlink(missing_ok=True)
        self._removed.clear()

    def _abandon(self) -> None:
        """Undo the open transaction, if any, after a failure."""
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self._removed.clear()
        self._new_files = False

    def _alone(self, op: Callable[[], Any]) -> Any:
        """`op` in a savepoint: its result, or the SpoolError it ended with, undone."""
        db = self.db
        db.execute("SAVEPOINT op")
        try:
            return op()
        except sqlite3.Error as exc:
            db.execute("ROLLBACK TO op")
            return SpoolError(str(exc))
        finally:
            db.execute("RELEASE op")

    def _insert(
        self, queue_id: str, env: Envelope, size: int, events: Sequence[Event] = (),
        inline: bytes = b"",
    ) -> None:
        """The message's row; its bytes are `inline`, or else in its file."""
        if not inline:
            self._new_files = True
        db = self.db
        db.execute(
            "INSERT INTO message (id, sender, client_address, helo, listener, "
            "sasl_username, received_at, size, state, route, next_attempt, smtputf8, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                queue_id, env.sender, env.client_address, env.helo, env.listener,
                env.sasl_username, env.received_at, size,
                "hold" if env.hold else "queued", env.route, env.received_at,
                int(env.smtputf8), inline,
            ),
        )
        db.executemany(
            "INSERT INTO recipient (message_id, position, address, state) "
            "VALUES (?, ?, ?, 'pending')",
            [(queue_id, i, rcpt) for i, rcpt in enumerate(env.recipients)],
        )
        outbox.append(db, events)

    # -- reading ----------------------------------------------------------------------

    async def due(
        self, now: float, limit: int, exclude: Iterable[str] = ()
    ) -> list[tuple[QueuedMessage, Content]]:
        """Queued messages whose next attempt is due, oldest first, each with its bytes
        (those stored in its row, or its file to be read in pieces)."""

        def select() -> list[tuple[QueuedMessage, Content]]:
            where = "state = 'queued' AND next_attempt <= ?"
            found = self._select(where, (now,), limit, set(exclude))
            if not found:
                return []
            ids = [m.id for m in found]
            inline = dict(self.db.execute(
                f"SELECT id, data FROM message WHERE id IN ({', '.join('?' * len(ids))}) "
                "AND length(data) > 0", ids))
            return [(m, Content.of(bytes(inline[m.id])) if m.id in inline
                     else Content(self.data_path(m.id), m.size)) for m in found]

        return await self._run(select)


    async def get(self, queue_id: str) -> QueuedMessage | None:
        found = await self._run(self._select, "id = ?", (queue_id,), 1, set())
        return found[0] if found else None

    async def messages(self, state: MessageState | None = None) -> list[QueuedMessage]:
        if state is None:
            return await self._run(self._select, "1", (), -1, set())
        return await self._run(self._select, "state = ?", (state,), -1, set())

    def _select(
        self, where: str, args: tuple[Any, ...], limit: int, exclude: set[str]
    ) -> list[QueuedMessage]:
        db = self.db
        rows = db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM message WHERE {where} "
            "ORDER BY next_attempt, id LIMIT ?",
            (*args, limit + len(exclude) if limit >= 0 else -1),
        ).fetchall()
        result = []
        for row in rows:
            if row[0] in exclude:
                continue
            recipients = tuple(
                Recipient(pos, addr, state, reply)
                for pos, addr, state, reply in db.execute(
                    "SELECT position, address, state, reply FROM recipient "
                    "WHERE message_id = ? ORDER BY position",
                    (row[0],),
                )
            )
            fields = dict(zip(_COLUMN_NAMES, row, strict=True))
            fields["smtputf8"] = bool(fields["smtputf8"])
            result.append(QueuedMessage(**fields,
                                        recipients=recipients))
            if len(result) == limit:
                break
        return result

    async def data(self, queue_id: str) -> bytes:
        return await self._run(self._data, queue_id)

    def _data(self, queue_id: str) -> bytes:
        row = self.db.execute("SELECT data FROM message WHERE id = ?", (queue_id,)).fetchone()
        if row is None:
            raise SpoolError(f"no message {queue_id}")
        try:
            return bytes(row[0]) or self.data_path(queue_id).read_bytes()
        except OSError as exc:
            raise SpoolError(f"cannot read {self.data_path(queue_id)}: {exc.strerror}") from exc

    async def count(self) -> int:
        row = await self._run(lambda: self.db.execute("SELECT COUNT(*) FROM message").fetchone())
        return int(row[0])

    # -- updating ---------------------------------------------------------------------

    async def record_attempt(
        self, queue_id: str, outcomes: Sequence[Outcome], next_attempt: float, last_error: str,
        events: Sequence[Event] = (),
    ) -> MessageState | None:
        """Store one attempt's per-recipient outcomes and their `events`.

        Returns the message's new state, or None when nothing is left to do and the
        message was removed (every recipient sent).
        """
        # Group-committed with other results and new messages (see _flush).
        return await self._write(self._record, queue_id, outcomes, next_attempt, last_error,
                                 events)

    def _record(
        self, queue_id: str, outcomes: Sequence[Outcome], next_attempt: float, last_error: str,
        events: Sequence[Event],
    ) -> MessageState | None:
        db = self.db
        outbox.append(db, events)
        states = dict(db.execute(
            "SELECT position, state FROM recipient WHERE message_id = ?", (queue_id,)))
        for outcome in outcomes:
            if outcome.position in states:
                states[outcome.position] = outcome.state
        if "pending" not in states.values() and "failed" not in states.values():
            self._remove(queue_id)  # every recipient sent: no need to mark them first
            return None
        db.executemany(
            "UPDATE recipient SET state = ?, reply = ? WHERE message_id = ? AND position = ?",
            [(o.state, o.reply, queue_id, o.position) for o in outcomes],
        )
        new_state: MessageState = "queued" if "pending" in states.values() else "failed"
        db.execute(
            "UPDATE message SET state = ?, attempts = attempts + 1, next_attempt = ?, "
            "last_error = ? WHERE id = ? AND state = 'queued'",
            (new_state, next_attempt, last_error, queue_id),
        )
        return new_state

    async def set_state(
        self,
        queue_id: str,
        state: MessageState,
        next_attempt: float,
        expect: Iterable[MessageState] = ("queued", "hold", "failed"),
        events: Sequence[Event] = (),
    ) -> bool:
        """Move a message to `state` if it is still in one of the `expect`ed states; its
        `events` are recorded only if it moved.

        The condition is part of the UPDATE, so an operator's hold or flush cannot undo
        a delivery result stored between reading the message and changing it.
        """
        allowed = tuple(expect)

        def update() -> bool:
            marks = ", ".join("?" * len(allowed))
            cur = self.db.execute(
                f"UPDATE message SET state = ?, next_attempt = ? WHERE id = ? "
                f"AND state IN ({marks})",
                (state, next_attempt, queue_id, *allowed),
            )
            if cur.rowcount > 0:
                outbox.append(self.db, events)
            return cur.rowcount > 0

        return await self._write(update)

    async def delete(self, queue_id: str, events: Sequence[Event] = ()) -> bool:
        """Remove a message; its `events` are recorded only if it was there."""
        return bool(await self._write(self._remove, queue_id, events))

    def _remove(self, queue_id: str, events: Sequence[Event] = ()) -> bool:
        """Delete a message's row (and record its `events` only if it was there); its
        file, if it has one, goes once the transaction committed."""
        row = self.db.execute("DELETE FROM message WHERE id = ? RETURNING length(data)",
                              (queue_id,)).fetchone()
        if row is None:
            return False
        outbox.append(self.db, events)
        if row[0] == 0:
            self._removed.append(queue_id)
        return True


def _quiet(future: asyncio.Future[Any]) -> None:
    # A refused write is logged by the spool (_note); nobody waits for this one.
    if not future.cancelled():
        future.exception()


def _own(directory: Path) -> int:
    """Take the spool's lock for the life of this process, or raise SpoolBusy naming
    the holder. flock(2) locks are released by the kernel when the holder dies, so a
    crash never leaves a stale lock; processes forked while it is held share it."""
    path = directory / "spool.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise SpoolCannotCreate(f"cannot open {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise SpoolBusy(f"spool {directory} is in use by process {holder}; one relay "
                        "per spool") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _why(future: asyncio.Future[None]) -> str:
    """What went wrong in a finished future, "" if nothing."""
    exc = future.exception()
    if exc is None:
        return ""
    return (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)


def _write_file(path: Path, parts: Sequence[bytes], tail: Path | None = None,
                links: Sequence[Path] = ()) -> None:
    """Write and fsync a message's file; `links` are more names for it (archive copies:
    the files are never changed once written). The commit that names them fsyncs their
    directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        for part in parts:
            write_all(fd, part)
        if tail is not None:
            _append_file(tail, fd)
        os.fsync(fd)
        for link in links:
            os.link(path, link)
    except BaseException:
        for name in (path, *links):
            name.unlink(missing_ok=True)  # half a message: no row will name it
        raise
    finally:
        os.close(fd)


# What copy_file_range(2) says when the kernel cannot copy between these two files.
_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


def _append_file(source: Path, fd: int) -> None:
    """The file `source` written on at `fd`'s offset: by the kernel (copy_file_range),
    the octets never passing through this process, or where it cannot, a piece at a
    time (never whole in memory)."""
    with source.open("rb") as f:
        src = f.fileno()
        try:
            while os.copy_file_range(src, fd, COPY_PIECE):
                pass
            return
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
        # Both offsets stand after what the kernel copied, if anything: go on from there.
        while piece := os.read(src, COPY_PIECE):
            write_all(fd, piece)


def _damaged(database: Path, problem: str) -> SpoolDamaged:
    return SpoolDamaged(f"spool {database} is damaged ({problem}); the relay will not accept "
                        "mail into it: see `policy-relay spool check` and "
                        "`policy-relay spool salvage`")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def integrity_problem(db: sqlite3.Connection) -> str | None:
    """SQLite's own check of every page and index (PRAGMA quick_check), or None if the
    database is sound."""
    rows = db.execute("PRAGMA quick_check").fetchall()
    if rows == [("ok",)]:
        return None
    return "; ".join(str(r[0]) for r in rows[:3])


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
