"""New mail handed straight to delivery (Delivery.offer) meets the spool loop: each
message is sent exactly once, whichever side starts it first."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from conftest import Sink, relay_config

from relay import config
from relay.outbound.delivery import Delivery, Upstreams
from relay.queue.spool import Envelope, Spool

MESSAGE = b"From: a@example.test\r\nSubject: offer\r\n\r\nbody\r\n"


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_message_the_loop_started_first_is_not_offered_again(sink: Sink, tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text(relay_config(sink.port, 2525, tmp_path / "spool"))
    settings = config.load(path)
    spool = Spool(settings.spool_path)
    await spool.open()
    upstreams = Upstreams(settings)
    delivery = Delivery(spool, settings, upstreams)
    loop = asyncio.create_task(delivery.run())
    try:
        envelope = Envelope(sender="a@example.test", recipients=("b@dest.test",),
                            client_address="127.0.0.1", helo="client.test", listener="smtp",
                            received_at=time.time())
        stored = await spool.store("M1", envelope, MESSAGE)
        # The loop finds the committed message before the listener offers it...
        delivery.wake()
        while "M1" not in delivery.in_flight:
            await asyncio.sleep(0.001)
        # ...and the listener's offer comes while it is in flight (it cannot come
        # later: the commit that wakes the listener is ahead of the one recording the
        # delivery): it must not start a second one.
        delivery.offer("M1", envelope, stored["M1"])
        # The usual order: offered at once, and the loop's next query must skip it.
        stored = await spool.store("M2", envelope, MESSAGE)
        delivery.offer("M2", envelope, stored["M2"])
        delivery.wake()
        await asyncio.sleep(1.0)
        assert len(sink.wait_messages(2)) == 2
        await asyncio.sleep(0.5)
        assert len(sink.handler.messages) == 2
        assert await spool.count() == 0
    finally:
        await delivery.stop(1.0)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await upstreams.close()
        await spool.close()


async def test_offered_mail_that_is_sent_does_not_send_the_loop_to_the_spool(
    sink: Sink, tmp_path: Path
):
    """A message sent and deleted leaves nothing in the spool: its delivery must not
    wake the loop to query it (that query held the spool's connection while the next
    message waited to be stored, and cost CPU for every message). A deferred one does."""
    path = tmp_path / "config.toml"
    path.write_text(relay_config(sink.port, 2525, tmp_path / "spool"))
    settings = config.load(path)
    spool = Spool(settings.spool_path)
    await spool.open()
    queries = []
    real_due = spool.due

    async def counted_due(*args, **kwargs):  # type: ignore[no-untyped-def]
        queries.append(args)
        return await real_due(*args, **kwargs)

    spool.due = counted_due  # type: ignore[method-assign]
    upstreams = Upstreams(settings)
    delivery = Delivery(spool, settings, upstreams)
    loop = asyncio.create_task(delivery.run())
    try:
        envelope = Envelope(sender="a@example.test", recipients=("b@dest.test",),
                            client_address="127.0.0.1", helo="client.test", listener="smtp",
                            received_at=time.time())
        await until(lambda: bool(queries))  # the loop's first look at the spool, at start
        for n in range(20):
            stored = await spool.store(f"M{n}", envelope, MESSAGE)
            delivery.offer(f"M{n}", envelope, stored[f"M{n}"])
        await until(lambda: len(sink.handler.messages) == 20)
        while await spool.count():
            await asyncio.sleep(0.01)
        assert len(queries) == 1
        sink.handler.rcpt_replies["later@dest.test"] = "451 4.7.1 try again later"
        later = dataclasses.replace(envelope, recipients=("later@dest.test",))
        stored = await spool.store("D", later, MESSAGE)
        delivery.offer("D", later, stored["D"])
        await until(lambda: len(queries) > 1)  # it waits in the spool now: the loop looks
    finally:
        await delivery.stop(1.0)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await upstreams.close()
        await spool.close()
