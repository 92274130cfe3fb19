"""The webhook client on its own: signatures, status codes, and TLS verification against
a real HTTPS server on loopback (a trustme certificate)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ssl
from collections.abc import AsyncIterator

import pytest
import trustme

from relay.events import webhook


def test_the_signature_is_hmac_sha256_over_timestamp_dot_body():
    expected = hmac.new(b"key", b"1700000000.{}", hashlib.sha256).hexdigest()
    assert webhook.signature(b"key", "1700000000", b"{}") == f"sha256={expected}"
    assert webhook.signature(b"key", "1700000001", b"{}") != f"sha256={expected}"


async def serve(status: str, tls: ssl.SSLContext | None) -> tuple[asyncio.Server, list[bytes]]:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        seen.append(head + await reader.readexactly(length))
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls), seen


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def https(ca: trustme.CA) -> AsyncIterator[tuple[str, list[bytes]]]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server, seen = await serve("204 No Content", context)
    port = server.sockets[0].getsockname()[1]
    yield f"https://127.0.0.1:{port}/hook?app=billing", seen
    server.close()


async def test_posts_the_body_with_its_headers(https: tuple[str, list[bytes]], ca: trustme.CA):
    url, seen = https
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    status = await webhook.post(url, b'{"events":[]}', {"X-Relay-Timestamp": "1"}, 5.0,
                                trusting)
    assert status == 204
    [request] = seen
    assert request.startswith(b"POST /hook?app=billing HTTP/1.1\r\n")
    assert b"\r\nX-Relay-Timestamp: 1\r\n" in request
    assert request.endswith(b'\r\n\r\n{"events":[]}')


async def test_a_certificate_the_system_does_not_trust_is_refused(
        https: tuple[str, list[bytes]]):
    url, seen = https
    with pytest.raises(webhook.WebhookError, match="CERTIFICATE_VERIFY_FAILED"):
        await webhook.post(url, b"{}", {}, 5.0)  # the default context: system CAs only
    assert seen == []


async def test_anything_but_2xx_is_an_error_to_retry():
    server, _ = await serve("500 Internal Server Error", None)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(webhook.WebhookError, match=r"answered HTTP/1\.1 500"):
            await webhook.post(f"http://127.0.0.1:{port}/", b"{}", {}, 5.0)
    finally:
        server.close()
