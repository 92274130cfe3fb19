"""A timeout that costs nothing when the awaited coroutine never has to wait.

`asyncio.timeout` schedules a timer and cancels it again: a few microseconds, on every
policy walk of every message. Most walks never wait (their rules test only what the
client sent, and the checks they ask were answered earlier in the transaction), and a
coroutine that finishes without waiting cannot hang. `within` runs the coroutine's first
step directly and starts the timer only if that step had to wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


async def within(coro: Coroutine[Any, Any, T], seconds: float) -> T:
    """`await coro`, or TimeoutError once it has waited `seconds` (counted from its
    first wait: the steps before it run without pause)."""
    try:
        waiting_on = coro.send(None)
    except StopIteration as finished:
        return finished.value  # type: ignore[no-any-return]
    async with asyncio.timeout(seconds):
        return await _Resumed(coro, waiting_on)


class _Resumed(Generic[T]):
    """`coro` after its first step: what it waits on goes to the task awaiting this,
    and what the task sends or throws (a result, a cancellation) goes back into it,
    as `await coro` itself would do."""

    __slots__ = ("coro", "waiting_on")

    def __init__(self, coro: Coroutine[Any, Any, T], waiting_on: Any) -> None:
        self.coro = coro
        self.waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, T]:
        coro, waiting_on = self.coro, self.waiting_on
        while True:
            thrown: BaseException | None = None
            try:
                sent = yield waiting_on
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                thrown = exc
            # Thrown in outside the except clause: a coroutine that handles it and goes
            # on must not see it as the exception being handled (sys.exc_info()).
            try:
                waiting_on = coro.send(sent) if thrown is None else coro.throw(thrown)
            except StopIteration as finished:
                return finished.value  # type: ignore[no-any-return]
