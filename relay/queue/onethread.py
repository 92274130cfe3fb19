"""One thread that runs blocking calls for an event loop, in the order they were asked.

The spool hands its COMMITs (the log write and fsync) and its reads to such a thread.
`loop.run_in_executor` with a ThreadPoolExecutor of one worker does the same, but each
call also builds a concurrent Future with its own lock and condition, takes the pool's
shutdown locks, checks whether to start another worker, and chains the two futures:
several microseconds for every message stored and every one delivered.

A call put on the queue always runs, even if its caller stopped waiting: the spool
relies on that (a COMMIT the caller was cancelled during still completes).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class OneThread:
    """Started at the first call; `close` lets the calls already asked finish."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """`func(*args)` in the thread; its result or exception here."""
        if self._closed:
            raise RuntimeError(f"thread {self.name} is closed")
        if self._thread is None:
            # A daemon, so that a loop that died without close() does not hold the
            # interpreter at exit; close() joins it.
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((func, args, loop, future))
        return await future

    def close(self) -> None:
        """Let the calls already asked finish, then end the thread (blocks until then)."""
        self._closed = True
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            func, args, loop, future = job
            try:
                result = func(*args)
            except BaseException as exc:  # the caller gets it, whatever it is
                _answer(loop, future, None, exc)
            else:
                _answer(loop, future, result, None)


def _answer(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any,
            error: BaseException | None) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
