"""The global memory budget for message data: the hub lends it to each worker in blocks,
so small messages never wait on the supervisor, and the global bound still holds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.inbound.budget import LEASE_BLOCKS, DataBudget
from relay.workers.hub import Hub
from relay.workers.link import Link

LIMIT = 1024 * 1024  # a block is then 16 KiB: a small message fits in one
BLOCK = LIMIT // LEASE_BLOCKS


class CountingHub(Hub):
    """A real hub on a real socket that counts the requests it answers."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, on_ready=lambda worker, status: None)
        self.asked: list[str] = []
        self.links: list[Link] = []

    def handle(self, request, mine):  # type: ignore[no-untyped-def]
        self.asked.append(request["op"])
        return super().handle(request, mine)


@pytest.fixture
async def hub(tmp_path: Path):
    hub = CountingHub(tmp_path / "hub.sock")
    await hub.start()
    yield hub
    for link in hub.links:
        await link.close()
    await hub.stop()


async def linked(hub: CountingHub, worker: int) -> DataBudget:
    link = Link(hub.path, worker)
    await link.open()
    hub.links.append(link)
    return DataBudget(LIMIT, link)


async def settled(hub: CountingHub, held: int) -> None:
    """Wait (bounded) until the hub has taken in every request sent without an answer."""
    for _ in range(200):
        if hub.held == held:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"hub holds {hub.held}, expected {held}")


async def test_small_messages_take_from_the_workers_loan_without_asking_the_hub(
    hub: CountingHub,
):
    budget = await linked(hub, 0)
    for _ in range(100):  # a hundred 2 KB messages, one after another
        assert not await budget.full()
        assert await budget.reserve(2048)
        budget.release(2048)
    await settled(hub, BLOCK)
    # Only the first message asked: whether the budget is full, then for a loan.
    assert hub.asked == ["hello", "full", "take"]
    assert budget.held == 0 and budget.leased == BLOCK


async def test_the_bound_is_global_and_a_freed_loan_goes_back(hub: CountingHub):
    one, two = await linked(hub, 0), await linked(hub, 1)
    assert await one.reserve(LIMIT - 1000)
    assert not await two.reserve(2000)  # over the budget of both workers together
    assert await two.reserve(1000)  # what is left fits exactly
    assert await two.full() and await one.full()
    one.release(LIMIT - 1000)  # the message was stored: all but one block goes back
    await settled(hub, BLOCK + 1000)
    assert await two.reserve(LIMIT - 2 * BLOCK - 1000)
    assert not await two.reserve(BLOCK + 1)


async def test_sessions_waiting_on_the_hub_together_never_overdraw_the_loan(
    hub: CountingHub,
):
    budget = await linked(hub, 0)
    chunk = LIMIT // 8
    results = await asyncio.gather(*(budget.reserve(chunk) for _ in range(10)))
    assert results.count(True) == 8
    assert budget.held == 8 * chunk <= budget.leased <= LIMIT
    assert hub.held == budget.leased
