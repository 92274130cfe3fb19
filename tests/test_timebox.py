"""relay.timebox.within: a timeout for a coroutine, started only if it has to wait."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest

from relay.timebox import within


async def immediate(value: int) -> int:
    return value


async def waits(steps: int, value: int) -> int:
    for _ in range(steps):
        await asyncio.sleep(0)
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(fut.set_result, value)
    return await fut


async def hangs() -> None:
    await asyncio.Event().wait()


async def fails_at_once() -> None:
    raise ValueError("before any wait")


async def fails_after_waiting() -> None:
    await asyncio.sleep(0)
    raise ValueError("after a wait")


def test_a_coroutine_that_never_waits_gets_no_timer() -> None:
    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        before = len(loop._scheduled)  # type: ignore[attr-defined]
        result = await within(immediate(7), 60)
        return result, len(loop._scheduled) - before  # type: ignore[attr-defined]

    assert asyncio.run(main()) == (7, 0)


def test_a_coroutine_that_waits_gets_its_result_through() -> None:
    assert asyncio.run(within(waits(3, 42), 60)) == 42


async def bounded(coro) -> BaseException | None:  # type: ignore[no-untyped-def]
    """What `coro` ended with, failing the test (not raising TimeoutError) if it is still
    running after 10 s."""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait([task], timeout=10)
    if not done:
        task.cancel()
        pytest.fail("not cut by its timeout")
    return task.exception()


def test_a_coroutine_that_hangs_is_cut_with_timeout_error() -> None:
    ended = asyncio.run(bounded(within(hangs(), 0.05)))
    assert isinstance(ended, TimeoutError)


@pytest.mark.parametrize("coro", [fails_at_once, fails_after_waiting])
def test_an_exception_comes_through_unchanged(coro) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        asyncio.run(within(coro(), 60))


def test_cancelling_the_caller_cancels_the_coroutine_not_a_timeout() -> None:
    cleaned = []

    async def hangs_and_cleans() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append(True)

    async def main() -> None:
        task = asyncio.create_task(within(hangs_and_cleans(), 60))
        for _ in range(3):
            await asyncio.sleep(0)
        task.cancel()
        await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main())
    assert cleaned == [True]


def test_the_timeout_reaches_the_coroutine_as_a_cancellation() -> None:
    seen = []

    async def hangs_and_sees() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    ended = asyncio.run(bounded(within(hangs_and_sees(), 0.05)))
    assert isinstance(ended, TimeoutError)
    assert seen == ["cancelled"]


def test_a_coroutine_that_handles_the_thrown_error_does_not_see_it_as_its_context() -> None:
    contexts = []

    async def recovers() -> str:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        contexts.append(sys.exc_info()[1])
        return "recovered"

    async def main() -> object:
        task = asyncio.create_task(within(recovers(), 60))
        for _ in range(3):
            await asyncio.sleep(0)
        task.cancel()
        return await task

    assert asyncio.run(main()) == "recovered"
    assert contexts == [None]
