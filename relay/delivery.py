"""Delivery workers: take due messages from the spool, send them upstream, record the results."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import aiosmtplib

from relay.config import Settings
from relay.outbound import HostPool, RecipientResult, StaleConnection, transmit
from relay.smarthosts import UpstreamSettings
from relay.spool import Outcome, QueuedMessage, Spool

log = logging.getLogger("relay.delivery")

# Polling interval when nothing is due: new mail wakes the workers at once, this only
# bounds how late a retry can start.
IDLE_POLL = 1.0


def route(message: QueuedMessage) -> str:
    """The upstream group for a message: the one policy chose at intake, else "default"."""
    return message.route or "default"


class Upstreams:
    """The connection pools of every upstream group, host by host."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.groups: dict[str, tuple[UpstreamSettings, list[HostPool]]] = {}
        for name, group in settings.upstreams.items():
            pools = [
                HostPool(host, port, group, settings.smtp_hostname, clock)
                for host, port in group.hosts
            ]
            self.groups[name] = (group, pools)

    def __repr__(self) -> str:
        pools = ", ".join(repr(p) for _, ps in self.groups.values() for p in ps)
        return f"<Upstreams {pools}>"

    def group(self, name: str) -> tuple[UpstreamSettings, list[HostPool]]:
        return self.groups.get(name) or self.groups["default"]

    async def prune(self) -> None:
        for _, pools in self.groups.values():
            for pool in pools:
                await pool.prune()

    async def close(self) -> None:
        for _, pools in self.groups.values():
            for pool in pools:
                await pool.close()


def backoff(attempts: int, minimal: float, maximal: float) -> float:
    """Exponential backoff after `attempts` failed attempts (1 = the first failure)."""
    return float(min(maximal, minimal * 2 ** max(0, attempts - 1)))


class Delivery:
    """The delivery loop: at most `delivery_workers` messages in flight at once."""

    def __init__(
        self,
        spool: Spool,
        settings: Settings,
        upstreams: Upstreams,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.settings = settings
        self.upstreams = upstreams
        self.clock = clock
        self._wake = asyncio.Event()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        # Messages whose delivery crashed before its result was stored rest here for a
        # while instead of being picked again at once.
        self._resting: dict[str, float] = {}
        self._stopping = False

    def wake(self) -> None:
        """New mail arrived (or a retry was forced): look at the queue now."""
        self._wake.set()

    async def run(self) -> None:
        workers = self.settings.queue.delivery_workers
        last_prune = self.clock()
        while not self._stopping:
            self._wake.clear()
            free = workers - len(self._inflight)
            if free > 0:
                now = self.clock()
                self._resting = {k: t for k, t in self._resting.items() if t > now}
                try:
                    due = await self.spool.due(now, free, exclude=[*self._inflight, *self._resting])
                except Exception:
                    log.exception("cannot read the spool; retrying")
                    due = []
                for message in due:
                    task = asyncio.create_task(self._deliver(message))
                    self._inflight[message.id] = task
                    task.add_done_callback(self._finished(message.id))
            if self.clock() - last_prune > IDLE_POLL:
                await self.upstreams.prune()
                last_prune = self.clock()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=IDLE_POLL)

    def _finished(self, queue_id: str) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._inflight.pop(queue_id, None)
            if not task.cancelled() and task.exception() is not None:
                log.error("%s: delivery crashed", queue_id, exc_info=task.exception())
                self._resting[queue_id] = self.clock() + self.settings.queue.minimal_backoff
            self._wake.set()  # a worker is free

        return done

    async def stop(self, deadline: float) -> None:
        """Stop taking work; let in-flight deliveries finish for `deadline` seconds.

        Whatever is still running then is cancelled and stays queued: it will be sent
        again after restart (the at-least-once window RFC 1047 accepts).
        """
        self._stopping = True
        self._wake.set()
        tasks = list(self._inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=deadline)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _deliver(self, message: QueuedMessage) -> None:
        started = self.clock()
        group, pools = self.upstreams.group(route(message))
        pending = message.pending
        data = await self.spool.data(message.id)
        results, relay = await self._send(message, [r.address for r in pending], data, group, pools)
        now = self.clock()
        attempts = message.attempts + 1
        expired = now - message.received_at >= self.settings.queue.max_lifetime
        outcomes = []
        for rcpt, result in zip(pending, results, strict=True):
            if result.accepted:
                state, status = "sent", "sent"
            elif result.permanent:
                state, status = "failed", "failed"
            elif expired:
                state, status = "failed", "expired"
            else:
                state, status = "pending", "deferred"
            outcomes.append(Outcome(rcpt.position, state, result.reply))  # type: ignore[arg-type]
            log.info(
                "%s: to=<%s>, relay=%s, delay=%.2f, attempts=%d, status=%s (%s)",
                message.id, rcpt.address, relay, now - message.received_at, attempts,
                status, result.reply,
            )
        retry_in = backoff(attempts, self.settings.queue.minimal_backoff,
                           self.settings.queue.maximal_backoff)
        last_error = next((r.reply for r in results if not r.accepted), "")
        await self.spool.record_attempt(message.id, outcomes, now + retry_in, last_error)
        log.debug("%s: attempt took %.3fs", message.id, self.clock() - started)

    async def _send(
        self,
        message: QueuedMessage,
        recipients: Sequence[str],
        data: bytes,
        group: UpstreamSettings,
        pools: list[HostPool],
    ) -> tuple[list[RecipientResult], str]:
        """Try the group's hosts in order until one gives a reply to the transaction."""
        failure = RecipientResult(0, "no upstream host configured")
        relay = "none"
        for pool in pools:
            relay = f"{pool.host}:{pool.port}"
            for _ in range(2):  # a second go only after a stale pooled connection
                try:
                    async with pool.borrow() as conn:
                        results = await transmit(conn, message.sender, recipients, data, group)
                except StaleConnection:
                    continue
                except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                    failure = RecipientResult(0, f"4.4.1 connection to {relay} failed: {exc}")
                    break
                except Exception as exc:
                    # A bug or a library surprise must defer the message, not lose it.
                    log.exception("%s: unexpected error talking to %s", message.id, relay)
                    failure = RecipientResult(0, f"4.3.0 internal error: {type(exc).__name__}")
                    break
                if all(r.code == 421 or r.code == 0 for r in results):
                    failure = results[0]
                    break
                return results, relay
        return [failure] * len(recipients), relay
