"""relay.queue.onethread: the spool's thread runs calls in order, whatever their callers do."""

from __future__ import annotations

import asyncio
import threading

import pytest

from relay.queue.onethread import OneThread


async def test_calls_run_in_one_thread_in_the_order_asked() -> None:
    worker = OneThread("test-one")
    seen: list[tuple[int, str]] = []

    def note(n: int) -> int:
        seen.append((n, threading.current_thread().name))
        return n * 2

    try:
        results = await asyncio.gather(*(worker.run(note, n) for n in range(50)))
    finally:
        worker.close()
    assert results == [n * 2 for n in range(50)]
    assert [n for n, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"test-one"}


async def test_an_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    worker = OneThread("test-one")

    def fail() -> None:
        raise ValueError("broken")

    try:
        with pytest.raises(ValueError, match="broken"):
            await worker.run(fail)
        assert await worker.run(lambda: "still here") == "still here"
    finally:
        worker.close()


async def test_a_call_whose_caller_was_cancelled_still_runs() -> None:
    worker = OneThread("test-one")
    gate = threading.Event()
    ran: list[str] = []
    try:
        blocker = asyncio.ensure_future(worker.run(gate.wait, 10))
        queued = asyncio.ensure_future(worker.run(ran.append, "commit"))
        await asyncio.sleep(0)
        queued.cancel()  # before the thread took it
        with pytest.raises(asyncio.CancelledError):
            await queued
        gate.set()
        assert await blocker is True
        await worker.run(lambda: None)  # after everything asked before it
        assert ran == ["commit"]
    finally:
        worker.close()


async def test_close_finishes_what_was_asked_and_refuses_more() -> None:
    worker = OneThread("test-one")
    ran: list[int] = []
    calls = [asyncio.ensure_future(worker.run(ran.append, n)) for n in range(5)]
    await asyncio.sleep(0)
    worker.close()
    assert ran == list(range(5))
    await asyncio.gather(*calls)
    with pytest.raises(RuntimeError, match="closed"):
        await worker.run(ran.append, 5)
    assert not any(t.name == "test-one" for t in threading.enumerate())
