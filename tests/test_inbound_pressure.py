"""Pressure (Postfix's stress mode): slow clients holding every session do not lock out a
real one."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re

import aiosmtplib
import pytest
from conftest import RelayProcess, Sink

PRESSURE = """
max_connections = 40
pressure_grace = "0.5s"
pressure_idle_timeout = "3s"
"""
SLOW_CLIENTS = 60  # from ten addresses, 127.0.0.10 to 127.0.0.19
ATTEMPTS = 20
DRIBBLE = 0.5  # seconds between the bytes of a command line that never ends
MESSAGE = b"From: app@example.test\r\nSubject: pressure\r\n\r\nHello.\r\n"


async def slow_client(port: int, source: str, stop: asyncio.Event) -> None:
    """Connect from `source`, then send a byte every DRIBBLE seconds and never a line's
    end; when the relay closes or refuses the connection, come back after a moment."""
    while not stop.is_set():
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0))
            try:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(DRIBBLE):
                            if not await reader.read(1024):
                                break  # closed by the relay
                    writer.write(b"X")
            finally:
                writer.close()
        await asyncio.sleep(random.uniform(0.05, 0.5))


async def until(predicate, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Poll without blocking the slow clients' loop; bounded."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.1)


async def served(port: int) -> bool:
    try:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as client:
            await client.sendmail("app@example.test", ["b@dest.test"], MESSAGE)
    except (aiosmtplib.SMTPException, OSError):
        return False
    return True


@pytest.mark.parametrize("workers", [1, 2])
async def test_slow_clients_holding_every_session_do_not_lock_out_a_real_one(
    sink: Sink, start_relay, workers: int
):
    relay: RelayProcess = start_relay(sink.port, extra=PRESSURE + f"workers = {workers}")
    stop = asyncio.Event()
    attack = [asyncio.create_task(slow_client(relay.port, f"127.0.0.{10 + i % 10}", stop))
              for i in range(SLOW_CLIENTS)]
    try:
        await until(lambda: "smtpd_pressure started" in relay.log_text(), "pressure")
        results = []
        for _ in range(ATTEMPTS):
            results.append(await served(relay.port))
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.gather(*attack)
    assert results.count(True) >= 0.95 * ATTEMPTS, results
    assert len(sink.wait_messages(results.count(True))) == results.count(True)
    log = relay.log_text()
    # The real client took the places of stalled sessions; none of its own was closed.
    closed = re.findall(r"closed \[(127\.0\.0\.\d+)\] listener=smtp: under pressure", log)
    assert closed and "127.0.0.1" not in closed
    # Entered once (per worker: each judges the count the hub keeps for all) and left
    # once the slow clients are gone.
    assert 1 <= log.count("smtpd_pressure started") <= workers
    await until(lambda: relay.log_text().count("smtpd_pressure ended after")
                == relay.log_text().count("smtpd_pressure started"), "pressure to end")
