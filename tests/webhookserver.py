"""A webhook endpoint on loopback for the tests: an asyncio HTTP/1.1 server in a thread of
its own that checks each batch's signature the way an app would, and keeps the events."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from typing import Any

from conftest import free_port

# How far a batch's timestamp may be from the receiver's clock (replay protection).
TOLERANCE = 300


class Receiver:
    """POSTs to http://127.0.0.1:PORT/hook. While `down`, every request gets 503."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.port = free_port()
        self.events: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.refused = 0  # requests answered 503 while down
        self.down = False
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        self._thread.start()
        assert self._ready.wait(10), "the webhook receiver did not start"
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()
        server.close()

    def verified(self, headers: dict[str, str], body: bytes) -> bool:
        timestamp = headers.get("x-relay-timestamp", "")
        given = headers.get("x-relay-signature", "")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > TOLERANCE:
            return False
        expected = "sha256=" + hmac.new(self.secret, f"{timestamp}.".encode() + body,
                                        hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, given)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readline()
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if self.down:
                self.refused += 1
                status = "503 Service Unavailable"
            elif not request.startswith(b"POST /hook ") or not self.verified(headers, body):
                self.bad_signatures += 1
                status = "401 Unauthorized"
            else:
                with self._lock:
                    self.events.extend(json.loads(body)["events"])
                status = "200 OK"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n"
                         "Connection: close\r\n\r\n".encode())
            await writer.drain()
        finally:
            writer.close()
