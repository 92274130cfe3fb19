"""A minimal HTTP/1.1 client for webhook POSTs: one request per connection, TLS verified.

Enough for posting a JSON batch and reading the status line, without a dependency of
its own: `ssl.create_default_context()` verifies the certificate and host name
(RFC 9110 section 4.3.4) against the system's trust store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ssl
from collections.abc import Mapping
from urllib.parse import urlsplit

SIGNATURE_HEADER = "X-Relay-Signature"
TIMESTAMP_HEADER = "X-Relay-Timestamp"


class WebhookError(Exception):
    """The endpoint could not be reached or did not answer 2xx."""


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """HMAC-SHA256 over "<timestamp>.<body>", as the receiver recomputes it; the
    timestamp inside the signed text lets it refuse replays of old batches."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


async def post(url: str, body: bytes, headers: Mapping[str, str], timeout: float,
               context: ssl.SSLContext | None = None) -> int:
    """POST `body` to `url`; the status code, or WebhookError."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = parts.netloc.rpartition("@")[2]
    head = [f"POST {target} HTTP/1.1", f"Host: {authority}", "User-Agent: policy-relay",
            "Content-Type: application/json", f"Content-Length: {len(body)}",
            "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body
    tls = (context or ssl.create_default_context()) if secure else None
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=tls, server_hostname=host if tls else None)
            writer.write(request)
            await writer.drain()
            status_line = await reader.readline()
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        raise WebhookError(f"{url}: {type(exc).__name__}: {exc}") from exc
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    fields = status_line.decode("latin-1").split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
        raise WebhookError(f"{url}: not an HTTP response: {status_line[:80]!r}")
    status = int(fields[1])
    if not 200 <= status < 300:
        raise WebhookError(f"{url}: answered {status_line.decode('latin-1').strip()[:200]}")
    return status
