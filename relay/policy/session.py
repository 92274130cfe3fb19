"""Policy decisions for one SMTP session: facts, lazy checks, timeouts, the decision log line.

The pipeline owns what a check must not: the time bound, exception capture (a bug in a
check or the engine is a 451, never a 5xx and never a traceback to the client), and the
one log line per decision. Checks only compute outcomes; rules decide actions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import getaddresses

from relay.checks import dkim as dkimlib
from relay.checks.services import CheckServices, SessionChecks
from relay.checks.spf import received_spf_header
from relay.headers import header_fields
from relay.policy import Decision, Facts, Policy, Stage, evaluate
from relay.replies import Reply

log = logging.getLogger("relay.policy")

# The whole walk of one stage (with its DNS and Redis lookups) is bounded by this; the
# checks carry their own, shorter timeouts.
STAGE_TIMEOUT = 60.0

BACKEND_FAILURE = Reply(451, "4.3.0", "Temporary failure, try again later")


@dataclass(frozen=True, slots=True)
class DataVerdict:
    """The decision for a whole message at end of DATA."""

    action: str  # accept | hold | discard | reject | tempfail
    reply: Reply | None
    rule: str
    prepend: bytes  # header lines to put in front of the message (ours, tags, DKIM)
    route: str | None


class SessionPolicy:
    """Runs the policy at each stage of one session; one instance per connection."""

    def __init__(
        self,
        policy: Policy,
        services: CheckServices,
        hostname: str,
        listener: str,
        client_address: str,
        on_decision: Callable[[str, Decision], None] | None = None,
    ) -> None:
        self.policy = policy
        self.services = services
        self.hostname = hostname
        self.checks = SessionChecks(services, client_address)
        self.facts = Facts(client_address=client_address, listener=listener)
        self.sender: str | None = None
        self._on_decision = on_decision
        self.checks.fields["listener"] = listener
        # Parsing the header section costs per message; only do it for header rules.
        self._needs_headers = any(
            c.field == "header" for rule in policy.rules for c in (*rule.match, *rule.unless)
        )

    async def _walk(self, stage: Stage, facts: Facts) -> Decision:
        self.checks.stage = stage
        try:
            decision = await asyncio.wait_for(
                evaluate(self.policy, stage, facts, self.checks), STAGE_TIMEOUT
            )
        except Exception:
            log.exception("policy evaluation failed at %s; answering 451", stage)
            return Decision("tempfail", BACKEND_FAILURE, "internal-error")
        if decision.refused and self._limit_backend_failed(decision.rule):
            # The limit could not be consulted (Redis down, on_backend_error = tempfail):
            # say "try later" without claiming the client is over its limit.
            decision = Decision("tempfail", BACKEND_FAILURE, decision.rule)
        if stage == "data":
            # Log rules match again at every stage; the walk at DATA, with everything
            # known, is the one that speaks for the message.
            for rule, would in decision.would:
                log.info("%s: rule=%s %s", stage, rule, would)
        if self._on_decision is not None:
            self._on_decision(stage, decision)
        return decision

    def _limit_backend_failed(self, rule_name: str) -> bool:
        limit = self.policy.over_limit_of(rule_name)
        return limit is not None and self.checks.backend_failed(limit)

    def _early(self, decision: Decision) -> Reply | None:
        """A refusal before RCPT: answered now, or at RCPT when delay_reject is set."""
        if decision.refused and not self.policy.delay_reject:
            return decision.reply
        return None

    async def connect(self, tls: bool) -> Reply | None:
        self.facts = _replace(self.facts, tls=tls)
        return self._early(await self._walk("connect", self.facts))

    async def helo(self, name: str, tls: bool) -> Reply | None:
        self.checks.helo = name
        self.facts = _replace(self.facts, helo_name=name, tls=tls)
        return self._early(await self._walk("helo", self.facts))

    async def mail(
        self, sender: str, sasl_username: str, declared_size: int | None, tls: bool
    ) -> Reply | None:
        self.checks.new_transaction()
        self.checks.sender = sender
        self.checks.fields.update(
            sender=sender, sender_domain=sender.rpartition("@")[2].lower() if sender else "",
            sasl_username=sasl_username,
        )
        self.facts = _replace(self.facts, sender=sender, sasl_username=sasl_username,
                              size=declared_size, tls=tls, recipient=None, recipients=(),
                              headers=None)
        return self._early(await self._walk("mail", self.facts))

    async def rcpt(self, recipient: str, accepted: tuple[str, ...]) -> Decision:
        self.checks.fields.update(recipient=recipient,
                                  recipient_domain=recipient.rpartition("@")[2].lower())
        return await self._walk(
            "rcpt", _replace(self.facts, recipient=recipient, recipients=accepted)
        )

    async def data(self, recipients: tuple[str, ...], message: bytes) -> DataVerdict:
        self.checks.message = message
        self.checks.size = len(message)
        decision = await self._walk("data", _replace(
            self.facts, recipient=None, recipients=recipients, size=len(message),
            headers=header_fields(message) if self._needs_headers else (),
        ))
        if decision.action == "continue":  # the engine applies final_action at data
            decision = Decision("tempfail", BACKEND_FAILURE, "internal-error")
        prepend = b""
        if decision.action in ("accept", "hold"):
            try:
                prepend = await self._headers(message, decision)
            except Exception:
                log.exception("adding headers or DKIM signature failed; answering 451")
                return DataVerdict("tempfail", BACKEND_FAILURE, "internal-error", b"", None)
        return DataVerdict(decision.action, decision.reply, decision.rule, prepend,
                           decision.route)

    async def _headers(self, message: bytes, decision: Decision) -> bytes:
        """Authentication-Results, Received-SPF and tag headers; then the DKIM signature
        over exactly these plus the message, the bytes that go upstream."""
        settings = self.services.settings
        authserv_id = settings.authserv_id or self.hostname
        spf, dkim_outcome = self.checks.spf_outcome, self.checks.dkim_outcome
        lines = []
        if spf is not None or dkim_outcome is not None:
            lines.append(dkimlib.authentication_results_header(authserv_id, spf, dkim_outcome))
        if spf is not None:
            lines.append(received_spf_header(spf, self.checks.client_address,
                                             self.checks.helo, authserv_id))
        for name, value in decision.add_headers:
            lines.append(f"{name}: {_header_text(value)}\r\n")
        prepend = "".join(lines).encode("utf-8")
        keys = settings.dkim_keys and settings.signing_keys(
            from_domain(message) or _domain(self.sender_or_empty)
        )
        if keys:
            signed = prepend + message
            signature = await asyncio.to_thread(
                dkimlib.sign, signed, keys, settings.dkim_sign_headers
            )
            prepend = signature + prepend
        return prepend

    @property
    def sender_or_empty(self) -> str:
        return self.facts.sender or ""


def _replace(facts: Facts, **changes: object) -> Facts:
    return dataclasses.replace(facts, **changes)  # type: ignore[arg-type]


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _header_text(value: str) -> str:
    return "".join(c if c == "\t" or " " <= c != "\x7f" else "?" for c in value)


def from_domain(message: bytes) -> str:
    """The domain of the From: header, which DKIM signs for (DMARC alignment)."""
    for name, value in header_fields(message):
        if name.lower() == "from":
            found = [addr for _, addr in getaddresses([value]) if "@" in addr]
            return _domain(found[0]) if found else ""
    return ""
