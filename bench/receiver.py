"""A webhook receiver for the benchmark, in a process of its own: checks each batch's
HMAC-SHA256 signature as an app would, counts the events, and writes the counts to a file
when it gets SIGTERM.

    python bench/receiver.py PORT SECRET_FILE COUNTS_FILE
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
import sys
from pathlib import Path


async def main(port: int, secret: bytes, counts_file: Path) -> None:
    counts = {"batches": 0, "events": 0, "bad_signatures": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not await reader.readline():
                return  # a connection that sends nothing: the bench's check that we listen
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            mac = hmac.new(secret, headers.get("x-relay-timestamp", "").encode() + b"." + body,
                           hashlib.sha256).hexdigest()
            if hmac.compare_digest("sha256=" + mac, headers.get("x-relay-signature", "")):
                counts["batches"] += 1
                counts["events"] += len(json.loads(body)["events"])
                status = "200 OK"
            else:
                counts["bad_signatures"] += 1
                status = "401 Unauthorized"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    counts_file.write_text(json.dumps(counts))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), Path(sys.argv[2]).read_bytes().strip(),
                     Path(sys.argv[3])))
