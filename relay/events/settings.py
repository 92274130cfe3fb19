"""[events], [[events.sink]] and [suppression]: where events go, how long history stays,
which failures suppress a recipient."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from relay.events.event import TYPES
from relay.schema import Table

SINK_TYPES = ("webhook", "file", "redis")
DAY = 86400.0


@dataclass(frozen=True, slots=True)
class SinkSettings:
    """One [[events.sink]]: a webhook, a JSON-lines file or a Redis stream."""

    name: str
    type: str
    events: tuple[str, ...] = ()  # the event types it gets; empty: all of them
    url: str = ""  # webhook: http:// or https://; redis: redis:// rediss:// unix://
    secret_file: str = ""
    # Read from `secret_file` at load; never shown by repr() and never logged.
    secret: bytes = field(default=b"", repr=False)
    path: str = ""  # file
    stream: str = "policy-relay:events"  # redis
    maxlen: int = 0  # redis: approximate stream length cap, 0 = none
    batch_size: int = 100
    timeout: float = 10.0
    max_backoff: float = 300.0


@dataclass(frozen=True, slots=True)
class EventSettings:
    history: float = 7 * DAY  # how long `policy-relay trace` can look back
    # A sink's backlog: older or more events than this are dropped (and logged).
    max_pending: int = 100_000
    max_age: float = 3 * DAY
    sinks: tuple[SinkSettings, ...] = ()


@dataclass(frozen=True, slots=True)
class SuppressionSettings:
    enabled: bool = True
    # RFC 3463 enhanced status codes (globs) that suppress: the address does not exist.
    codes: tuple[str, ...] = ("5.1.*",)
    expire: float = 90 * DAY
    backend: str = "local"  # "local": suppression.db in spool_dir; "redis": shared
    redis_url: str = ""
    key_prefix: str = "policy-relay:suppressed:"

    def suppresses(self, status: str) -> bool:
        """Whether a permanent failure with this enhanced status suppresses; never a
        5.7.x policy block (RFC 3463 section 3.8: the message, not the address)."""
        return (self.enabled and status.startswith("5.") and not status.startswith("5.7.")
                and any(fnmatch.fnmatchcase(status, code) for code in self.codes))


def read_events(root: Table) -> EventSettings:
    base = EventSettings()
    table = root.table("events")
    sinks = tuple(_read_sink(t) for t in table.table_list("sink"))
    names = [s.name for s in sinks]
    for name in sorted({n for n in names if names.count(n) > 1}):
        table.error("sink", f"sink name {name!r} is used more than once")
    events = EventSettings(
        history=table.duration("history", base.history),
        max_pending=table.integer("max_pending", base.max_pending, 1, None),
        max_age=table.duration("max_age", base.max_age, low=1.0),
        sinks=sinks,
    )
    table.finish()
    return events


def _read_sink(table: Table) -> SinkSettings:
    name = table.string("name", "")
    if not name:
        table.error("name", "required")
    kind = table.string("type", "", SINK_TYPES)  # absent: "must be one of ..."
    events = table.strings("events", ())
    for item in events:
        if item not in TYPES:
            table.error("events", f"unknown event type {item!r}; one of {', '.join(TYPES)}")
    base = SinkSettings(name, kind)
    sink = SinkSettings(
        name=name, type=kind, events=tuple(e for e in events if e in TYPES),
        url=table.string("url", ""),
        secret_file=table.string("secret_file", ""),
        path=table.string("path", ""),
        stream=table.string("stream", base.stream),
        maxlen=table.integer("maxlen", 0, 0, None),
        batch_size=table.integer("batch_size", base.batch_size, 1, 10_000),
        timeout=table.duration("timeout", base.timeout, low=0.1),
        max_backoff=table.duration("max_backoff", base.max_backoff, low=0.1),
    )
    allowed = {"webhook": {"url", "secret_file"}, "file": {"path"},
               "redis": {"url", "stream", "maxlen"}}.get(kind)
    for key in ("url", "secret_file", "path", "stream", "maxlen"):
        if allowed is not None and table.has(key) and key not in allowed:
            table.error(key, f"not a setting of a {kind} sink")
    secret = b""
    if kind == "webhook":
        scheme = urlsplit(sink.url).scheme
        if scheme not in ("http", "https") or not urlsplit(sink.url).hostname:
            table.error("url", f'expected "https://host/path" or "http://...", got {sink.url!r}')
        if not sink.secret_file:
            table.error("secret_file", "required: the key that signs each batch")
        else:
            try:
                secret = Path(sink.secret_file).read_bytes().strip()
            except OSError as exc:
                table.error("secret_file", f"cannot read {sink.secret_file!r}: {exc.strerror}")
            else:
                if not secret:
                    table.error("secret_file", f"{sink.secret_file!r} is empty")
    elif kind == "file":
        if not sink.path:
            table.error("path", "required: the JSON-lines file to append to")
        elif not Path(sink.path).parent.is_dir():
            table.error("path", f"directory {str(Path(sink.path).parent)!r} does not exist")
    elif kind == "redis" and urlsplit(sink.url).scheme not in ("redis", "rediss", "unix"):
        table.error("url", f'expected "redis://host:6379/0", got {sink.url!r}')
    table.finish()
    return replace(sink, secret=secret)


def read_suppression(root: Table) -> SuppressionSettings:
    base = SuppressionSettings()
    table = root.table("suppression")
    codes = table.strings("codes", base.codes)
    for code in codes:
        if not code.startswith("5."):
            table.error("codes", f"expected permanent (5.x.x) enhanced status codes, got {code!r}")
        elif code.startswith("5.7") or fnmatch.fnmatchcase("5.7.1", code):
            table.error("codes", f"{code!r} would take in 5.7.x: those are policy blocks "
                        "of a message, not an address that does not exist")
    backend = table.string("backend", base.backend, ("local", "redis"))
    settings = SuppressionSettings(
        enabled=table.boolean("enabled", base.enabled),
        codes=codes,
        expire=table.duration("expire", base.expire, low=1.0),
        backend=backend,
        redis_url=table.string("redis_url", base.redis_url),
        key_prefix=table.string("key_prefix", base.key_prefix),
    )
    if backend == "redis" and urlsplit(settings.redis_url).scheme not in ("redis", "rediss",
                                                                         "unix"):
        table.error("redis_url", f'backend "redis" needs a URL such as "redis://host:6379/0", '
                    f"got {settings.redis_url!r}")
    table.finish()
    return settings
