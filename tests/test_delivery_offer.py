"""New mail handed straight to delivery (Delivery.offer) meets the spool loop: each
message is sent exactly once, whichever side starts it first."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Sink, delivering

from relay.outbound import delivery as delivery_module
from relay.outbound.delivery import Delivery
from relay.queue.spool import Envelope, Spool

MESSAGE = b"From: a@example.test\r\nSubject: offer\r\n\r\nbody\r\n"
ENVELOPE = Envelope(sender="a@example.test", recipients=("b@dest.test",),
                    client_address="127.0.0.1", helo="client.test", listener="smtp",
                    received_at=time.time())


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def store_and_offer(spool: Spool, delivery: Delivery, count: int,
                          envelope: Envelope = ENVELOPE) -> None:
    """`count` new messages, each stored and handed to delivery as the listener does."""
    for n in range(count):
        name = f"{envelope.recipients[0]}-{n}"
        stored = await spool.store(name, envelope, MESSAGE)
        delivery.offer(name, envelope, stored[name])


async def test_a_message_the_loop_started_first_is_not_offered_again(sink: Sink, tmp_path: Path):
    async with delivering(sink.port, tmp_path) as (spool, delivery):
        stored = await spool.store("M1", ENVELOPE, MESSAGE)
        # The loop finds the committed message before the listener offers it...
        delivery.wake()
        while "M1" not in delivery.in_flight:
            await asyncio.sleep(0.001)
        # ...and the listener's offer comes while it is in flight (it cannot come
        # later: the commit that wakes the listener is ahead of the one recording the
        # delivery): it must not start a second one.
        delivery.offer("M1", ENVELOPE, stored["M1"])
        # The usual order: offered at once, and the loop's next query must skip it.
        stored = await spool.store("M2", ENVELOPE, MESSAGE)
        delivery.offer("M2", ENVELOPE, stored["M2"])
        delivery.wake()
        await asyncio.sleep(1.0)
        assert len(sink.wait_messages(2)) == 2
        await asyncio.sleep(0.5)
        assert len(sink.handler.messages) == 2
        assert await spool.count() == 0


class CountingSpool(Spool):
    """A real spool that counts the delivery loop's queries."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.queries = 0

    async def due(self, *args: Any, **kwargs: Any) -> Any:
        self.queries += 1
        return await super().due(*args, **kwargs)


async def test_offered_mail_that_is_sent_does_not_send_the_loop_to_the_spool(
    sink: Sink, tmp_path: Path
):
    """A message sent and deleted leaves nothing in the spool: its delivery must not
    wake the loop to query it (that query held the spool's connection while the next
    message waited to be stored, and cost CPU for every message). A deferred one does."""
    async with delivering(sink.port, tmp_path, CountingSpool) as (spool, delivery):
        assert isinstance(spool, CountingSpool)
        await until(lambda: spool.queries > 0)  # the loop's first look, at start
        await store_and_offer(spool, delivery, 20)
        await until(lambda: len(sink.handler.messages) == 20)
        while await spool.count():
            await asyncio.sleep(0.01)
        assert spool.queries == 1
        sink.handler.rcpt_replies["later@dest.test"] = "451 4.7.1 try again later"
        later = dataclasses.replace(ENVELOPE, recipients=("later@dest.test",))
        await store_and_offer(spool, delivery, 1, later)
        await until(lambda: spool.queries > 1)  # it waits in the spool now: the loop looks


async def test_offered_mail_parked_by_a_group_limit_goes_as_each_delivery_ends(
    sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A group with max_concurrent = 1: offered at once, all but one are parked; each
    delivery that ends must start the next, not leave it to the loop's idle poll (made
    an hour here, so only a wake-up can start them)."""
    monkeypatch.setattr(delivery_module, "IDLE_POLL", 3600.0)
    async with delivering(sink.port, tmp_path, upstream_extra="max_concurrent = 1") as (
            spool, delivery):
        await asyncio.sleep(0.2)  # the loop's first look at the empty spool
        await store_and_offer(spool, delivery, 10)
        await until(lambda: len(sink.handler.messages) == 10)
        while await spool.count():
            await asyncio.sleep(0.01)
