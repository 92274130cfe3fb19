"""Prometheus metrics and the health endpoints.

API (callers never touch prometheus objects):

    metrics = Metrics()                       # owns its own CollectorRegistry
    metrics.connection_opened(listener) / connection_closed(listener)
    metrics.message_received(listener)
    metrics.decision(stage, rule, action)     # every policy decision, `log` rules too
    metrics.rejected(stage, code)             # every 4xx/5xx reply sent to a client
    metrics.ratelimit_exceeded(limit)
    metrics.ratelimit_fallback()              # Redis unreachable, local decision used
    metrics.spf_result(result) / dkim_result(result)
    metrics.dkim_unsigned()                   # a key matched, the header could not be signed
    metrics.delivered(upstream, status, seconds)   # once per message attempt; status is
                                              # sent | deferred | bounced | expired
    metrics.connect_failed(upstream)          # upstream = group name, never host:port
    metrics.upstream_up(upstream, up)         # before each scrape, from the hosts' health
    metrics.pool(upstream, idle, busy)
    metrics.reload_succeeded() / reload_failed()
    metrics.condition(condition, in_force, added)  # a Conditions watcher (ops/conditions.py)
    await metrics.refresh(spool, groups)      # queue gauges from the spool; pool gauges from
                                              # {group name: [HostPool, ...]} (idle/busy)
    metrics.exposition() -> bytes             # the text format

    server = await start_http(metrics, host, port, ready, refresh)
    ready = readiness({"listeners": lambda: ..., "spool": lambda: ..., "policy": lambda: ...},
                      conditions.readiness)   # conditions in force are listed, and those
                                              # that refuse mail make it not ready

Label values are names from the configuration (listener, rule, upstream group, limit)
or small fixed vocabularies; anything that looks like an IP or email address is replaced
by "other" so a mistake in a caller cannot explode the series count.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from relay.ops.conditions import (
    DISK_FULL,
    REDIS_DOWN,
    SMTPD_PRESSURE,
    SPOOL_UNWRITABLE,
    Condition,
)
from relay.ops.logs import flush_waiting

log = logging.getLogger("relay.metrics")

# Queue views, as Postfix names them: active = never tried, deferred = tried and due
# again later, hold = kept until released, failed = kept for the operator to look at.
QUEUE_STATES = ("active", "deferred", "hold", "failed")

# 1 ms to 2 days, as postfix_exporter's delivery delay buckets: a relay's deliveries
# range from a pooled send on loopback to a message stuck behind an upstream outage.
DELIVERY_BUCKETS = (
    0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
    4 * 3600.0, 86400.0, 2 * 86400.0,
)

MAX_REQUEST = 8192  # request line + headers; a scraper sends a few hundred bytes
READ_TIMEOUT = 5.0


class _Pool(Protocol):
    @property
    def idle(self) -> int: ...

    @property
    def busy(self) -> int: ...


class _Message(Protocol):
    @property
    def state(self) -> str: ...

    @property
    def attempts(self) -> int: ...

    @property
    def received_at(self) -> float: ...


class _Spool(Protocol):
    async def messages(self) -> Sequence[_Message]: ...


def queue_name(state: str, attempts: int) -> str:
    """The Postfix-style queue a stored message is in (see QUEUE_STATES)."""
    if state == "queued":
        return "deferred" if attempts > 0 else "active"
    return state


# Like _label_text's cache: label values come from configuration and fixed sets.
_CHILDREN_KEPT = 4096


def _label(value: object) -> str:
    return _label_text(str(value))


# Label values come from configuration (listeners, rules, groups) and fixed sets, so
# the cache stays small; it spares the ip_address() parses on every message.
@functools.lru_cache(maxsize=4096)
def _label_text(text: str) -> str:
    if "@" in text:
        return "other"
    # A bare address, host:port or [v6]:port.
    for candidate in (text, text.rsplit(":", 1)[0], text.partition("]")[0].lstrip("[")):
        try:
            ipaddress.ip_address(candidate)
        except ValueError:
            continue
        return "other"
    return text[:64]


class Metrics:
    """Every relay_* metric, in a registry of its own (tests make several)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[Any, tuple[object, ...]], Any] = {}
        r = self.registry
        self._connections = Counter(
            "relay_smtpd_connections", "SMTP connections accepted.", ["listener"], registry=r
        )
        self._active = Gauge(
            "relay_smtpd_active_connections", "SMTP connections open now.", ["listener"],
            registry=r,
        )
        self._received = Counter(
            "relay_messages_received", "Messages accepted and spooled.", ["listener"],
            registry=r,
        )
        self._decisions = Counter(
            "relay_policy_decisions", "Policy rule decisions.", ["stage", "rule", "action"],
            registry=r,
        )
        self._rejects = Counter(
            "relay_smtpd_rejects", "4xx/5xx replies to SMTP clients.", ["stage", "code"],
            registry=r,
        )
        self._ratelimit = Counter(
            "relay_ratelimit_exceeded", "Rate-limit buckets found over their limit.", ["limit"],
            registry=r,
        )
        self._fallbacks = Counter(
            "relay_ratelimit_backend_fallbacks",
            "Rate-limit decisions made without the shared backend (Redis unreachable).",
            registry=r,
        )
        self._spf = Counter("relay_spf_results", "SPF check results.", ["result"], registry=r)
        self._dkim = Counter("relay_dkim_results", "DKIM verification results.", ["result"],
                             registry=r)
        self._unsigned = Counter(
            "relay_dkim_unsigned", "Messages delivered unsigned although a signing key "
            "matched (dkimpy cannot parse their header section).", registry=r,
        )
        self._deliveries = Counter(
            "relay_deliveries", "Delivery attempts by outcome.", ["upstream", "status"],
            registry=r,
        )
        self._duration = Histogram(
            "relay_delivery_duration_seconds", "Time one delivery attempt took.", ["upstream"],
            buckets=DELIVERY_BUCKETS, registry=r,
        )
        self._connect_failures = Counter(
            "relay_upstream_connect_failures", "Failed connections to upstream hosts.",
            ["upstream"], registry=r,
        )
        self._queue = Gauge(
            "relay_queue_messages", "Messages in the spool.", ["state"], registry=r
        )
        self._oldest = Gauge(
            "relay_queue_oldest_message_age_seconds", "Age of the oldest message in the spool.",
            ["state"], registry=r,
        )
        self._pool = Gauge(
            "relay_upstream_pool_connections", "Pooled upstream connections.",
            ["upstream", "state"], registry=r,
        )
        self._up = Gauge(
            "relay_upstream_up", "1 while a host of the group is up: not marked down, not stalled.",
            ["upstream"], registry=r,
        )
        self._events_pending = Gauge(
            "relay_events_pending", "Events waiting for a sink.", ["sink"], registry=r
        )
        self._events_oldest = Gauge(
            "relay_events_oldest_pending_age_seconds",
            "Age of the oldest event waiting for a sink.", ["sink"], registry=r,
        )
        self._events_delivered = Counter(
            "relay_events_delivered", "Events a sink took.", ["sink"], registry=r
        )
        self._events_dropped = Counter(
            "relay_events_dropped", "Events dropped undelivered by [events] retention.",
            ["sink"], registry=r,
        )
        self._reload_ok = Gauge(
            "relay_config_last_reload_successful", "1 if the last reload succeeded.",
            registry=r,
        )
        self._reload_time = Gauge(
            "relay_config_last_reload_success_timestamp_seconds",
            "Time of the last successful (re)load.", registry=r,
        )
        self._reload_failures = Counter(
            "relay_config_reload_failures", "Reloads refused because of errors.", registry=r
        )
        self._condition = Gauge(
            "relay_condition_active", "1 while a condition is in force (disk_full, "
            "spool_unwritable, redis_down, upstream_down per group, smtpd_pressure).",
            ["condition", "subject"], registry=r,
        )
        self._occurrences = Counter(
            "relay_condition_occurrences", "What a condition counted (refused writes, "
            "checks without Redis, messages not delivered, slow sessions closed).",
            ["condition"], registry=r,
        )
        for name in (DISK_FULL, SPOOL_UNWRITABLE, REDIS_DOWN, SMTPD_PRESSURE):
            self._condition.labels(name, "").set(0)
        # Starting counts as a successful load: `check` ran the same loader first.
        self.reload_succeeded()
        for state in QUEUE_STATES:
            self._queue.labels(state).set(0)
            self._oldest.labels(state).set(0)

    def __repr__(self) -> str:
        return f"<Metrics registry={id(self.registry):#x}>"

    def _of(self, metric: Any, *values: object) -> Any:
        """`metric.labels(...)` for these values, each through _label. The child is kept:
        labels() checks, converts and locks on every call, several times a message."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*(_label(v) for v in values))
            if len(self._children) < _CHILDREN_KEPT:
                self._children[key] = child
        return child

    # -- inbound ----------------------------------------------------------------------

    def connection_opened(self, listener: str) -> None:
        self._of(self._connections, listener).inc()
        self._of(self._active, listener).inc()

    def connection_closed(self, listener: str) -> None:
        self._of(self._active, listener).dec()

    def message_received(self, listener: str) -> None:
        self._of(self._received, listener).inc()

    def decision(self, stage: str, rule: str, action: str) -> None:
        self._of(self._decisions, stage, rule, action).inc()

    def rejected(self, stage: str, code: int) -> None:
        self._rejects.labels(_label(stage), str(int(code))).inc()

    def ratelimit_exceeded(self, limit: str) -> None:
        self._of(self._ratelimit, limit).inc()

    def ratelimit_fallback(self) -> None:
        self._fallbacks.inc()

    def spf_result(self, result: str) -> None:
        self._of(self._spf, result).inc()

    def dkim_result(self, result: str) -> None:
        self._of(self._dkim, result).inc()

    def dkim_unsigned(self) -> None:
        self._unsigned.inc()

    # -- outbound ---------------------------------------------------------------------

    def delivered(self, upstream: str, status: str, seconds: float) -> None:
        """One delivery attempt of one message finished with `status`, taking `seconds`."""
        self._of(self._deliveries, upstream, status).inc()
        self._of(self._duration, upstream).observe(max(0.0, seconds))

    def connect_failed(self, upstream: str) -> None:
        self._of(self._connect_failures, upstream).inc()

    def upstream_up(self, upstream: str, up: bool) -> None:
        self._of(self._up, upstream).set(1 if up else 0)

    def pool(self, upstream: str, idle: int, busy: int) -> None:
        self._of(self._pool, upstream, "idle").set(idle)
        self._of(self._pool, upstream, "busy").set(busy)

    # -- events -----------------------------------------------------------------------

    def event_backlog(self, sink: str, pending: int, oldest_age: float) -> None:
        self._of(self._events_pending, sink).set(pending)
        self._of(self._events_oldest, sink).set(max(0.0, oldest_age))

    def events_delivered(self, sink: str, count: int) -> None:
        self._of(self._events_delivered, sink).inc(count)

    def events_dropped(self, sink: str, count: int) -> None:
        self._of(self._events_dropped, sink).inc(count)

    # -- configuration ----------------------------------------------------------------

    def reload_succeeded(self) -> None:
        self._reload_ok.set(1)
        self._reload_time.set(self.clock())

    def reload_failed(self) -> None:
        self._reload_ok.set(0)
        self._reload_failures.inc()

    def condition(self, condition: Condition, in_force: bool, added: int) -> None:
        self._condition.labels(condition.name, _label(condition.subject)).set(int(in_force))
        self._occurrences.labels(condition.name).inc(added)

    # -- gauges read from elsewhere ---------------------------------------------------

    def queue(self, messages: Sequence[_Message]) -> None:
        """Set the queue gauges from the spool's messages."""
        now = self.clock()
        counts = dict.fromkeys(QUEUE_STATES, 0)
        oldest = dict.fromkeys(QUEUE_STATES, now)
        for m in messages:
            name = queue_name(m.state, m.attempts)
            counts[name] = counts.get(name, 0) + 1
            oldest[name] = min(oldest.get(name, now), m.received_at)
        for name, count in counts.items():
            self._queue.labels(name).set(count)
            self._oldest.labels(name).set(max(0.0, now - oldest[name]))

    def pools(self, groups: Mapping[str, Iterable[_Pool]]) -> None:
        """Set the pool gauges from each group's host pools (anything with idle/busy),
        summed per group: host addresses never become labels."""
        for name, pools in groups.items():
            idle = busy = 0
            for p in pools:
                idle, busy = idle + p.idle, busy + p.busy
            self.pool(name, idle, busy)

    async def refresh(
        self, spool: _Spool, groups: Mapping[str, Iterable[_Pool]] | None = None
    ) -> None:
        """Read the spool (and pools) into the gauges; call before each scrape."""
        self.queue(await spool.messages())
        if groups is not None:
            self.pools(groups)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# -- health and metrics over HTTP -----------------------------------------------------

Readiness = Callable[[], tuple[bool, str]]


class Exposition(Protocol):
    def exposition(self) -> bytes: ...


def readiness(
    checks: Mapping[str, Callable[[], bool]],
    conditions: Callable[[], tuple[bool, list[str]]] | None = None,
) -> Readiness:
    """Combine named checks into one readiness callable: ready when all pass and no
    condition in force refuses mail.

    The detail lists every check (`spool: ok`, `policy: failing`) and every condition
    in force (`upstream_down default: since 30s, 12 deliveries set aside`), so a 503
    says why and a 200 still shows what is degraded.
    """

    def ready() -> tuple[bool, str]:
        lines, ok = [], True
        for name, check in checks.items():
            try:
                passed = bool(check())
            except Exception as exc:  # a broken check means not ready, not a crash
                passed = False
                log.warning("readiness check %s raised %r", name, exc)
            ok = ok and passed
            lines.append(f"{name}: {'ok' if passed else 'failing'}")
        if conditions is not None:
            accepting, degraded = conditions()
            ok = ok and accepting
            lines += degraded
        return ok, "\n".join(lines)

    return ready


_REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


async def start_http(
    metrics: Exposition,
    host: str,
    port: int,
    ready: Readiness,
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> asyncio.Server:
    """Serve /metrics, /healthz and /readyz on host:port (port 0 picks one)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, ctype, body, head_only = await _answer(reader, metrics, ready, refresh)
            header = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            flush_waiting()
            writer.write(header if head_only else header + body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    # The stream limit bounds how much of a request is ever buffered.
    return await asyncio.start_server(handle, host, port, limit=MAX_REQUEST)


async def _answer(
    reader: asyncio.StreamReader,
    metrics: Exposition,
    ready: Readiness,
    refresh: Callable[[], Awaitable[None]] | None,
) -> tuple[int, str, bytes, bool]:
    text = "text/plain; charset=utf-8"
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
    except asyncio.LimitOverrunError:
        return 431, text, b"request too large\n", False
    except TimeoutError:
        return 408, text, b"request timeout\n", False
    except asyncio.IncompleteReadError as exc:
        if len(exc.partial) >= MAX_REQUEST:
            return 431, text, b"request too large\n", False
        raise
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return 400, text, b"bad request\n", False
    method, target = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return 405, text, b"method not allowed\n", False
    head_only = method == "HEAD"
    if target == "/metrics":
        if refresh is not None:
            try:
                await refresh()
            except Exception:
                # Serve the last values rather than fail the whole scrape.
                log.exception("metrics refresh failed")
        return 200, CONTENT_TYPE_LATEST, metrics.exposition(), head_only
    if target == "/healthz":
        # Served by the event loop itself: answering at all is the proof it runs.
        return 200, text, b"ok\n", head_only
    if target == "/readyz":
        try:
            ok, detail = ready()
        except Exception as exc:
            ok, detail = False, f"readiness check raised {type(exc).__name__}"
        body = ((("ready" if ok else "not ready") + "\n" + detail).rstrip() + "\n").encode()
        return (200 if ok else 503), text, body, head_only
    return 404, text, b"not found\n", head_only
