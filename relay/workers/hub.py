"""The supervisor's hub: the state every worker must share to be one relay.

With [server] workers > 1 each worker is a whole relay over its own spool shard, but
connection caps, the memory budget for message data and the in-memory rate-limit buckets
are global: the workers ask the hub, which owns them, over one UNIX stream socket each
(`relay/workers/link.py` is the other end). One process counting makes a burst of N
let exactly N through however many workers run. With workers = 1 there is no hub and
nothing goes through it.

Protocol: one JSON object per line. A request with a nonzero "id" gets one answer with
the same "id"; a request without one (release, give, ready, condition) gets none.

    {"op": "hello", "worker": N}
    {"id", "op": "admit", "client", "max_total", "max_per_client"}
                                                  -> {"id", "why": null | str, "total"}
    {"id", "op": "count"}                                           -> {"id", "total"}
    {"op": "release", "client"}
    {"id", "op": "take", "size", "limit"}                           -> {"id", "ok": bool}
    {"op": "give", "size"}
    {"id", "op": "full", "limit"}                                   -> {"id", "full": bool}
    {"id", "op": "check", "store", "spec", "key", "cost", "update"} -> {"id", "result"}
    {"id", "op": "states", "store", "specs", "name", "key"}         -> {"id", "states"}
    {"op": "clear", "store"}
    {"op": "ready", "status"}
    {"op": "condition", "name", "subject", "active", "blocks_mail", "detail"}

What a worker held (connections, budget) is given back when its link closes, so a
worker that crashes leaks nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay.checks.ratelimit import LimitSpec, LocalBuckets

log = logging.getLogger("relay.hub")

MAX_LINE = 1 << 20


def spec_from_json(data: dict[str, Any]) -> LimitSpec:
    fields = {f.name for f in dataclasses.fields(LimitSpec)}
    values: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields
    }
    return LimitSpec(**values)


@dataclasses.dataclass
class _Holdings:
    """What one worker holds of the global counts, given back when it goes away."""

    worker: int = -1
    clients: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    held: int = 0


class Hub:
    """Global connection caps, data budget and rate-limit buckets for all workers."""

    def __init__(self, path: Path, on_ready: Callable[[int, str], None]) -> None:
        self.path = path
        self.on_ready = on_ready
        self.total = 0
        self.per_client: collections.Counter[str] = collections.Counter()
        self.held = 0
        self.stores = {"local": LocalBuckets(), "fallback": LocalBuckets()}
        # Conditions in force in each worker (relay/ops/conditions.py), for /readyz:
        # (worker, name, subject) -> (refuses mail, what started it).
        self.conditions: dict[tuple[int, str, str], tuple[bool, str]] = {}
        self._specs: dict[str, LimitSpec] = {}
        self._server: asyncio.Server | None = None

    def __repr__(self) -> str:
        return f"<Hub connections={self.total} held={self.held}>"

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path),
                                                       limit=MAX_LINE)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mine = _Holdings()
        try:
            while line := await reader.readline():
                answer = self.handle(json.loads(line), mine)
                if answer is not None:
                    writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
        except (ConnectionError, ValueError) as exc:
            log.warning("worker %d link failed: %s", mine.worker, exc)
        finally:
            self._give_back(mine)
            writer.close()

    def _give_back(self, mine: _Holdings) -> None:
        for client, count in mine.clients.items():
            self._release(client, count)
        self.held -= mine.held
        for key in [k for k in self.conditions if k[0] == mine.worker]:
            del self.conditions[key]

    def degraded(self) -> tuple[bool, list[str]]:
        """As Conditions.readiness, over every worker."""
        lines = [f"worker {worker}: {name} {subject}".rstrip() + f": {detail}"
                 for (worker, name, subject), (_, detail) in sorted(self.conditions.items())]
        return not any(blocks for blocks, _ in self.conditions.values()), lines

    def handle(self, request: dict[str, Any], mine: _Holdings) -> dict[str, Any] | None:
        """Apply one request; the answer, or None for requests that get none."""
        op = request["op"]
        answer: dict[str, Any] = {"id": request.get("id")}
        if op == "hello":
            mine.worker = int(request["worker"])
            return None
        if op == "admit":
            answer["why"] = self._admit(request["client"], request["max_total"],
                                        request["max_per_client"], mine)
            answer["total"] = self.total  # pressure is judged on the count the cap uses
        elif op == "count":
            answer["total"] = self.total
        elif op == "release":
            if mine.clients[request["client"]] > 0:
                mine.clients[request["client"]] -= 1
                self._release(request["client"], 1)
        elif op == "take":
            size = int(request["size"])
            answer["ok"] = self.held + size <= int(request["limit"])
            if answer["ok"]:
                self.held += size
                mine.held += size
        elif op == "full":
            answer["full"] = self.held >= int(request["limit"])
        elif op == "give":
            size = min(int(request["size"]), mine.held)
            self.held -= size
            mine.held -= size
        elif op == "check":
            spec = self._spec(spec_from_json(request["spec"]))
            result = self.stores[request["store"]].check(
                spec, request["key"], int(request["cost"]), update=bool(request["update"]))
            answer["result"] = dataclasses.asdict(result)
        elif op == "states":
            specs = {s.name: s for s in map(spec_from_json, request["specs"])}
            states = self.stores[request["store"]].states(
                specs, request.get("name"), request.get("key"), backend=request["store"])
            answer["states"] = [dataclasses.asdict(s) for s in states]
        elif op == "clear":
            self.stores[request["store"]].clear()
        elif op == "ready":
            self.on_ready(mine.worker, str(request.get("status", "")))
        elif op == "condition":
            key = (mine.worker, str(request["name"]), str(request["subject"]))
            if request["active"]:
                self.conditions[key] = (bool(request["blocks_mail"]), str(request["detail"]))
            else:
                self.conditions.pop(key, None)
        return answer if request.get("id") else None

    def _spec(self, spec: LimitSpec) -> LimitSpec:
        # A limit redefined by a reload starts from idle buckets, as in one process
        # (Limiter.reload); the first worker to use the new definition resets them.
        if self._specs.get(spec.name) not in (None, spec):
            for store in self.stores.values():
                store.drop(spec.name)
        self._specs[spec.name] = spec
        return spec

    def _admit(self, client: str, max_total: int, max_per_client: int,
               mine: _Holdings) -> str | None:
        if self.total >= max_total:
            return f"too many connections ({self.total} of {max_total})"
        if self.per_client[client] >= max_per_client:
            return (f"too many connections from {client} "
                    f"({self.per_client[client]} of {max_per_client})")
        self.total += 1
        self.per_client[client] += 1
        mine.clients[client] += 1
        return None

    def _release(self, client: str, count: int) -> None:
        self.total -= count
        self.per_client[client] -= count
        if self.per_client[client] <= 0:
            del self.per_client[client]
