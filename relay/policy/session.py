"""One SMTP session as the relay decides it: connect, helo, mail, rcpt, data, each answered
with the reply the client hears.

The live relay (relay.inbound) and the dry run (relay.policy.dryrun) drive this same model,
so `policy-relay test` says what the relay does. It holds everything decided before and
around the policy (address syntax, SMTPUTF8, size, recipient and storage limits, the
message checks at DATA) as well as the policy walks, and it owns what a check must not:
the time bound, exception capture (a bug in a check or the engine is a 451, never a 5xx
and never a traceback to the client) and the record of every refusal.

Facts are kept once, here; the checks receive them as arguments. A transaction runs on the
configuration in force at its MAIL: a reload applies from the next MAIL of an open session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import dkim

from relay import replies
from relay.address import problem
from relay.checks import dkim as dkimlib
from relay.checks.authresults import authentication_results_header
from relay.checks.dkim import reason_text
from relay.checks.services import SessionChecks, signing_keys_for
from relay.checks.spf import received_spf_header
from relay.headers import (
    fold,
    header_problem,
    header_stats,
    strip_forged_authentication_results,
)
from relay.ipaddr import in_networks
from relay.message import Tail, has_bare_line_ending, has_long_line, longest_line
from relay.policy import rewrite
from relay.policy.engine import Checks, Decision, Facts, evaluate
from relay.policy.maps import MapError
from relay.policy.rules import Stage
from relay.replies import Reply
from relay.runtime import Runtime
from relay.timebox import within

log = logging.getLogger("relay.policy")

# The whole walk of one stage (with its DNS and Redis lookups) is bounded by this; the
# checks carry their own, shorter timeouts.
STAGE_TIMEOUT = 60.0

BACKEND_FAILURE = Reply(451, "4.3.0", "Temporary failure, try again later")


class TransactionChecks(Checks, Protocol):
    """Checks that keep per-transaction results, reset at each MAIL."""

    def new_transaction(self) -> None: ...

    def backend_failed(self, limit: str) -> bool:
        """True when `limit` said "over" only because its backend (Redis) failed."""
        ...


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused command, for the log line and the metrics."""

    stage: str  # CONNECT, HELO, MAIL, RCPT or DATA, as in the log
    reply: Reply
    detail: str  # what the log says of the client's input
    rule: str = ""  # the policy rule that refused, "" for the server's own checks
    limit: str | None = None  # the limit that rule consulted, if any
    sender: str | None = None  # the session's facts when it refused, for the log
    helo: str = ""
    recipient: str | None = None
    sasl_username: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision for a whole message at the end of DATA."""

    action: str  # accept | hold | discard | reject | tempfail
    reply: Reply | None  # the refusal; for accept/hold/discard a rule's custom 2xx, or None
    rule: str
    message: bytes  # the message as it will be stored, forged Authentication-Results removed
    prepend: bytes  # header lines to put in front of it (ours, tags, DKIM signature)
    route: str | None
    # The envelope as it will be stored (relay.policy.rewrite), the archive copies to
    # store with it, and what the rewrite rules changed.
    sender: str = ""
    recipients: tuple[str, ...] = ()
    copies: tuple[rewrite.Copy, ...] = ()
    changes: tuple[str, ...] = ()
    tail: Tail | None = None  # the rest of a large message, on disk

    @property
    def refused(self) -> bool:
        return self.action in ("reject", "tempfail")


class PolicySession:
    """The decisions of one SMTP session; one instance per connection."""

    def __init__(
        self,
        current: Callable[[], Runtime],
        checks: TransactionChecks,
        client_address: str,
        listener: str,
        *,
        on_decision: Callable[[str, Decision], None] | None = None,
        on_refusal: Callable[[Refusal], None] | None = None,
        on_unsigned: Callable[[str], None] | None = None,
        trace: bool = False,
    ) -> None:
        self.current = current
        self.runtime = current()
        self.checks = checks
        self.facts = Facts(client_address=client_address, listener=listener)
        self.smtputf8 = False
        self._on_decision = on_decision
        self._on_refusal = on_refusal
        self._on_unsigned = on_unsigned
        self._trace = trace
        # The walk of the last stage (None when the server refused before the policy).
        self.last_decision: Decision | None = None
        # The walks of this transaction (and of connect and helo before it), for the
        # message's history.
        self.walks: list[tuple[str, Decision]] = []

    # -- the walk ---------------------------------------------------------------------

    async def _walk(self, stage: Stage, facts: Facts) -> Decision:
        policy = self.runtime.policy
        try:
            # Nearly every walk finishes without waiting on a check: timed only if it
            # waits, and with no task of its own.
            decision = await within(
                evaluate(policy, stage, facts, self.checks, trace=self._trace), STAGE_TIMEOUT)
        except Exception:
            log.exception("policy evaluation failed at %s; answering 451", stage)
            decision = Decision("tempfail", BACKEND_FAILURE, "internal-error")
        if decision.refused and self._limit_backend_failed(decision.rule):
            # The limit could not be consulted (Redis down, on_backend_error = tempfail):
            # say "try later" without claiming the client is over its limit.
            decision = dataclasses.replace(decision, action="tempfail", reply=BACKEND_FAILURE)
        if stage == "data":
            # Log rules match again at every stage; the walk at DATA, with everything
            # known, is the one that speaks for the message.
            for rule, would in decision.would:
                log.info("%s: rule=%s %s", stage, rule, would)
        if self._on_decision is not None:
            self._on_decision(stage, decision)
        self.walks.append((stage, decision))
        self.last_decision = decision
        return decision

    def _limit_backend_failed(self, rule_name: str) -> bool:
        limit = self.runtime.policy.over_limit_of(rule_name)
        return limit is not None and self.checks.backend_failed(limit)

    def _qualified(self, address: str, sasl_username: str) -> str:
        """[server] qualify_domain: "root" becomes "root@<qualify_domain>" for a client
        allowed to relay (in relay_networks, or authenticated), before any check, as
        Postfix's myorigin does for local submissions. Others keep what they sent (and
        get 501 for an unqualified address)."""
        settings = self.runtime.settings
        domain = settings.qualify_domain
        if not domain or not address or "@" in address:
            return address
        if not sasl_username and not in_networks(self.facts.client_address,
                                                 settings.relay_networks):
            return address
        return f"{address}@{domain}"

    def _refuse(self, stage: str, reply: Reply, detail: str, rule: str = "",
                recipient: str | None = None) -> Reply:
        if self._on_refusal is not None:
            limit = self.runtime.policy.over_limit_of(rule) if rule else None
            self._on_refusal(Refusal(stage, reply, detail, rule, limit, self.facts.sender,
                                     self.facts.helo_name or "", recipient,
                                     self.facts.sasl_username))
        return reply

    def _early(self, stage: str, decision: Decision, detail: str) -> Reply | None:
        """A refusal before RCPT: answered now, or at RCPT when delay_reject is set."""
        if decision.refused and decision.reply is not None and not self.runtime.policy.delay_reject:
            return self._refuse(stage, decision.reply, detail, decision.rule)
        return None

    # -- the stages -------------------------------------------------------------------

    async def connect(self, tls: bool) -> Reply | None:
        """The client connected: None to greet it, else the refusal that ends the session."""
        self.runtime = self.current()
        self.last_decision = None
        self.facts = dataclasses.replace(self.facts, tls=tls)
        return self._early("CONNECT", await self._walk("connect", self.facts), "")

    async def helo(self, name: str, tls: bool) -> Reply | None:
        """EHLO or HELO (which also ends any transaction): None to answer as usual."""
        self.runtime = self.current()
        self.last_decision = None
        self.walks = [w for w in self.walks if w[0] == "connect"]
        self.facts = Facts(self.facts.client_address, self.facts.listener, helo_name=name,
                           tls=tls)
        return self._early("HELO", await self._walk("helo", self.facts), "")

    async def mail(
        self, sender: str, *, size: int | None, smtputf8: bool, sasl_username: str, tls: bool
    ) -> Reply:
        """MAIL FROM, with the null sender as "" and `size` the SIZE= declared, if any."""
        # A transaction runs on the configuration in force at its MAIL.
        self.runtime = self.current()
        sender = self._qualified(sender, sasl_username)
        self.last_decision = None
        self.walks = [w for w in self.walks if w[0] in ("connect", "helo")]
        self.checks.new_transaction()
        self.smtputf8 = smtputf8
        self.facts = dataclasses.replace(
            self.facts, sender=sender, sasl_username=sasl_username, size=size, tls=tls,
            recipient=None, recipients=(), message=None,
        )
        settings = self.runtime.settings
        detail = ""  # the log line names the sender itself
        if size is not None and size > settings.inbound.max_message_size:
            # RFC 1870 section 6.1: refused at MAIL when the declared size is too big.
            return self._refuse("MAIL", replies.MESSAGE_TOO_BIG, f"size={size}")
        if sender and not sender.isascii() and not smtputf8:
            return self._refuse("MAIL", replies.NEEDS_SMTPUTF8, detail)
        if sender and (why := problem(sender, utf8=smtputf8)):
            return self._refuse("MAIL", replies.BAD_SENDER_SYNTAX, why)
        if why := storage_short(settings.spool_path, settings.inbound.min_free_space, size or 0):
            return self._refuse("MAIL", replies.INSUFFICIENT_STORAGE, why)
        refusal = self._early("MAIL", await self._walk("mail", self.facts), detail)
        return refusal or replies.SENDER_OK

    async def rcpt(self, recipient: str) -> Reply:
        self.last_decision = None
        recipient = self._qualified(recipient, self.facts.sasl_username or "")
        settings = self.runtime.settings
        if not recipient.isascii() and not self.smtputf8:
            return self._refuse("RCPT", replies.NEEDS_SMTPUTF8, "", recipient=recipient)
        if why := problem(recipient, utf8=self.smtputf8):
            return self._refuse("RCPT", replies.BAD_RECIPIENT_SYNTAX, why, recipient=recipient)
        if len(self.facts.recipients) >= settings.inbound.max_recipients:
            return self._refuse("RCPT", replies.TOO_MANY_RECIPIENTS, "", recipient=recipient)
        decision = await self._walk(
            "rcpt", dataclasses.replace(self.facts, recipient=recipient)
        )
        if decision.refused and decision.reply is not None:
            return self._refuse("RCPT", decision.reply, "", decision.rule, recipient=recipient)
        self.facts = dataclasses.replace(
            self.facts, recipients=(*self.facts.recipients, recipient)
        )
        return replies.RECIPIENT_OK

    @property
    def recipients(self) -> tuple[str, ...]:
        return self.facts.recipients

    async def data(self, message: bytes, queue_id: str, tail: Tail | None = None) -> Verdict:
        """The end of DATA: the message checks, then the policy's final word. A large
        message comes as its first part (`message`: the header section and the start
        of the body) and the rest on disk (`tail`, checked as it was written)."""
        self.last_decision = None
        settings = self.runtime.settings
        detail = ""  # the log line names the sender itself

        def refused(reply: Reply, why: str, rule: str = "") -> Verdict:
            self._refuse("DATA", reply, why, rule)
            action = "tempfail" if reply.is_temporary else "reject"
            return Verdict(action, reply, rule, message, b"", None)

        size = len(message) + (tail.size if tail else 0)
        if size > settings.inbound.max_message_size:
            return refused(replies.MESSAGE_TOO_BIG, f"size={size}")
        if has_bare_line_ending(message) or (tail is not None and tail.bare_line_ending):
            return refused(replies.BAD_LINE_ENDING, detail)
        limit = settings.inbound.max_line_length
        # No bare CR or LF past this point, so the window scan is exact.
        if has_long_line(message, limit) or (tail is not None and tail.longest_line > limit):
            longest = max(longest_line(message), tail.longest_line if tail else 0)
            return refused(replies.LINE_TOO_LONG, f"line of {longest} octets")
        header_size, hops = header_stats(message)
        if header_size > settings.inbound.max_header_size:
            return refused(replies.HEADER_TOO_BIG, f"header_size={header_size}")
        if hops >= settings.inbound.max_hops:
            # RFC 5321 section 6.3: count Received: fields to break mail loops.
            return refused(replies.TOO_MANY_HOPS, f"hops={hops}")
        message, forged = strip_forged_authentication_results(message, self.authserv_id)
        if forged:
            log.info("%s: removed %d Authentication-Results header(s) claiming to be ours",
                     queue_id, forged)
        facts = dataclasses.replace(self.facts, recipient=None,
                                    size=len(message) + (tail.size if tail else 0),
                                    message=message, tail=tail)
        decision = await self._walk("data", facts)
        if decision.action == "continue":  # the engine applies final_action at data
            decision = Decision("tempfail", BACKEND_FAILURE, "internal-error")
        if decision.refused and decision.reply is not None:
            return refused(decision.reply, detail, decision.rule)
        prepend = b""
        rewritten = rewrite.Rewritten(facts.sender or "", facts.recipients, message)
        if decision.action in ("accept", "hold"):
            try:
                # Rewriting comes after every check (which judged what the client sent)
                # and before signing, so the signature covers the rewritten header.
                rewritten = rewrite.apply(decision.rewrites, rewritten.sender,
                                          rewritten.recipients, message)
                for change in rewritten.changes:
                    log.info("%s: %s", queue_id, change)
                signer = dataclasses.replace(facts, sender=rewritten.sender)
                prepend = await self._headers(signer, rewritten.message, decision, queue_id)
            except MapError as exc:
                log.error("%s: %s; answering 451", queue_id, exc)
                return refused(BACKEND_FAILURE, detail, "internal-error")
            except Exception:
                log.exception("adding headers or DKIM signature failed; answering 451")
                return refused(BACKEND_FAILURE, detail, "internal-error")
        return Verdict(decision.action, decision.reply, decision.rule, rewritten.message,
                       prepend, decision.route, rewritten.sender, rewritten.recipients,
                       rewritten.copies, rewritten.changes, tail)

    @property
    def authserv_id(self) -> str:
        settings = self.runtime.settings
        return settings.checks.authserv_id or settings.smtp_hostname

    async def _headers(
        self, facts: Facts, message: bytes, decision: Decision, queue_id: str
    ) -> bytes:
        """Authentication-Results, Received-SPF and tag headers, folded (RFC 5322
        section 2.1.1); then the DKIM signature over exactly these plus the message, the
        bytes that go upstream."""
        settings = self.runtime.settings.checks
        utf8 = self.smtputf8
        lines = []
        if isinstance(self.checks, SessionChecks):
            checks = self.checks
            spf, helo = checks.spf_outcome, checks.spf_helo_outcome
            if any(o is not None for o in (spf, helo, checks.dkim_outcome, checks.dmarc_outcome)):
                lines.append(authentication_results_header(
                    self.authserv_id, spf, checks.dkim_outcome, spf_helo=helo,
                    dmarc=checks.dmarc_outcome, utf8=utf8))
            # RFC 7208 section 9.1: one Received-SPF per identity checked.
            for outcome in (spf, helo if helo != spf else None):
                if outcome is not None:
                    lines.append(received_spf_header(
                        outcome, facts.client_address, facts.helo_name, self.authserv_id,
                        utf8=utf8))
        for name, value in decision.add_headers:
            lines.append(fold(f"{name}: {_header_text(value, utf8)}"))
        prepend = "".join(lines).encode("utf-8")
        keys = signing_keys_for(settings, message, facts.sender or "")
        if keys and (why := header_problem(message)):
            # A permanent condition, so never a 4xx (retrying sends the same bytes): like
            # Postfix, the relay takes a message whose first lines are not header fields
            # (its whole text is then body), but no DKIM signature can cover it.
            self._unsigned(queue_id, f"header section is not RFC 5322 syntax ({why})")
            keys = ()
        if keys:
            try:
                # The rest of a large message is read from its file in pieces for the
                # body hash, never whole (relay/checks/bodyhash.py), unless verification
                # already hashed the body for signing: it is the same, as rewriting and
                # our header fields change only the header section.
                verified = self.checks.dkim_outcome \
                    if isinstance(self.checks, SessionChecks) else None
                known = verified.body_hashes.get(dkimlib.SIGNING_BODY) if verified else None
                signature = await asyncio.to_thread(
                    dkimlib.sign, prepend + message, keys, settings.dkim_sign_headers,
                    facts.tail, known,
                )
            except dkim.DKIMException as exc:
                # Whatever else dkimpy's parser objects to is just as permanent.
                self._unsigned(queue_id, reason_text(exc))
                signature = b""
            prepend = signature + prepend
        return prepend

    def _unsigned(self, queue_id: str, why: str) -> None:
        log.warning("%s: not DKIM-signed: %s", queue_id, why)
        if self._on_unsigned is not None:
            self._on_unsigned(why)


def trace_lines(walks: list[tuple[str, Decision]], limit: int = 300) -> list[str]:
    """The rules that matched in each walk of a transaction, stage by stage, worded as
    `policy-relay test` words them (its report also says why each other rule did not
    match); at most `limit` lines (a message to a thousand recipients has a thousand
    RCPT walks)."""
    lines = []
    for stage, decision in walks:
        lines.append(f"{stage}:")
        lines.extend(f'  rule "{name}": matched' for name in decision.passed)
        lines.extend(f'  log: rule "{rule}" {text}' for rule, text in decision.would)
        if decision.rule and decision.rule != "final_action":
            reply = f": {decision.reply}" if decision.reply is not None else ""
            lines.append(f'  rule "{decision.rule}" [{decision.action}]: matched{reply}')
        elif decision.rule:
            lines.append(f"  no terminal rule matched: final_action {decision.action}")
        lines.append(f"  -> {decision.action}")
    if len(lines) > limit:
        lines[limit - 1:] = [f"... {len(lines) - limit + 1} more lines"]
    return lines


def storage_short(spool: Path, min_free: int, declared: int) -> str | None:
    """Why the spool cannot take a message of `declared` bytes now, or None.

    Postfix queue_minfree: refuse at MAIL (452 4.3.1) rather than fail after DATA. A spool
    not created yet is judged by the directory it will be created in.
    """
    free = _free_space(spool)
    if isinstance(free, str):
        return free
    if free < min_free + declared:
        return f"free space {free} below {min_free} + size {declared}"
    return None


# Free space is asked at every MAIL; a statvfs (and the walk to an existing directory)
# that old is as good as a new one, since a message that no longer fits fails its store
# with 451 anyway, and it saves two system calls per message under load.
FREE_SPACE_TTL = 0.1
_free_space_seen: dict[Path, tuple[float, int | str]] = {}


def _free_space(spool: Path) -> int | str:
    """Bytes free for the spool (or why they cannot be known), at most FREE_SPACE_TTL old."""
    now = time.monotonic()
    seen = _free_space_seen.get(spool)
    if seen is not None and now - seen[0] < FREE_SPACE_TTL:
        return seen[1]
    path = spool
    while not path.exists() and path != path.parent:
        path = path.parent
    free: int | str
    try:
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize
    except OSError as exc:
        free = f"cannot stat the spool: {exc.strerror}"
    _free_space_seen[spool] = (now, free)
    return free


def _header_text(value: str, utf8: bool) -> str:
    return "".join(
        c if c == "\t" or (" " <= c != "\x7f" and (utf8 or c.isascii())) else "?" for c in value
    )
