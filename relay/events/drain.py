"""Sinks read the outbox of their own spool and deliver what it holds, apart from mail.

Each worker process drains its own spool shard: a message lives in one shard, so its
events keep their order, and a slow or dead endpoint costs the shard a few reads, never
a reply to a client or a delivery. A sink's backlog is bounded by [events] max_pending
and max_age: what goes beyond is dropped, counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from relay.events import outbox
from relay.events.reader import Reader
from relay.events.settings import EventSettings, SinkSettings
from relay.events.sinks import Sink, SinkError, make_sink
from relay.ops.metrics import Metrics
from relay.queue.spool import Spool

log = logging.getLogger("relay.events")

# How often an idle sink looks for new events (events come at most this late; a batch
# that was not full waits as long, so that under load batches fill), and how often old
# history is trimmed.
POLL = 0.5
TRIM_EVERY = 60.0
TRIM_BATCH = 5000
FIRST_BACKOFF = 1.0


@dataclass
class SinkState:
    """One sink's progress, for the metrics and the log."""

    settings: SinkSettings
    sink: Sink
    position: int = 0
    failures: int = 0


class Drain:
    """Runs every configured sink over one spool, and trims its history."""

    def __init__(self, spool: Spool, settings: EventSettings, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.states = [SinkState(s, make_sink(s)) for s in settings.sinks]
        self.reader = Reader(spool.directory / "spool.db")
        self._tasks: list[asyncio.Task[None]] = []

    def __repr__(self) -> str:
        sinks = " ".join(f"{s.settings.name}@{s.position}" for s in self.states)
        return f"<Drain {self.spool.directory} {sinks}>"

    async def start(self) -> None:
        names = [s.settings.name for s in self.states]
        await self.spool.write(lambda db: outbox.forget_sinks(db, names))
        for state in self.states:
            name = state.settings.name
            state.position = await self.spool.write(
                functools.partial(outbox.position, sink=name))
            self._tasks.append(asyncio.create_task(self._run(state)))
        self._tasks.append(asyncio.create_task(self._trim()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for state in self.states:
            with contextlib.suppress(Exception):
                await state.sink.close()
        await self.reader.close()

    async def refresh_metrics(self) -> None:
        """Pending events and the age of the oldest, per sink."""
        now = self.clock()
        for state in self.states:
            count, oldest = await self.reader.read(
                functools.partial(outbox.backlog, seq=state.position,
                                  types=state.settings.events))
            self.metrics.event_backlog(state.settings.name, count,
                                       now - oldest if oldest is not None else 0.0)

    async def _run(self, state: SinkState) -> None:
        settings = state.settings
        while True:
            try:
                batch = await self.reader.read(
                    functools.partial(outbox.after, seq=state.position,
                                      limit=settings.batch_size, types=settings.events))
            except Exception as exc:
                log.error("sink %s: cannot read the outbox: %s", settings.name, exc)
                batch = []
            if not batch:
                await asyncio.sleep(POLL)
                continue
            try:
                await state.sink.deliver(batch)
            except Exception as exc:  # SinkError, or a bug: either way, try again later
                state.failures += 1
                if state.failures == 1:
                    log.warning("sink %s: delivery failed, retrying with backoff: %s",
                                settings.name, exc, exc_info=not isinstance(exc, SinkError))
                await self._retain(state)
                await asyncio.sleep(min(settings.max_backoff,
                                        FIRST_BACKOFF * 2 ** (state.failures - 1)))
                continue
            if state.failures:
                log.info("sink %s: delivering again after %d failed attempts",
                         settings.name, state.failures)
                state.failures = 0
            self._advance(state, batch[-1].seq)
            self.metrics.events_delivered(settings.name, len(batch))
            if len(batch) < settings.batch_size:
                await asyncio.sleep(POLL)

    def _advance(self, state: SinkState, seq: int) -> None:
        """Move the sink's position on; stored with the next group commit, not waited
        for: after a crash the sink may get a batch again (at least once), never miss one."""
        state.position = max(state.position, seq)
        self.spool.post_write(functools.partial(outbox.advance, sink=state.settings.name,
                                                seq=seq))

    async def _retain(self, state: SinkState) -> None:
        """Drop what the retention settings no longer allow to wait."""
        settings, events = state.settings, self.settings
        cutoff = self.clock() - events.max_age

        def find(db: sqlite3.Connection) -> tuple[int, int]:
            new = outbox.seq_before(db, cutoff, events.max_pending, state.position,
                                    settings.events)
            before = outbox.backlog(db, state.position, settings.events)[0]
            return new, before - outbox.backlog(db, new, settings.events)[0]

        new, dropped = await self.reader.read(find)
        if dropped:
            log.warning("sink %s: dropped %d undelivered events (retention: max_pending=%d, "
                        "max_age=%gs)", settings.name, dropped, events.max_pending,
                        events.max_age)
            self.metrics.events_dropped(settings.name, dropped)
            self._advance(state, new)

    async def _trim(self) -> None:
        while True:
            cutoff = self.clock() - self.settings.history
            try:
                removed = await self.spool.write(
                    functools.partial(outbox.trim, cutoff=cutoff, limit=TRIM_BATCH))
            except Exception as exc:
                log.error("cannot trim the event history: %s", exc)
                removed = 0
            if removed:
                log.debug("trimmed %d events older than the history", removed)
            # A big backlog goes in small transactions, so mail never waits long for one.
            await asyncio.sleep(0.1 if removed == TRIM_BATCH else TRIM_EVERY)
