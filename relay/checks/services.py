"""The checks policies ask for (SPF, DKIM, rate limits): shared services and per-session results."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import getaddresses

from relay.address import domain_of
from relay.checks import dkim as dkimlib
from relay.checks.dmarc import DmarcOutcome, author_domain, evaluate_dmarc
from relay.checks.dns import Resolver
from relay.checks.ratelimit import Limiter, LimitSpec, redis_client
from relay.checks.settings import CheckSettings
from relay.checks.spf import SpfOutcome, check_spf
from relay.events.suppression import SuppressionList
from relay.headers import header_fields
from relay.ops.conditions import REDIS_DOWN, Conditions
from relay.ops.metrics import Metrics
from relay.policy.engine import Facts
from relay.workers.link import Link

log = logging.getLogger("relay.checks")

class CheckServices:
    """The long-lived parts the checks share: resolver, SPF thread pool, rate limiter."""

    def __init__(
        self, settings: CheckSettings, limits: dict[str, LimitSpec],
        metrics: Metrics | None = None, shared: Link | None = None,
        suppression: SuppressionList | None = None,
        conditions: Conditions | None = None,
    ) -> None:
        self.settings = settings
        self.suppression = suppression
        self.metrics = metrics
        self.resolver = Resolver(settings.dns)
        # pyspf blocks, one thread per evaluation. The pool is bounded (max_concurrent)
        # and every evaluation carries its deadline (spf timeout, time queued included),
        # so senders whose DNS never answers hold at most that many threads for at most
        # that long: a pool of a few threads would queue everyone else's SPF behind
        # them. A thread waiting on a socket costs little; the bound is what matters.
        self.executor = ThreadPoolExecutor(
            max_workers=settings.spf_max_concurrent, thread_name_prefix="spf"
        )
        redis = redis_client(settings.redis_url, timeout=settings.redis_timeout) \
            if settings.redis_url else None
        self.limiter = Limiter(
            limits.values(),
            redis=redis,
            key_prefix=settings.redis_key_prefix,
            on_backend_error=settings.on_backend_error,
            redis_timeout=settings.redis_timeout,
            shared=shared,
            conditions=conditions,
        )

    async def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        # Replaced on reload: what this limiter saw of Redis is no longer in force (the
        # new one reports Redis down again as soon as it sees it).
        self.limiter.conditions.cleared(REDIS_DOWN)


@dataclass
class LimitCharge:
    """What a limit said for one unit of counting (session, message, recipient)."""

    over: bool
    retry_after: float
    backend_error: bool = False


class SessionChecks:
    """Check results for one SMTP session, each computed at most once.

    Implements the policy engine's Checks protocol: each check gets the facts it needs as
    arguments. SPF is per transaction (MAIL FROM identity); DKIM is per message; a limit
    charges its bucket once per unit it counts: once per session (connection), per
    transaction (message), per recipient, or with the message size at DATA (byte).
    """

    def __init__(self, current: Callable[[], CheckServices]) -> None:
        self.current = current
        self.services = current()
        self.spf_outcome: SpfOutcome | None = None
        self.spf_helo_outcome: SpfOutcome | None = None
        self._spf_helo_of: tuple[str, str] = ("", "")  # (client address, HELO name)
        self.dkim_outcome: dkimlib.DkimOutcome | None = None
        self.dmarc_outcome: DmarcOutcome | None = None
        self.dmarc_outbound_outcome: DmarcOutcome | None = None
        self._charges: dict[tuple[str, str], LimitCharge] = {}
        self._suppressed: dict[str, str] = {}  # recipient -> date suppressed, or ""

    def new_transaction(self) -> None:
        """MAIL FROM: the SPF identity and the per-message and per-recipient charges reset;
        the transaction uses the services in force now (a reload may have replaced them)."""
        self.services = self.current()
        self.spf_outcome = None
        self.dkim_outcome = None
        self.dmarc_outcome = None
        self.dmarc_outbound_outcome = None
        self._suppressed = {}
        self._charges = {k: v for k, v in self._charges.items() if k[1] == "session"}

    async def spf(self, facts: Facts) -> str:
        return (await self._spf(facts)).result

    async def _spf(self, facts: Facts) -> SpfOutcome:
        if self.spf_outcome is None:
            settings = self.services.settings
            addresses = (
                settings.spf_egress_addresses if settings.spf_mode == "egress"
                else (facts.client_address,)
            )
            self.spf_outcome = await self._run_spf(facts.sender or "", facts, addresses)
        return self.spf_outcome

    async def spf_helo(self, facts: Facts) -> str:
        """RFC 7208 section 2.3: the HELO identity checked on its own; for the null
        sender it is the very check `spf` makes (section 2.4), done once."""
        if facts.sender == "":
            self.spf_helo_outcome = await self._spf(facts)
            return self.spf_helo_outcome.result
        key = (facts.client_address, facts.helo_name)
        if self.spf_helo_outcome is None or self._spf_helo_of != key:
            settings = self.services.settings
            addresses = (
                settings.spf_egress_addresses if settings.spf_mode == "egress"
                else (facts.client_address,)
            )
            self.spf_helo_outcome = await self._run_spf("", facts, addresses)
            self._spf_helo_of = key
        return self.spf_helo_outcome.result

    async def _run_spf(
        self, sender: str, facts: Facts, addresses: tuple[str, ...]
    ) -> SpfOutcome:
        settings = self.services.settings
        worst: SpfOutcome | None = None
        for ip in addresses:
            outcome = await check_spf(
                self.services.resolver, ip, sender, facts.helo_name,
                timeout=settings.spf_timeout, executor=self.services.executor,
            )
            # egress mode: every egress address must pass for the sender to be safe.
            if worst is None or outcome.result != "pass":
                worst = outcome
            if outcome.result != "pass":
                break
        assert worst is not None
        return worst

    async def dkim(self, facts: Facts) -> tuple[str, str]:
        if facts.message is None:
            return "none", ""
        outcome = await self._dkim(facts)
        return outcome.result, outcome.domain

    async def _dkim(self, facts: Facts) -> dkimlib.DkimOutcome:
        assert facts.message is not None
        if self.dkim_outcome is None:
            # The rest of a large message is read from its file in pieces as the body
            # hashes are computed, never whole (relay/checks/bodyhash.py); the one for
            # signing too if the relay may sign it (relay/policy/session.py _headers).
            settings = self.services.settings
            also = (dkimlib.SIGNING_BODY,) if facts.tail and settings.dkim_keys else ()
            self.dkim_outcome = await dkimlib.verify_dkim(
                self.services.resolver, facts.message, timeout=settings.dkim_verify_timeout,
                tail=facts.tail, also=also,
            )
        return self.dkim_outcome

    async def dmarc(self, facts: Facts) -> tuple[str, str]:
        """(result, policy) of RFC 7489 for the message as it arrived: the From: domain's
        record against the SPF and DKIM results the relay computed."""
        if facts.message is None:
            return "none", ""
        if self.dmarc_outcome is None:
            spf = await self._spf(facts)
            dkim_outcome = await self._dkim(facts)
            self.dmarc_outcome = await evaluate_dmarc(
                self.services.resolver, author_domain(facts.message),
                (spf.result, spf.domain), _passing(dkim_outcome),
                timeout=self.services.settings.dmarc_timeout,
            )
        return self.dmarc_outcome.result, self.dmarc_outcome.policy

    async def dmarc_outbound(self, facts: Facts) -> str:
        """The DMARC result a receiver will compute for this message once it leaves:
        the signatures this relay adds (assumed to verify: `policy-relay dkim check`
        tells whether their keys are published) and those already passing, and SPF of
        the sender from the [spf] egress addresses (none configured: SPF cannot align)."""
        if facts.message is None:
            return "none"
        if self.dmarc_outbound_outcome is None:
            settings = self.services.settings
            sender = facts.sender or ""
            domains = [k.domain for k in signing_keys_for(settings, facts.message, sender)]
            domains += _passing(await self._dkim(facts))
            spf: tuple[str, str] = ("none", "")
            if settings.spf_egress_addresses:
                outcome = (
                    await self._spf(facts) if settings.spf_mode == "egress"
                    else await self._run_spf(sender, facts, settings.spf_egress_addresses)
                )
                spf = (outcome.result, outcome.domain)
            self.dmarc_outbound_outcome = await evaluate_dmarc(
                self.services.resolver, author_domain(facts.message), spf, domains,
                timeout=settings.dmarc_timeout,
            )
        return self.dmarc_outbound_outcome.result

    async def over_limit(self, name: str, stage: str, facts: Facts) -> tuple[bool, float]:
        limiter = self.services.limiter
        spec = limiter.specs[name]
        if spec.count == "connection":
            unit, cost = "session", 1
        elif spec.count == "message":
            unit, cost = "message", 1
        elif spec.count == "recipient":
            if stage != "rcpt":
                return False, 0.0  # each recipient was charged (and refused) at its RCPT
            unit, cost = "rcpt:" + (facts.recipient or ""), 1
        else:
            if stage != "data":
                return False, 0.0
            unit, cost = "data", max(1, facts.size or 0)
        charge = self._charges.get((name, unit))
        if charge is None:
            fallbacks = limiter.fallbacks
            result = await limiter.check(name, limit_fields(facts), cost)
            if limiter.fallbacks != fallbacks and self.services.metrics is not None:
                self.services.metrics.ratelimit_fallback()
            charge = LimitCharge(not result.allowed, result.retry_after, result.backend_error)
            self._charges[(name, unit)] = charge
        return charge.over, charge.retry_after

    async def suppressed(self, address: str) -> str:
        # Asked at RCPT and again by the walk at DATA: one lookup per transaction.
        if address not in self._suppressed:
            suppression = self.services.suppression
            entry = await suppression.lookup(address) if suppression is not None else None
            self._suppressed[address] = "" if entry is None else _day(entry.added)
        return self._suppressed[address]

    def backend_failed(self, name: str) -> bool:
        return any(c.backend_error and c.over for (n, _), c in self._charges.items() if n == name)


def _day(when: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(when))


def _passing(outcome: dkimlib.DkimOutcome) -> list[str]:
    return [s.domain for s in outcome.signatures if s.result == "pass"]


def signing_keys_for(
    settings: CheckSettings, message: bytes, sender: str
) -> tuple[dkimlib.SigningKey, ...]:
    """The keys this relay signs ``message`` with: those of its From: domain (which DMARC
    aligns with), else of the envelope sender's domain."""
    if not settings.dkim_keys:
        return ()
    return settings.signing_keys(from_domain(message) or (domain_of(sender) if sender else ""))


def from_domain(message: bytes) -> str:
    """The domain of the first address in the From: header, "" when there is none."""
    for name, value in header_fields(message):
        if name.lower() == "from":
            found = [addr for _, addr in getaddresses([value]) if "@" in addr]
            return domain_of(found[0]) if found else ""
    return ""


def limit_fields(facts: Facts) -> dict[str, str]:
    """The values a limit's bucket key may be made of (relay.checks.ratelimit.KEY_FIELDS)."""
    sender = facts.sender or ""
    fields = {
        "client_address": facts.client_address,
        "listener": facts.listener,
        "sasl_username": facts.sasl_username,
        "sender": sender,
        "sender_domain": domain_of(sender) if sender else "",
    }
    if facts.recipient is not None:
        fields["recipient"] = facts.recipient
        fields["recipient_domain"] = domain_of(facts.recipient)
    return fields
