"""New mail handed straight to delivery (Delivery.offer) meets the spool loop: each
message is sent exactly once, whichever side starts it first."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from conftest import Sink, relay_config

from relay import config
from relay.outbound.delivery import Delivery, Upstreams
from relay.queue.spool import Envelope, Spool

MESSAGE = b"From: a@example.test\r\nSubject: offer\r\n\r\nbody\r\n"


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
