"""Delivery workers: take due messages from the spool, send them upstream, record the results."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate

import aiosmtplib

from relay.config import Settings
from relay.events import outcomes as outcomes_of
from relay.events.event import Event
from relay.events.suppression import SuppressionError, SuppressionList
from relay.ipaddr import client_ip
from relay.ops.conditions import UPSTREAM_DOWN, Conditions
from relay.ops.metrics import Metrics
from relay.outbound.connector import Connection
from relay.outbound.pool import Host, HostGroup
from relay.outbound.scheduler import MAX_CRASHES, Scheduler
from relay.outbound.shaping import Shaper, is_throttle
from relay.outbound.smarthosts import UpstreamSettings
from relay.outbound.transaction import (
    CONNECTION_ERRORS,
    RecipientResult,
    StaleConnection,
    transmit,
)
from relay.queue import bounce
from relay.queue.content import Content
from relay.queue.settings import QueueSettings
from relay.queue.spool import Envelope, Outcome, QueuedMessage, Spool, fresh, new_queue_id
from relay.replies import UpstreamReply

log = logging.getLogger("relay.delivery")

# How long `queue flush` waits for the probes of down upstream hosts to report.
PROBE_WAIT = 10.0
# Polling interval when nothing is due: new mail wakes the workers at once, this only
# bounds how late a retry can start.
IDLE_POLL = 1.0


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
        pools = ", ".join(repr(h) for g in self.groups.values() for h in g.hosts)
        return f"<Upstreams {pools}>"

    def group(self, name: str) -> HostGroup | None:
        return self.groups.get(name)

    async def prune(self) -> None:
        for group in self.groups.values():
            await group.prune()

    async def close(self) -> None:
        await asyncio.gather(*(group.close() for group in self.groups.values()))


@dataclass(frozen=True, slots=True)
class Via:
    """Where a recipient's result came from, for the log line and the bounce."""

    relay: str = "none"  # "mx.example[192.0.2.1]:25", or "none" when no host answered
    remote_mta: str = ""  # the upstream's host name, "" when we know only an address
    tls: str = ""


@dataclass
class Unrecorded:
    """An attempt's results that the spool has not taken yet (see Delivery._commit)."""

    message: QueuedMessage
    outcomes: list[Outcome]
    retry_at: float
    last_error: str
    dsn: tuple[str, Envelope, bytes] | None = None
    status: str = "sent"
    events: list[Event] = field(default_factory=list)
    # Recipients to put on the suppression list once the results are stored.
    suppress: list[tuple[str, str]] = field(default_factory=list)


class Delivery:
    """The delivery loop: takes due messages from the spool as the scheduler admits
    them (at most `delivery_workers` at once, and per upstream group what its shaping
    allows), sends them through the group's hosts, and records the results."""

    def __init__(
        self,
        spool: Spool,
        settings: Settings,
        upstreams: Upstreams,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
        suppression: SuppressionList | None = None,
        conditions: Conditions | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.suppression = suppression
        # A group whose every host is down is a condition (logged at start and end).
        self.conditions = conditions or Conditions()
        self.spool = spool
        self.settings = settings
        self.upstreams = upstreams
        self.clock = clock
        self.monotonic = monotonic
        self.shapers: dict[str, Shaper] = {}
        self._unrecorded: dict[str, Unrecorded] = {}
        self.scheduler = Scheduler(settings.queue.delivery_workers, self.shaper,
                                   rest=settings.queue.minimal_backoff, clock=monotonic,
                                   unrecorded=self._unrecorded.keys())
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        # Messages may be due in the spool that no worker took: counted up whenever
        # that may have happened, so a query that came back short only clears it when
        # nothing new came meanwhile. Without a backlog, a finished delivery does not
        # send the loop to the spool (new mail comes through offer()).
        self._backlog = 1
        # Ids offer() started while a due() query was out: that query may return them.
        self._selecting = False
        self._offered: set[str] = set()
        for name, group in upstreams.groups.items():
            for host in group.hosts:
                host.health.on_recovery = functools.partial(self._recovered, name)

    @property
    def in_flight(self) -> frozenset[str]:
        """Ids of the messages being delivered now."""
        return frozenset(self._tasks)

    @property
    def paused(self) -> bool:
        """True while results wait for the spool: no new delivery starts meanwhile."""
        return self.scheduler.paused

    def wake(self) -> None:
        """New mail arrived (or a retry was forced): look at the queue now."""
        self._backlog += 1
        self._wake.set()

    async def flush(self, timeout: float = PROBE_WAIT) -> list[str]:
        """The operator's `queue flush` (after the spool made its messages due): every
        down host gets its probe now and what waited for one is tried at once; then
        wait (at most `timeout`) for each probe and say what it found."""
        hosts = [h for g in self.upstreams.groups.values() for h in g.hosts
                 if h.health.is_down]
        verdicts = {h: h.health.verdicts for h in hosts}
        for host in hosts:
            host.health.probe_now()
        self.scheduler.flush()
        self.wake()
        deadline = self.monotonic() + timeout
        while any(h.health.verdicts == verdicts[h] for h in hosts):
            if self.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        lines = []
        for host in hosts:
            health = host.health
            if health.verdicts == verdicts[host]:
                lines.append(f"upstream {host.member}: down, not probed within {timeout:g}s")
            elif health.is_down:
                lines.append(f"upstream {host.member}: still down: {health.last_failure}")
            else:
                lines.append(f"upstream {host.member}: up again")
        return lines

    def _recovered(self, group: str) -> None:
        """A host of `group` answered again: what waited for it goes now."""
        released = self.scheduler.recovered(group)
        if released:
            log.info("upstream group %r is back: %d waiting messages released", group,
                     released)
        self.wake()

    def offer(self, queue_id: str, envelope: Envelope, content: Content) -> None:
        """A message the spool has just committed: with a worker free, start it at once
        with its bytes as stored (no query of the spool); else the loop finds it."""
        if queue_id in self._tasks:
            # A due() query that ran after the commit, but before the listener got
            # here, has started it already. (It cannot have finished: its result's
            # commit queues behind the one that is waking us up.)
            return
        if self._stopping or not self.scheduler.free:
            self.wake()
            return
        if self._selecting:
            self._offered.add(queue_id)
        self._start(fresh(queue_id, envelope, content.size), content)

    def shaper(self, name: str) -> Shaper:
        if name not in self.shapers:
            group = self.settings.upstreams.get(name) or UpstreamSettings(name)
            self.shapers[name] = Shaper(group.max_concurrent, group.max_rate,
                                        self.settings.queue.delivery_workers)
        return self.shapers[name]

    async def run(self) -> None:
        scheduler = self.scheduler
        last_prune = self.monotonic()
        while not self._stopping:
            self._wake.clear()
            timeout = IDLE_POLL
            if self._unrecorded:
                await self._retry_unrecorded()
            free = scheduler.free
            again = False
            if free > 0:
                backlog = self._backlog
                self._selecting = True
                try:
                    due = await self.spool.due(self.clock(), free,
                                               exclude=scheduler.excluded())
                except Exception:
                    log.exception("cannot read the spool; retrying")
                    due = []
                finally:
                    self._selecting = False
                offered, self._offered = self._offered, set()
                if len(due) < free and self._backlog == backlog:
                    self._backlog = 0
                for message, content in due:
                    # offer() may have started (and even finished) it meanwhile.
                    if message.id in offered or message.id in self._tasks:
                        continue
                    timeout = min(timeout, self._start(message, content))
                # Parked messages took places in that batch: look for others at once.
                again = len(due) == free and any(m.id in scheduler.parked for m, _ in due)
                timeout = scheduler.next_wakeup(timeout)
            if self.monotonic() - last_prune > IDLE_POLL:
                await self.upstreams.prune()
                last_prune = self.monotonic()
            if again:
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.001, timeout))

    def _start(self, message: QueuedMessage, content: Content) -> float:
        """Start delivering `message` if its group admits it; else (it is parked) return
        how long until its group may admit one."""
        if self._stopping:  # stop() came while the spool was being read
            return IDLE_POLL
        try:
            name = route(message, self.settings.upstreams)
        except UnknownRoute as exc:
            name = str(exc)
        wait = self.scheduler.admit(message.id, name)
        if wait > 0:
            return wait
        task = asyncio.create_task(self._deliver(message, content, name, self.shaper(name)))
        self._tasks[message.id] = task
        task.add_done_callback(self._finished(message.id))
        return math.inf

    def _finished(self, queue_id: str) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._tasks.pop(queue_id, None)
            crashed = not task.cancelled() and task.exception() is not None
            if crashed:
                log.error("%s: delivery crashed", queue_id, exc_info=task.exception())
            parked = len(self.scheduler.parked)
            if self.scheduler.finished(queue_id, crashed):
                task.get_loop().create_task(self._quarantine(queue_id))
            if self._backlog or len(self.scheduler.parked) < parked:
                # A worker is free for what waits in the spool, or a place in this
                # message's group for what its limit parked there.
                self._wake.set()

        return done

    async def _quarantine(self, queue_id: str) -> None:
        with contextlib.suppress(Exception):
            message = await self.spool.get(queue_id)
            if message is None:
                return
            await self.spool.set_state(queue_id, "hold", self.clock(), expect=("queued",),
                                       events=[outcomes_of.operator("held", message,
                                                                    by="relay")])
            log.error("%s: put on hold after %d crashed deliveries", queue_id, MAX_CRASHES)

    async def stop(self, deadline: float) -> None:
        """Stop taking work; let in-flight deliveries finish for `deadline` seconds.

        Whatever is still running then is cancelled and stays queued: it will be sent
        again after restart (the at-least-once window RFC 1047 accepts). A delivery
        whose upstream already answered still records that answer before it ends.
        """
        self._stopping = True
        self._wake.set()
        tasks = list(self._tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=deadline)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._unrecorded:
            await self._retry_unrecorded()
        for queue_id in self._unrecorded:
            log.error("%s: the upstream's answer could not be stored; after a restart this "
                      "message may be sent again", queue_id)

    # -- one delivery -------------------------------------------------------------------

    async def _deliver(
        self, message: QueuedMessage, content: Content, name: str, shaper: Shaper
    ) -> None:
        throttled = succeeded = False
        try:
            pending = message.pending
            group = self.upstreams.group(name)
            if group is None:
                reply = UpstreamReply.failure(
                    "4.3.5", f"upstream group {name!r} is not configured")
                results = [RecipientResult(reply)] * len(pending)
                vias = [Via()] * len(pending)
            else:
                tried = await self._send(message, [r.address for r in pending], content,
                                         group)
                self._watch(group)
                if tried is None:
                    self._set_aside(message, group)
                    return
                results, vias = tried
            throttled = any(is_throttle(r.reply) for r in results if not r.own)
            succeeded = any(r.accepted for r in results)
            # What the upstream accepted must be recorded even if SIGTERM's deadline
            # cancels us now, or it would be sent a second time after restart.
            record = asyncio.ensure_future(self._record(message, results, vias, content))
            try:
                await asyncio.shield(record)
            except asyncio.CancelledError:
                await record
                raise
        finally:
            shaper.release(self.monotonic(), throttled, succeeded)

    def _watch(self, group: HostGroup) -> None:
        """Report the group down while every host is (each message deferred or set
        aside meanwhile counts), and up again once one answers."""
        name = group.settings.name
        if all(h.health.is_down for h in group.hosts):
            last = max(group.hosts, key=lambda h: h.health.down_since).health
            self.conditions.failing(
                UPSTREAM_DOWN, f"every host of upstream group {name!r} is down (last: "
                f"{last.last_failure})", subject=name, unit="messages not delivered",
                consequence="mail waits in the queue")
        else:
            self.conditions.cleared(UPSTREAM_DOWN, name)

    def _set_aside(self, message: QueuedMessage, group: HostGroup) -> None:
        """No host of `group` may be tried now: no attempt, no backoff; the message
        waits until a host's pause ends (one probe goes) or a host answers again."""
        hosts = group.hosts
        until = max(min(h.health.down_until for h in hosts), self.monotonic() + IDLE_POLL)
        if self.scheduler.set_aside(message.id, group.settings.name, until):
            down = max(hosts, key=lambda h: h.health.down_since).health
            since = formatdate(down.down_since, localtime=True) if down.down_since else "?"
            log.info("%s: not tried: upstream group %r is down since %s (%s)", message.id,
                     group.settings.name, since, down.last_failure)

    async def _send(
        self, message: QueuedMessage, recipients: Sequence[str], content: Content,
        group: HostGroup,
    ) -> tuple[list[RecipientResult], list[Via]] | None:
        """Try the group's hosts, best first, until every recipient has a final answer.

        Recipients that get a temporary failure on one host (connection trouble,
        timeouts, TLS errors, 4xx replies) or that it cannot take (no SMTPUTF8 or
        8BITMIME) go on to the next host in the same attempt; what is left after the
        last host keeps its last answer. Returns one result and where it came from per
        recipient; None when no host could be tried at all (all down).
        """
        results: dict[int, RecipientResult] = {}
        vias: dict[int, Via] = {}
        todo = list(range(len(recipients)))
        tried = False
        for host in group.candidates():
            if not todo:
                break
            if not host.health.admits():
                continue
            tried = True
            got, via, unsuitable = await self._try_host(message, host, recipients, todo,
                                                        content)
            for i, result in got.items():
                results[i] = result
                vias[i] = via
            # A host that cannot take the message at all leaves it to the next one.
            todo = [i for i in todo if unsuitable or not got[i].final]
        if not tried:
            return None
        return ([results[i] for i in range(len(recipients))],
                [vias[i] for i in range(len(recipients))])

    async def _try_host(
        self,
        message: QueuedMessage,
        host: Host,
        recipients: Sequence[str],
        todo: list[int],
        content: Content,
    ) -> tuple[dict[int, RecipientResult], Via, bool]:
        """Send to the `todo` recipients through one host; new transactions on the same
        connection for recipients it had no room for (452). Returns a result for every
        recipient of `todo`, where they came from, and whether the host could not take
        the message at all (no SMTPUTF8 or 8BITMIME)."""
        got: dict[int, RecipientResult] = {}
        unsuitable = False
        health = host.health
        via = Via(str(host.member), _remote_name(host.member.host))
        failure: UpstreamReply | None = None
        verdict = False  # whether the host's health was judged by this attempt
        try:
            for _ in range(2):  # a second go only after a stale pooled connection
                batch = [i for i in todo if i not in got]
                try:
                    async with host.borrow() as conn:
                        via = _via(host, conn)
                        while batch:
                            sent = await transmit(conn, message.sender,
                                                  [recipients[i] for i in batch], content,
                                                  host.settings, message.smtputf8)
                            for i, result in zip(batch, sent.results, strict=True):
                                if not result.again:
                                    got[i] = result
                            batch = [i for i, r in zip(batch, sent.results, strict=True)
                                     if r.again]
                            if sent.host_trouble is not None:
                                health.failed(str(sent.host_trouble))
                                verdict = True
                                break
                            unsuitable = sent.unsuitable
                            if not unsuitable:
                                health.succeeded()
                                verdict = True
                except StaleConnection:
                    continue
                break
        except CONNECTION_ERRORS as exc:
            failure = UpstreamReply.failure(
                "4.4.1", f"connection to {host.member} failed: {_describe(exc)}")
            health.failed(str(failure))
            verdict = True
            self.metrics.connect_failed(host.settings.name)
        except Exception as exc:
            # A bug or a library surprise must defer the message, not lose it.
            log.exception("%s: unexpected error talking to %s", message.id, host.member)
            failure = UpstreamReply.failure("4.3.0", f"internal error: {type(exc).__name__}")
        finally:
            if not verdict:
                health.released()
        if failure is None:
            failure = UpstreamReply.failure("4.4.1", f"no answer from {host.member}")
        for i in todo:
            got.setdefault(i, RecipientResult(failure))
        return got, via, unsuitable

    # -- recording ----------------------------------------------------------------------

    async def _record(
        self,
        message: QueuedMessage,
        results: Sequence[RecipientResult],
        vias: Sequence[Via],
        content: Content,
    ) -> None:
        queue = self.settings.queue
        now = self.clock()
        attempts = message.attempts + 1
        expired = now - message.received_at >= queue.max_lifetime
        # RFC 5321 section 4.5.5 and RFC 3464: never a notification to the null sender.
        bounce_them = queue.on_permanent_failure == "bounce" and message.sender != ""
        outcomes, failures, events, suppress = [], [], [], []
        # Never wait past the queue lifetime: the expiry bounce is due then.
        retry_at = min(now + retry_delay(attempts, queue), message.received_at + queue.max_lifetime)
        for rcpt, result, via in zip(message.pending, results, vias, strict=True):
            reply = str(result.reply)
            if result.accepted:
                state, status, event = "sent", "sent", "sent"
            elif result.permanent or expired:
                if not result.permanent:
                    reply = f"4.4.7 queue lifetime expired; last reply: {reply}"
                state, status = "failed", "bounced" if bounce_them else "failed"
                event = "bounced" if result.permanent else "expired"
                failures.append(bounce.Failure(rcpt.address, result.reply, via.remote_mta,
                                               expired=not result.permanent))
                if result.permanent and self.settings.suppression.suppresses(
                        result.reply.status):
                    suppress.append((rcpt.address, reply))
            else:
                state, status, event = "pending", "deferred", "deferred"
            events.append(outcomes_of.attempt(message, rcpt.address, event, reply, via.relay,
                                              via.tls, retry_at, bounce_them))
            outcomes.append(Outcome(rcpt.position, state, reply))  # type: ignore[arg-type]
            version, _, cipher = via.tls.partition(" ")
            tls = f", tls={version}, cipher={cipher}" if via.tls else ""
            log.info(
                "%s: to=<%s>, relay=%s%s, delay=%.2f, attempts=%d, status=%s (%s)",
                message.id, rcpt.address, via.relay, tls, now - message.received_at,
                attempts, status, reply,
            )
        dsn = None
        if failures and bounce_them:
            # The bounce quotes the header section only: read no more than that can be.
            head = await content.head(2 * self.settings.inbound.max_header_size)
            dsn = self._bounce(message, failures, head, now)
        states = {o.state for o in outcomes}
        unrecorded = Unrecorded(
            message, outcomes, retry_at,
            last_error=next((o.reply for o in outcomes if o.state != "sent"), ""),
            dsn=dsn,
            status="deferred" if "pending" in states else "bounced" if "failed" in states
            else "sent",
            events=events, suppress=suppress,
        )
        self.metrics.delivered(message.route or "default", unrecorded.status,
                               now - message.received_at)
        await self._commit(unrecorded)

    async def _commit(self, result: Unrecorded) -> bool:
        """Store an attempt's results (and its bounce first: a crash in between sends
        the bounce twice rather than never). When the spool cannot take them, they are
        kept here and written later: what an upstream accepted is never sent again, and
        no new delivery starts meanwhile."""
        message = result.message
        bounced = result.dsn is not None
        try:
            if result.dsn is not None:
                dsn_id, envelope, dsn = result.dsn
                await self.spool.store(dsn_id, envelope, dsn, events=outcomes_of.received(
                    dsn_id, envelope, bounce.message_id(message.id, self.settings.smtp_hostname),
                    len(dsn), "bounce", [f"the relay's notification about {message.id}"]))
                log.info("%s: sender non-delivery notification: %s", message.id, dsn_id)
                result.dsn = None
            new_state = await self.spool.record_attempt(
                message.id, result.outcomes, result.retry_at, result.last_error,
                result.events)
        except Exception as exc:
            if not self._unrecorded:
                log.error("cannot write to the spool (%s): delivery paused until it can; "
                          "results are kept in memory meanwhile", exc)
            self._unrecorded[message.id] = result
            return False
        self._unrecorded.pop(message.id, None)
        if bounced or new_state is not None:
            # The bounce, or the message itself, waits in the spool now. A message sent
            # (deleted) leaves nothing there: no query for it.
            self.wake()
        await self._suppress(message.id, result.suppress)
        if new_state == "failed" and self.settings.queue.on_permanent_failure == "hold":
            with contextlib.suppress(Exception):
                await self.spool.set_state(message.id, "hold", self.clock(),
                                           expect=("failed",),
                                           events=[outcomes_of.operator("held", message,
                                                                        by="relay")])
                log.info("%s: held after permanent failure", message.id)
        return True

    async def _suppress(self, queue_id: str, recipients: list[tuple[str, str]]) -> None:
        """[suppression]: a recipient whose address failed permanently is refused at
        RCPT from now on (until it expires or an operator removes it)."""
        if self.suppression is None:
            return
        for address, reply in recipients:
            try:
                await self.suppression.add(address, "bounce", reply)
            except SuppressionError as exc:
                log.error("%s: cannot add <%s> to the suppression list: %s", queue_id,
                          address, exc)
            else:
                log.info("%s: to=<%s>, suppressed (%s)", queue_id, address, reply)

    async def _retry_unrecorded(self) -> None:
        waiting = len(self._unrecorded)
        for result in list(self._unrecorded.values()):
            if not await self._commit(result):
                return
        log.warning("spool writable again: %d delivery results stored, delivery resumes",
                    waiting)

    def _bounce(
        self, message: QueuedMessage, failures: list[bounce.Failure], head: bytes, now: float
    ) -> tuple[str, Envelope, bytes]:
        """An RFC 3464 notification to the sender, through the same upstream group."""
        hostname = self.settings.smtp_hostname
        # RFC 6533: a global (UTF-8) report only when the sender's own address needs
        # SMTPUTF8 anyway; otherwise an ASCII report that any upstream takes.
        utf8 = not message.sender.isascii()
        dsn = bounce.build(queue_id=message.id, reporting_mta=hostname, sender=message.sender,
                           arrival=message.received_at, failures=failures, original=head,
                           now=now, utf8=utf8)
        envelope = Envelope(sender="", recipients=(message.sender,), client_address="",
                            helo=hostname, listener="bounce", received_at=now,
                            route=message.route, smtputf8=utf8)
        return new_queue_id(), envelope, dsn


def _via(host: Host, conn: Connection) -> Via:
    member = host.member
    name = conn.server_name or _remote_name(member.host)
    relay = f"{name}[{member.host}]:{member.port}" if name and name != member.host \
        else str(member)
    return Via(relay, name, conn.tls)


@functools.lru_cache(maxsize=1024)  # asked for every try: the hosts are few
def _remote_name(host: str) -> str:
    """A configured host as a Remote-MTA name: a name, never an address."""
    return "" if client_ip(host) is not None else host


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        text = f"{exc.code} {exc.message}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]
