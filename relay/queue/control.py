"""The local control socket the queue CLI talks to.

Protocol: a UNIX stream socket; the client writes one JSON object per line and reads one
JSON object per line back. Every request has "op"; every response has "ok" and, when
"ok" is false, "error".

    {"op": "list"}                          -> {"ok", "messages": [message, ...]}
    {"op": "show", "id": ID, "body": bool}  -> {"ok", "message", "body"?} | not found
    {"op": "flush", "ids": [...]}           -> due now + wake; [] = every queued message
    {"op": "hold", "ids": [...]}            -> queued -> hold
    {"op": "release", "ids": [...]}         -> hold -> queued, due now, wake
    {"op": "delete", "ids": [...]}          -> removed from the spool
    {"op": "delete", "all": true, "state": null | "deferred" | "active" | "hold" | "failed"}
    {"op": "summary"}                       -> counts by queue, and route x age (qshape)

Changing ops answer {"ok", "done": [ids], "missing": [ids], "skipped": [{"id", "state"}]}.
A message dict has id, size, arrival_time, sender, state, queue (active | deferred | hold |
failed, as Postfix names them), attempts, next_attempt, last_error, route, client_address,
helo, listener, sasl_username, recipients [{address, state, reply}].

Server side:

    control = ControlServer(spool, delivery.wake, Path("/run/policy-relay/control.sock"),
                            group="policy-relay-admin")
    await control.start()      # after spool.open(); raises ControlError if it cannot
    ...
    await control.stop()       # closes and removes the socket file

Client side: `await request(path, payload)`; raises ControlUnavailable when no relay
listens there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from relay.checks.ratelimit import Limiter
from relay.events import outcomes
from relay.ops.logs import flush_waiting
from relay.ops.metrics import QUEUE_STATES, queue_name
from relay.queue.spool import MessageState, QueuedMessage, Spool

log = logging.getLogger("relay.control")

MAX_REQUEST = 1 << 20  # a delete of many thousand ids still fits
MAX_RESPONSE = 1 << 28  # `list` of a large queue is one line
IDLE_TIMEOUT = 60.0
# qshape's doubling age buckets, in minutes; the last one is open-ended.
AGE_BUCKETS = (5, 10, 20, 40, 80, 160)
BUCKET_LABELS = (*(str(b) for b in AGE_BUCKETS), f"{AGE_BUCKETS[-1]}+")

Response = dict[str, Any]


class ControlError(Exception):
    """The control socket could not be set up (bad group, live relay already there, ...)."""


class ControlUnavailable(Exception):
    """No relay answers on the control socket."""

    def __init__(self, message: str, permission: bool = False) -> None:
        super().__init__(message)
        self.permission = permission


def describe(message: QueuedMessage) -> dict[str, Any]:
    return {
        "id": message.id,
        "size": message.size,
        "arrival_time": message.received_at,
        "sender": message.sender,
        "state": message.state,
        "queue": queue_name(message.state, message.attempts),
        "attempts": message.attempts,
        "next_attempt": message.next_attempt,
        "last_error": message.last_error,
        "route": message.route,
        "client_address": message.client_address,
        "helo": message.helo,
        "listener": message.listener,
        "sasl_username": message.sasl_username,
        "recipients": [
            {"address": r.address, "state": r.state, "reply": r.reply}
            for r in message.recipients
        ],
    }


def age_bucket(age_seconds: float) -> int:
    minutes = age_seconds / 60
    for index, limit in enumerate(AGE_BUCKETS):
        if minutes < limit:
            return index
    return len(AGE_BUCKETS)


class ControlSocket:
    """The socket's life and its line protocol; `handle` answers each request."""

    def __init__(self, path: Path, group: str | None = None) -> None:
        self.path = Path(path)
        self.group = group
        self._server: asyncio.Server | None = None
        self._inode: int | None = None

    async def handle(self, request: dict[str, Any]) -> Response:
        raise NotImplementedError

    # -- socket life ------------------------------------------------------------------

    async def start(self) -> None:
        sock = self._bind()
        self._server = await asyncio.start_unix_server(
            self._serve, sock=sock, limit=MAX_REQUEST
        )
        log.info("control socket %s", self.path)

    def _bind(self) -> socket.socket:
        gid = self._gid()
        parent = self.path.parent
        if not parent.exists():
            parent.mkdir(parents=True, mode=0o750)
            os.chmod(parent, 0o750)  # mkdir's mode is filtered by the umask
            if gid is not None:
                os.chown(parent, -1, gid)
        self._remove_stale()
        # Bind under a temporary name, fix mode and group, then rename into place: the
        # socket is never reachable at its real path with looser permissions.
        temporary = parent / f".{self.path.name}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(temporary))
            os.chmod(temporary, 0o660)
            if gid is not None:
                os.chown(temporary, -1, gid)
            os.rename(temporary, self.path)
            sock.listen(64)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            raise ControlError(f"control socket {self.path}: {exc.strerror or exc}") from exc
        self._inode = self.path.stat().st_ino
        return sock

    def _gid(self) -> int | None:
        if self.group is None:
            return None
        try:
            return grp.getgrnam(self.group).gr_gid
        except KeyError:
            raise ControlError(f"control socket group {self.group!r} does not exist") from None

    def _remove_stale(self) -> None:
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ControlError(f"{self.path} exists and is not a socket; not touching it")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1)
            try:
                probe.connect(str(self.path))
            except (ConnectionRefusedError, FileNotFoundError):
                pass  # left behind by a relay that died: nobody listens
            else:
                raise ControlError(f"another relay is listening on {self.path}")
        log.info("removing stale control socket %s", self.path)
        self.path.unlink(missing_ok=True)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        # Only our own socket: a newer relay may already have replaced it.
        with contextlib.suppress(FileNotFoundError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                except (TimeoutError, asyncio.LimitOverrunError, ValueError):
                    # ValueError: the stream's own report of a line over the limit.
                    writer.write(_encode({"ok": False, "error": "request too large or too slow"}))
                    await writer.drain()
                    break
                if not line:
                    break
                answer = _encode(await self.handle_line(line))
                flush_waiting()
                writer.write(answer)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def handle_line(self, line: bytes) -> Response:
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "request must be a JSON object"}
        return await self.handle(request)

class ControlServer(ControlSocket):
    """Answers queue requests from the CLI, acting on the spool directly."""

    def __init__(
        self,
        spool: Spool,
        wake: Callable[[], None],
        path: Path,
        group: str | None = None,
        clock: Callable[[], float] = time.time,
        limiter: Callable[[], Limiter] | None = None,
        metrics: Callable[[], Awaitable[bytes]] | None = None,
        probe: Callable[[], Awaitable[list[str]]] | None = None,
    ) -> None:
        self.limiter = limiter
        # A flush that made messages due also ends the upstream pauses; it returns what
        # the probes of down upstream hosts found, one line each.
        self.probe = probe
        self.spool = spool
        self.wake = wake
        super().__init__(path, group)
        self.clock = clock
        self.metrics = metrics
        self._ops: dict[str, Callable[[dict[str, Any]], Awaitable[Response]]] = {
            "list": self._list,
            "show": self._show,
            "flush": self._flush,
            "hold": self._hold,
            "release": self._release,
            "delete": self._delete,
            "summary": self._summary,
            "limits": self._limits,
            "metrics": self._metrics,
        }

    def __repr__(self) -> str:
        return f"<ControlServer {self.path} {'listening' if self._server else 'closed'}>"

    async def handle(self, request: dict[str, Any]) -> Response:
        """Answer one request (also callable directly, without the socket)."""
        op = self._ops.get(str(request.get("op")))
        if op is None:
            return {"ok": False, "error": f"unknown op {request.get('op')!r}"}
        try:
            return await op(request)
        except _BadRequest as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # the CLI gets an answer; the details go to the log
            log.exception("control request %r failed", request.get("op"))
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    # -- operations -------------------------------------------------------------------

    async def _list(self, request: dict[str, Any]) -> Response:
        messages = sorted(await self.spool.messages(), key=lambda m: (m.received_at, m.id))
        return {"ok": True, "messages": [describe(m) for m in messages]}

    async def _show(self, request: dict[str, Any]) -> Response:
        queue_id = request.get("id")
        if not isinstance(queue_id, str):
            raise _BadRequest("show needs an id")
        message = await self.spool.get(queue_id)
        if message is None:
            return {"ok": False, "error": "no such message", "missing": [queue_id]}
        response: Response = {"ok": True, "message": describe(message)}
        if request.get("body"):
            data = await self.spool.data(queue_id)
            # For display only; the spool keeps the raw bytes untouched.
            response["body"] = data.decode("utf-8", errors="backslashreplace")
        return response

    async def _flush(self, request: dict[str, Any]) -> Response:
        # Only queued messages: held ones wait for release, failed ones are finished.
        now = self.clock()
        result = await self._change(request, {"queued"}, "queued", lambda _m: now,
                                    "flushed", all_if_empty="queued")
        self.wake()
        if self.probe is not None and result["done"]:
            result["upstreams"] = await self.probe()
        return result

    async def _hold(self, request: dict[str, Any]) -> Response:
        return await self._change(request, {"queued", "hold"}, "hold",
                                  lambda m: m.next_attempt, "placed on hold", event="held")

    async def _release(self, request: dict[str, Any]) -> Response:
        now = self.clock()
        result = await self._change(request, {"hold"}, "queued", lambda _m: now,
                                    "released from hold", event="released")
        if result["done"]:
            self.wake()
        return result

    async def _change(
        self,
        request: dict[str, Any],
        allowed: set[MessageState],
        new_state: MessageState,
        next_attempt: Callable[[QueuedMessage], float],
        verb: str,
        all_if_empty: MessageState | None = None,
        event: str | None = None,
    ) -> Response:
        ids = _ids(request)
        if not ids and all_if_empty is not None:
            ids = [m.id for m in await self.spool.messages(all_if_empty)]
        done, missing, skipped = [], [], []
        for queue_id in ids:
            message = await self.spool.get(queue_id)
            if message is None:
                missing.append(queue_id)
                continue
            if message.state not in allowed:
                skipped.append({"id": queue_id, "state": message.state})
                continue
            # Between get() and set_state() delivery may finish or fail the message;
            # set_state then changes nothing and the id is reported missing.
            # A message already held gets no second "held" event.
            events = [outcomes.operator(event, message)] \
                if event is not None and message.state != new_state else []
            if await self.spool.set_state(
                queue_id, new_state, next_attempt(message), expect=allowed, events=events
            ):
                log.info("%s: %s (control)", queue_id, verb)
                done.append(queue_id)
            else:
                missing.append(queue_id)
        return {"ok": True, "done": done, "missing": missing, "skipped": skipped}

    async def _delete(self, request: dict[str, Any]) -> Response:
        if request.get("all"):
            wanted = request.get("state")
            if wanted is not None and wanted not in QUEUE_STATES:
                raise _BadRequest(f"unknown queue {wanted!r}; one of {', '.join(QUEUE_STATES)}")
            ids = [
                m.id for m in await self.spool.messages()
                if wanted is None or queue_name(m.state, m.attempts) == wanted
            ]
        else:
            ids = _ids(request)
            if not ids:
                raise _BadRequest("delete needs ids, or all")
        done, missing = [], []
        for queue_id in ids:
            message = await self.spool.get(queue_id)
            if message is not None and await self.spool.delete(
                    queue_id, [outcomes.operator("deleted", message)]):
                log.info("%s: removed (control)", queue_id)
                done.append(queue_id)
            else:
                missing.append(queue_id)
        return {"ok": True, "done": done, "missing": missing, "skipped": []}

    async def _summary(self, request: dict[str, Any]) -> Response:
        now = self.clock()
        counts = dict.fromkeys(QUEUE_STATES, 0)
        routes: dict[str, list[int]] = {}
        size = 0
        messages = await self.spool.messages()
        for m in messages:
            counts[queue_name(m.state, m.attempts)] += 1
            row = routes.setdefault(m.route or "default", [0] * len(BUCKET_LABELS))
            row[age_bucket(now - m.received_at)] += 1
            size += m.size
        return {
            "ok": True,
            "total": len(messages),
            "size": size,
            "counts": counts,
            "buckets": list(BUCKET_LABELS),
            "routes": dict(sorted(routes.items())),
        }


    async def _metrics(self, request: dict[str, Any]) -> Response:
        """This process's metrics in the text exposition format (for the supervisor)."""
        if self.metrics is None:
            return {"ok": True, "text": ""}
        return {"ok": True, "text": (await self.metrics()).decode()}

    async def _limits(self, request: dict[str, Any]) -> Response:
        """Bucket states of the rate limits (local, fallback and Redis)."""
        if self.limiter is None:
            return {"ok": True, "buckets": []}
        name, key = request.get("name"), request.get("key")
        if (name is not None and not isinstance(name, str)) or (
            key is not None and not isinstance(key, str)
        ):
            raise _BadRequest("name and key must be strings")
        limiter = self.limiter()
        if name is not None and name not in limiter.specs:
            known = ", ".join(sorted(limiter.specs)) or "none"
            raise _BadRequest(f"no limit named {name!r} (configured: {known})")
        states = await limiter.show(name, key)
        return {"ok": True, "buckets": [dataclasses.asdict(s) for s in states]}


class _BadRequest(Exception):
    pass


def _ids(request: dict[str, Any]) -> list[str]:
    ids = request.get("ids", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise _BadRequest("ids must be a list of queue ids")
    return list(dict.fromkeys(ids))  # once each, in the order given


def _encode(response: Response) -> bytes:
    return json.dumps(response, separators=(",", ":")).encode() + b"\n"


async def request(path: Path | str, payload: dict[str, Any], timeout: float = 30.0) -> Response:
    """Send one request to the relay's control socket and return its answer."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=MAX_RESPONSE), timeout
        )
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ControlUnavailable(
            f"cannot reach the relay at {path}: {exc.strerror} (is policy-relay running?)"
        ) from exc
    except PermissionError as exc:
        raise ControlUnavailable(
            f"cannot reach the relay at {path}: permission denied (run as root or as a "
            "member of the control socket's group)", permission=True,
        ) from exc
    except (OSError, TimeoutError) as exc:
        raise ControlUnavailable(f"cannot reach the relay at {path}: {exc}") from exc
    try:
        writer.write(_encode(payload))
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, TimeoutError) as exc:
        raise ControlUnavailable(f"the relay at {path} did not answer: {exc}") from exc
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not line:
        raise ControlUnavailable(f"the relay at {path} closed the connection without answering")
    answer = json.loads(line)
    if not isinstance(answer, dict):
        raise ControlUnavailable(f"the relay at {path} sent a malformed answer")
    return answer
