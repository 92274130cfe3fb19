"""Where events go: a webhook, a JSON-lines file, a Redis stream. Each takes a batch of
events (their JSON, as stored) and returns once the batch is safely delivered, or raises."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence

from redis import asyncio as aioredis

from relay.events import webhook
from relay.events.outbox import Stored
from relay.events.settings import SinkSettings


class SinkError(Exception):
    """The batch was not delivered; it is tried again later."""


class WebhookSink:
    """POSTs {"events": [...]} signed with HMAC-SHA256 (see relay.events.webhook)."""

    def __init__(self, settings: SinkSettings) -> None:
        self.settings = settings

    async def deliver(self, batch: Sequence[Stored]) -> None:
        body = b'{"events":[' + b",".join(e.data.encode() for e in batch) + b"]}"
        timestamp = str(int(time.time()))
        headers = {
            webhook.TIMESTAMP_HEADER: timestamp,
            webhook.SIGNATURE_HEADER: webhook.signature(self.settings.secret, timestamp, body),
        }
        try:
            await webhook.post(self.settings.url, body, headers, self.settings.timeout)
        except webhook.WebhookError as exc:
            raise SinkError(str(exc)) from exc

    async def close(self) -> None:
        """Nothing kept open: one connection per batch."""


class FileSink:
    """Appends one JSON object per line. The file is opened for each batch (so a log
    rotation that renames it is followed) and fsync'd before the batch counts as
    delivered: a crash can repeat the last batch, never lose one."""

    def __init__(self, settings: SinkSettings) -> None:
        self.settings = settings

    async def deliver(self, batch: Sequence[Stored]) -> None:
        text = "".join(e.data + "\n" for e in batch).encode()
        try:
            await asyncio.to_thread(_append, self.settings.path, text)
        except OSError as exc:
            raise SinkError(f"{self.settings.path}: {exc.strerror or exc}") from exc

    async def close(self) -> None:
        """Nothing kept open."""


def _append(path: str, text: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        # One write(2) per batch: with O_APPEND, workers appending to the same file do
        # not interleave their lines.
        os.write(fd, text)
        os.fsync(fd)
    finally:
        os.close(fd)


class RedisSink:
    """XADD per event to a stream (fields: id, type, event), one round trip per batch."""

    def __init__(self, settings: SinkSettings) -> None:
        self.settings = settings
        self.client = aioredis.Redis.from_url(settings.url, socket_timeout=settings.timeout,
                                              socket_connect_timeout=settings.timeout)

    async def deliver(self, batch: Sequence[Stored]) -> None:
        maxlen = self.settings.maxlen or None
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for event in batch:
                    pipe.xadd(self.settings.stream, {"type": event.type, "event": event.data},
                              maxlen=maxlen, approximate=True)
                await pipe.execute()
        except Exception as exc:  # redis-py raises its own and OSError subclasses
            raise SinkError(f"redis {self.settings.stream}: {exc}") from exc

    async def close(self) -> None:
        await self.client.aclose()


Sink = WebhookSink | FileSink | RedisSink


def make_sink(settings: SinkSettings) -> Sink:
    if settings.type == "webhook":
        return WebhookSink(settings)
    if settings.type == "file":
        return FileSink(settings)
    return RedisSink(settings)
