"""The checks policies ask for (SPF, DKIM, rate limits): shared services and per-session results."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from relay.address import domain_of
from relay.checks import dkim as dkimlib
from relay.checks.dns import Resolver
from relay.checks.ratelimit import Limiter, LimitSpec, redis_client
from relay.checks.settings import CheckSettings
from relay.checks.spf import SpfOutcome, check_spf
from relay.ops.metrics import Metrics
from relay.policy.engine import Facts
from relay.workers.link import Link

log = logging.getLogger("relay.checks")

class CheckServices:
    """The long-lived parts the checks share: resolver, SPF thread pool, rate limiter."""

    def __init__(
        self, settings: CheckSettings, limits: dict[str, LimitSpec],
        metrics: Metrics | None = None, shared: Link | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.resolver = Resolver(settings.dns)
        # pyspf blocks; a bounded pool keeps slow DNS from piling up threads.
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="spf")
        redis = redis_client(settings.redis_url, timeout=settings.redis_timeout) \
            if settings.redis_url else None
        self.limiter = Limiter(
            limits.values(),
            redis=redis,
            key_prefix=settings.redis_key_prefix,
            on_backend_error=settings.on_backend_error,
            redis_timeout=settings.redis_timeout,
            shared=shared,
        )

    async def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


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
        self.dkim_outcome: dkimlib.DkimOutcome | None = None
        self._charges: dict[tuple[str, str], LimitCharge] = {}

    def new_transaction(self) -> None:
        """MAIL FROM: the SPF identity and the per-message and per-recipient charges reset;
        the transaction uses the services in force now (a reload may have replaced them)."""
        self.services = self.current()
        self.spf_outcome = None
        self.dkim_outcome = None
        self._charges = {k: v for k, v in self._charges.items() if k[1] == "session"}

    async def spf(self, facts: Facts) -> str:
        if self.spf_outcome is None:
            self.spf_outcome = await self._run_spf(facts)
        return self.spf_outcome.result

    async def _run_spf(self, facts: Facts) -> SpfOutcome:
        settings = self.services.settings
        addresses = (
            settings.spf_egress_addresses if settings.spf_mode == "egress"
            else (facts.client_address,)
        )
        worst: SpfOutcome | None = None
        for ip in addresses:
            outcome = await check_spf(
                self.services.resolver, ip, facts.sender or "", facts.helo_name,
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
        if self.dkim_outcome is None:
            if facts.message is None:
                return "none", ""
            self.dkim_outcome = await dkimlib.verify_dkim(
                self.services.resolver, facts.message,
                timeout=self.services.settings.dkim_verify_timeout,
            )
        return self.dkim_outcome.result, self.dkim_outcome.domain

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

    def backend_failed(self, name: str) -> bool:
        return any(c.backend_error and c.over for (n, _), c in self._charges.items() if n == name)


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
