"""Delivery workers: take due messages from the spool, send them upstream, record the results."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence

import aiosmtplib

from relay.config import Settings
from relay.ops.metrics import Metrics
from relay.outbound.pool import (
    CONNECTION_ERRORS,
    HostGroup,
    HostPool,
    RecipientResult,
    StaleConnection,
    transmit,
)
from relay.outbound.shaping import Shaper, is_throttle
from relay.outbound.smarthosts import UpstreamSettings
from relay.queue import bounce
from relay.queue.settings import QueueSettings
from relay.queue.spool import Envelope, Outcome, QueuedMessage, Spool, fresh, new_queue_id

log = logging.getLogger("relay.delivery")

# Polling interval when nothing is due: new mail wakes the workers at once, this only
# bounds how late a retry can start.
IDLE_POLL = 1.0
# A message whose delivery crashed this many times in a row is put on hold, so
# one poison message cannot keep a worker busy forever.
MAX_CRASHES = 5


class UnknownRoute(LookupError):
    """The message names an upstream group that the configuration does not have."""


def route(envelope: Envelope | QueuedMessage, upstreams: Mapping[str, UpstreamSettings]) -> str:
    """The upstream group a message goes through.

    Policy's `route` action records its choice in `Envelope.route` at intake (the spool
    keeps it); an empty route means "default". Raises UnknownRoute for a group that is
    not configured (a reload may have removed it): the message is deferred rather than
    sent through an upstream its policy did not pick.
    """
    name = envelope.route or "default"
    if name not in upstreams:
        raise UnknownRoute(name)
    return name


def backoff(attempts: int, minimal: float, maximal: float) -> float:
    """Exponential backoff after `attempts` failed attempts (1 = the first failure)."""
    return float(min(maximal, minimal * 2 ** max(0, attempts - 1)))


def retry_delay(attempts: int, queue: QueueSettings) -> float:
    """Wait after `attempts` failed attempts: the configured schedule (its last step
    repeating), else exponential backoff."""
    if queue.retry_schedule:
        return queue.retry_schedule[min(attempts, len(queue.retry_schedule)) - 1]
    return backoff(attempts, queue.minimal_backoff, queue.maximal_backoff)


class Upstreams:
    """The connection pools of every upstream group, host by host."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.groups = {
            name: HostGroup(group, settings.smtp_hostname, clock)
            for name, group in settings.upstreams.items()
        }

    def __repr__(self) -> str:
        pools = ", ".join(repr(p) for g in self.groups.values() for p in g.pools)
        return f"<Upstreams {pools}>"

    def group(self, name: str) -> HostGroup | None:
        return self.groups.get(name)

    async def prune(self) -> None:
        for group in self.groups.values():
            await group.prune()

    async def close(self) -> None:
        await asyncio.gather(*(group.close() for group in self.groups.values()))


class Delivery:
    """The delivery loop: at most `delivery_workers` messages in flight at once, and per
    upstream group at most what its shaping allows; the rest wait in the spool."""

    def __init__(
        self,
        spool: Spool,
        settings: Settings,
        upstreams: Upstreams,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.spool = spool
        self.settings = settings
        self.upstreams = upstreams
        self.clock = clock
        self.monotonic = monotonic
        self._wake = asyncio.Event()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        # Messages whose delivery crashed before its result was stored rest here for a
        # while instead of being picked again at once.
        self._resting: dict[str, float] = {}
        self._crashes: dict[str, int] = {}
        # Due messages whose group may not start another delivery yet: queue id ->
        # (group, monotonic time to look again). Only ids: the message stays on disk.
        self._parked: dict[str, tuple[str, float]] = {}
        self.shapers: dict[str, Shaper] = {}
        self._stopping = False
        # Messages may be due in the spool that no worker took: counted up whenever
        # that may have happened, so a query that came back short only clears it when
        # nothing new came meanwhile. Without a backlog, a finished delivery does not
        # send the loop to the spool (new mail comes through offer()).
        self._backlog = 1
        # Ids offer() started while a due() query was out: that query may return them.
        self._selecting = False
        self._offered: set[str] = set()

    @property
    def in_flight(self) -> frozenset[str]:
        """Ids of the messages being delivered now."""
        return frozenset(self._inflight)

    def wake(self) -> None:
        """New mail arrived (or a retry was forced): look at the queue now."""
        self._backlog += 1
        self._wake.set()

    def offer(self, queue_id: str, envelope: Envelope, data: bytes) -> None:
        """A message the spool has just committed: with a worker free, start it at once
        with its bytes at hand (no trip back to the spool); else the loop finds it."""
        if queue_id in self._inflight:
            # A due() query that ran after the commit, but before the listener got
            # here, has started it already. (It cannot have finished: its result's
            # commit queues behind the one that is waking us up.)
            return
        if self._stopping or len(self._inflight) >= self.settings.queue.delivery_workers:
            self.wake()
            return
        if self._selecting:
            self._offered.add(queue_id)
        self._start(fresh(queue_id, envelope, len(data)), data, self.monotonic())

    def shaper(self, name: str) -> Shaper:
        if name not in self.shapers:
            group = self.settings.upstreams.get(name) or UpstreamSettings(name)
            self.shapers[name] = Shaper(group.max_concurrent, group.max_rate,
                                        self.settings.queue.delivery_workers)
        return self.shapers[name]

    async def run(self) -> None:
        workers = self.settings.queue.delivery_workers
        last_prune = self.monotonic()
        while not self._stopping:
            self._wake.clear()
            timeout = IDLE_POLL
            free = workers - len(self._inflight)
            again = False
            if free > 0:
                now, mono = self.clock(), self.monotonic()
                self._resting = {k: t for k, t in self._resting.items() if t > now}
                self._parked = {k: v for k, v in self._parked.items() if v[1] > mono}
                backlog = self._backlog
                self._selecting = True
                try:
                    due = await self.spool.due_with_data(
                        now, free, exclude=[*self._inflight, *self._resting, *self._parked]
                    )
                except Exception:
                    log.exception("cannot read the spool; retrying")
                    due = []
                finally:
                    self._selecting = False
                offered, self._offered = self._offered, set()
                if len(due) < free and self._backlog == backlog:
                    self._backlog = 0
                mono = self.monotonic()
                for message, data in due:
                    # offer() may have started (and even finished) it meanwhile.
                    if message.id in offered or message.id in self._inflight:
                        continue
                    wait = self._start(message, data, mono)
                    timeout = min(timeout, wait)
                # Parked messages took places in that batch: look for others at once.
                again = len(due) == free and any(m.id in self._parked for m, _ in due)
            if self.monotonic() - last_prune > IDLE_POLL:
                await self.upstreams.prune()
                last_prune = self.monotonic()
            if again:
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.001, timeout))

    def _start(self, message: QueuedMessage, data: bytes, mono: float) -> float:
        """Start delivering `message` if its group admits it; else park it and return
        how long until its group may admit one."""
        if self._stopping:  # stop() came while the spool was being read
            return IDLE_POLL
        try:
            name = route(message, self.settings.upstreams)
        except UnknownRoute as exc:
            name = str(exc)
        shaper = self.shaper(name)
        wait = shaper.admit(mono)
        if wait > 0:
            self._parked[message.id] = (name, mono + min(wait, IDLE_POLL))
            return wait
        task = asyncio.create_task(self._deliver(message, data, name, shaper))
        self._inflight[message.id] = task
        task.add_done_callback(self._finished(message.id, name))
        return math.inf

    def _finished(self, queue_id: str, group: str) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._inflight.pop(queue_id, None)
            # The group has a free place again: its parked messages may try now.
            self._parked = {k: v for k, v in self._parked.items() if v[0] != group}
            if not task.cancelled() and task.exception() is not None:
                log.error("%s: delivery crashed", queue_id, exc_info=task.exception())
                self._resting[queue_id] = self.clock() + self.settings.queue.minimal_backoff
                self._crashes[queue_id] = self._crashes.get(queue_id, 0) + 1
                if self._crashes[queue_id] >= MAX_CRASHES:
                    task.get_loop().create_task(self._quarantine(queue_id))
            else:
                self._crashes.pop(queue_id, None)
            if self._backlog:
                self._wake.set()  # a worker is free for what waits in the spool

        return done

    async def _quarantine(self, queue_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.spool.set_state(queue_id, "hold", self.clock(), expect=("queued",))
            log.error("%s: put on hold after %d crashed deliveries", queue_id, MAX_CRASHES)
            self._crashes.pop(queue_id, None)

    async def stop(self, deadline: float) -> None:
        """Stop taking work; let in-flight deliveries finish for `deadline` seconds.

        Whatever is still running then is cancelled and stays queued: it will be sent
        again after restart (the at-least-once window RFC 1047 accepts). A delivery
        whose upstream already answered still records that answer before it ends.
        """
        self._stopping = True
        self._wake.set()
        tasks = list(self._inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=deadline)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _deliver(
        self, message: QueuedMessage, data: bytes, name: str, shaper: Shaper
    ) -> None:
        throttled = succeeded = False
        try:
            pending = message.pending
            group = self.upstreams.group(name)
            if group is None:
                reply = f"4.3.5 upstream group {name!r} is not configured"
                results = [RecipientResult(0, reply)] * len(pending)
                relays = ["none"] * len(pending)
            else:
                results, relays = await self._send(
                    message, [r.address for r in pending], data, group
                )
            throttled = any(is_throttle(r.reply) for r in results)
            succeeded = any(r.accepted for r in results)
            # What the upstream accepted must be recorded even if SIGTERM's deadline
            # cancels us now, or it would be sent a second time after restart.
            record = asyncio.ensure_future(self._record(message, results, relays, data))
            try:
                await asyncio.shield(record)
            except asyncio.CancelledError:
                await record
                raise
        finally:
            shaper.release(self.monotonic(), throttled, succeeded)

    async def _record(
        self,
        message: QueuedMessage,
        results: Sequence[RecipientResult],
        relays: Sequence[str],
        data: bytes,
    ) -> None:
        queue = self.settings.queue
        now = self.clock()
        attempts = message.attempts + 1
        expired = now - message.received_at >= queue.max_lifetime
        # RFC 5321 section 4.5.5 and RFC 3464: never a notification to the null sender.
        bounce_them = queue.on_permanent_failure == "bounce" and message.sender != ""
        outcomes, failures = [], []
        for rcpt, result, relay in zip(message.pending, results, relays, strict=True):
            reply = result.reply
            if result.accepted:
                state, status = "sent", "sent"
            elif result.permanent or expired:
                if not result.permanent:
                    reply = f"4.4.7 queue lifetime expired; last reply: {reply}"
                state, status = "failed", "bounced" if bounce_them else "failed"
                remote = relay.rpartition(":")[0] if relay != "none" else ""
                failures.append(bounce.Failure(rcpt.address, result.reply, remote,
                                               expired=not result.permanent))
            else:
                state, status = "pending", "deferred"
            outcomes.append(Outcome(rcpt.position, state, reply))  # type: ignore[arg-type]
            log.info(
                "%s: to=<%s>, relay=%s, delay=%.2f, attempts=%d, status=%s (%s)",
                message.id, rcpt.address, relay, now - message.received_at, attempts,
                status, reply,
            )
        if failures and bounce_them:
            await self._bounce(message, failures, data, now)
        # Never wait past the queue lifetime: the expiry bounce is due then.
        retry_at = min(now + retry_delay(attempts, queue), message.received_at + queue.max_lifetime)
        last_error = next((o.reply for o in outcomes if o.state != "sent"), "")
        new_state = await self.spool.record_attempt(message.id, outcomes, retry_at, last_error)
        if new_state == "queued":
            self.wake()  # it waits in the spool now: the loop keeps an eye on it
        states = {o.state for o in outcomes}
        status = "deferred" if "pending" in states else "bounced" if "failed" in states else "sent"
        self.metrics.delivered(message.route or "default", status, now - message.received_at)
        if new_state == "failed" and queue.on_permanent_failure == "hold":
            await self.spool.set_state(message.id, "hold", now, expect=("failed",))
            log.info("%s: held after permanent failure", message.id)

    async def _bounce(
        self, message: QueuedMessage, failures: list[bounce.Failure], data: bytes, now: float
    ) -> None:
        """Queue an RFC 3464 notification to the sender, through the same upstream group.

        It is stored before the failure is recorded: a crash in between sends it twice
        rather than never.
        """
        dsn_id = new_queue_id()
        hostname = self.settings.smtp_hostname
        dsn = bounce.build(queue_id=message.id, reporting_mta=hostname, sender=message.sender,
                           arrival=message.received_at, failures=failures, original=data,
                           now=now)
        envelope = Envelope(sender="", recipients=(message.sender,), client_address="",
                            helo=hostname, listener="bounce", received_at=now,
                            route=message.route, smtputf8=not message.sender.isascii())
        try:
            await self.spool.store(dsn_id, envelope, dsn)
        except Exception:
            log.exception("%s: cannot queue the non-delivery notification", message.id)
            return
        log.info("%s: sender non-delivery notification: %s", message.id, dsn_id)
        self.wake()

    async def _send(
        self, message: QueuedMessage, recipients: Sequence[str], data: bytes, group: HostGroup
    ) -> tuple[list[RecipientResult], list[str]]:
        """Try the group's hosts, best first, until every recipient has a final answer.

        Recipients that get a temporary failure on one host (connection trouble,
        timeouts, TLS errors, 4xx replies) go on to the next host in the same attempt;
        what is left after the last host is deferred. Returns one result and the relay
        that gave it per recipient.
        """
        name = group.settings.name
        results: dict[int, RecipientResult] = {}
        relays: dict[int, str] = {}
        todo = list(range(len(recipients)))
        failure = RecipientResult(0, f"4.4.1 all hosts of upstream group {name!r} are down")
        last_relay = "none"
        for pool in group.candidates():
            if not todo:
                break
            if not pool.admits(self.monotonic()):
                if last_relay == "none":
                    # Say why the host is down, not just that it is.
                    last_relay = str(pool.member)
                    failure = RecipientResult(0, f"{pool.last_failure} (host marked down)")
                continue
            last_relay = str(pool.member)
            got, failure = await self._try_host(message, pool, recipients, todo, data)
            for i, result in got.items():
                results[i] = result
                relays[i] = str(pool.member)
            todo = [i for i in todo if i not in got or not _final(got[i])]
        for i in todo:
            results.setdefault(i, failure)
            relays.setdefault(i, last_relay)
        return ([results[i] for i in range(len(recipients))],
                [relays[i] for i in range(len(recipients))])

    async def _try_host(
        self,
        message: QueuedMessage,
        pool: HostPool,
        recipients: Sequence[str],
        todo: list[int],
        data: bytes,
    ) -> tuple[dict[int, RecipientResult], RecipientResult]:
        """Send to the `todo` recipients through one host; new transactions on the same
        connection for recipients it had no room for (452). Returns what it answered and
        the failure to report for recipients it gave no answer for."""
        got: dict[int, RecipientResult] = {}
        failure = RecipientResult(0, f"4.4.1 no answer from {pool.member}")
        for _ in range(2):  # a second go only after a stale pooled connection
            batch = [i for i in todo if i not in got]
            try:
                async with pool.borrow() as conn:
                    while batch:
                        sent = await transmit(conn, message.sender,
                                              [recipients[i] for i in batch], data,
                                              pool.settings, message.smtputf8)
                        for i, result in zip(batch, sent, strict=True):
                            if not result.again:
                                got[i] = result
                        batch = [i for i, r in zip(batch, sent, strict=True) if r.again]
            except StaleConnection:
                continue
            except CONNECTION_ERRORS as exc:
                failure = RecipientResult(0, f"4.4.1 connection to {pool.member} failed: "
                                             f"{_describe(exc)}")
                pool.failed(failure.reply)
                self.metrics.connect_failed(pool.settings.name)
                return got, failure
            except Exception as exc:
                # A bug or a library surprise must defer the message, not lose it.
                log.exception("%s: unexpected error talking to %s", message.id, pool.member)
                return got, RecipientResult(0, f"4.3.0 internal error: {type(exc).__name__}")
            break
        answers = list(got.values())
        if answers and all(not _final(r) for r in answers):
            # Every recipient refused for now (a 421, 451 to DATA, a throttle): the host
            # is not well, and the next one may take the message (failover on 4xx).
            pool.failed(answers[0].reply)
        elif answers:
            pool.succeeded()
        return got, failure


def _final(result: RecipientResult) -> bool:
    return result.accepted or result.permanent


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        text = f"{exc.code} {exc.message}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]
