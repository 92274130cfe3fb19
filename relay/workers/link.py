"""A worker's link to the supervisor's hub (relay/workers/hub.py): global caps and buckets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from relay.checks.ratelimit import BucketState, LimitResult, LimitSpec
from relay.ops.conditions import Condition

MAX_LINE = 1 << 24


class LinkDown(Exception):
    """The hub does not answer (the supervisor is gone): an infrastructure failure."""


class Link:
    """One connection to the hub, shared by every session of the worker.

    Requests are pipelined: each carries an id and its answer resolves that id's future,
    so a slow answer never holds up the others.
    """

    def __init__(self, path: Path, worker: int) -> None:
        self.path = path
        self.worker = worker
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Link worker={self.worker} {self.path} waiting={len(self._waiting)}>"

    async def open(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(str(self.path), limit=MAX_LINE)
        self._reader_task = asyncio.create_task(self._read(reader))
        self.send("hello", worker=self.worker)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                answer = json.loads(line)
                future = self._waiting.pop(answer["id"], None)
                if future is not None and not future.done():
                    future.set_result(answer)
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(LinkDown("the supervisor's hub closed the link"))
            self._waiting.clear()
            self._writer = None

    def send(self, op: str, **args: Any) -> None:
        """A request that gets no answer (its effect is ordered before later requests)."""
        if self._writer is not None:
            self._writer.write(_encode({"op": op, **args}))

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        if self._writer is None:
            raise LinkDown("no link to the supervisor's hub")
        ident = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        self._writer.write(_encode({"id": ident, "op": op, **args}))
        answer: dict[str, Any] = await future
        return answer

    def condition(self, condition: Condition, in_force: bool, added: int) -> None:
        """A Conditions watcher: the supervisor's /readyz hears of starts and ends."""
        if in_force and condition.reports > 1:
            return  # it was in force already
        self.send("condition", name=condition.name, subject=condition.subject,
                  active=in_force, blocks_mail=condition.blocks_mail,
                  detail=condition.detail)

    # -- the questions a worker asks ---------------------------------------------------

    async def admit(self, client: str, max_total: int,
                    max_per_client: int) -> tuple[str | None, int]:
        """(why not, or None when counted in; sessions open in all workers)."""
        answer = await self.call("admit", client=client, max_total=max_total,
                                 max_per_client=max_per_client)
        why = answer["why"]
        return (None if why is None else str(why)), int(answer["total"])

    async def count(self) -> int:
        return int((await self.call("count"))["total"])

    async def take(self, size: int, limit: int) -> bool:
        return bool((await self.call("take", size=size, limit=limit))["ok"])

    async def full(self, limit: int) -> bool:
        return bool((await self.call("full", limit=limit))["full"])

    async def check(self, store: str, spec: LimitSpec, key: str, cost: int,
                    update: bool) -> LimitResult:
        answer = await self.call("check", store=store, spec=dataclasses.asdict(spec), key=key,
                                 cost=cost, update=update)
        return LimitResult(**answer["result"])

    async def states(self, store: str, specs: Iterable[LimitSpec], name: str | None,
                     key: str | None) -> list[BucketState]:
        answer = await self.call("states", store=store, name=name, key=key,
                                 specs=[dataclasses.asdict(s) for s in specs])
        return [BucketState(**s) for s in answer["states"]]


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"
