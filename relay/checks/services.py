"""The checks policies ask for (SPF, DKIM, rate limits): settings, services, lazy results."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from relay.checks import dkim as dkimlib
from relay.checks.dns import DnsSettings, Resolver
from relay.checks.ratelimit import Limiter, LimitSpec, redis_client
from relay.checks.spf import SpfOutcome, check_spf
from relay.ops.metrics import Metrics
from relay.schema import Table, parse_hostport

log = logging.getLogger("relay.checks")

SpfMode = Literal["client", "egress"]


@dataclass(frozen=True, slots=True)
class CheckSettings:
    """[dns], [spf], [dkim], [ratelimit] and the Authentication-Results authserv-id."""

    dns: DnsSettings = field(default_factory=DnsSettings)
    # RFC 8601 section 2.5; "" = the relay's hostname.
    authserv_id: str = ""
    spf_mode: SpfMode = "client"
    spf_egress_addresses: tuple[str, ...] = ()
    spf_timeout: float = 20.0
    dkim_verify_timeout: float = 10.0
    dkim_sign_headers: tuple[str, ...] = dkimlib.DEFAULT_SIGNED_HEADERS
    dkim_keys: tuple[dkimlib.SigningKey, ...] = field(default=(), repr=False)
    redis_url: str = ""
    redis_key_prefix: str = "policy-relay:"
    redis_timeout: float = 0.25
    on_backend_error: Literal["local", "tempfail", "allow"] = "local"

    def signing_keys(self, domain: str) -> tuple[dkimlib.SigningKey, ...]:
        domain = domain.lower().rstrip(".")
        return tuple(k for k in self.dkim_keys if k.domain == domain)


def read_check_settings(root: Table) -> CheckSettings:
    base = CheckSettings()
    dns_table = root.table("dns")
    nameservers = []
    for item in dns_table.strings("nameservers", ()):
        try:
            nameservers.append(parse_hostport(item, default_port=53))
        except ValueError:
            dns_table.error("nameservers", f'expected "ADDRESS" or "ADDRESS:PORT", got {item!r}')
    dns = DnsSettings(
        nameservers=tuple(nameservers),
        timeout=dns_table.duration("timeout", base.dns.timeout, low=0.05),
        attempts=dns_table.integer("attempts", base.dns.attempts, 1, 10),
    )
    dns_table.finish()

    spf = root.table("spf")
    mode = spf.string("mode", base.spf_mode, ("client", "egress"))
    egress = spf.strings("egress_addresses", ())
    if mode == "egress" and not egress:
        spf.error("egress_addresses", 'must name the egress address(es) when mode = "egress"')
    spf_timeout = spf.duration("timeout", base.spf_timeout, low=0.1)
    spf.finish()

    dkim = root.table("dkim")
    verify_timeout = dkim.duration("verify_timeout", base.dkim_verify_timeout, low=0.1)
    headers = dkim.strings("sign_headers", base.dkim_sign_headers)
    keys = _read_dkim_keys(dkim)
    dkim.finish()

    limits = root.table("ratelimit")
    results = root.table("authentication_results")
    settings = CheckSettings(
        dns=dns,
        authserv_id=results.string("authserv_id", ""),
        spf_mode=mode,  # type: ignore[arg-type]
        spf_egress_addresses=egress,
        spf_timeout=spf_timeout,
        dkim_verify_timeout=verify_timeout,
        dkim_sign_headers=headers,
        dkim_keys=keys,
        redis_url=limits.string("redis_url", base.redis_url),
        redis_key_prefix=limits.string("key_prefix", base.redis_key_prefix),
        redis_timeout=limits.duration("redis_timeout", base.redis_timeout, low=0.01),
        on_backend_error=limits.string(  # type: ignore[arg-type]
            "on_backend_error", base.on_backend_error, ("local", "tempfail", "allow")
        ),
    )
    limits.finish()
    results.finish()
    return settings


def _read_dkim_keys(dkim: Table) -> tuple[dkimlib.SigningKey, ...]:
    """Keys from [[dkim.key]] entries and from key_directory/<domain>/<selector>.key."""
    keys: list[dkimlib.SigningKey] = []
    directory = dkim.string("key_directory", "")
    if directory:
        base = Path(directory)
        if not base.is_dir():
            dkim.error("key_directory", f"not a directory: {directory}")
        else:
            for path in sorted(base.glob("*/*.key")):
                try:
                    keys.append(dkimlib.load_key(path, path.parent.name.lower(), path.stem))
                except ValueError as exc:
                    dkim.error("key_directory", str(exc))
    for table in dkim.table_list("key"):
        domain = table.string("domain", "").lower()
        selector = table.string("selector", "")
        key_file = table.string("key_file", "")
        for name, value in (("domain", domain), ("selector", selector), ("key_file", key_file)):
            if not value:
                table.error(name, "required")
        if domain and selector and key_file:
            try:
                keys.append(dkimlib.load_key(key_file, domain, selector))
            except ValueError as exc:
                table.error("key_file", str(exc))
        table.finish()
    return tuple(keys)


class CheckServices:
    """The long-lived parts the checks share: resolver, SPF thread pool, rate limiter."""

    def __init__(
        self, settings: CheckSettings, limits: dict[str, LimitSpec], metrics: Metrics | None = None
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

    Implements the policy engine's Checks protocol. SPF is per transaction (MAIL FROM
    identity); DKIM is per message; a limit charges its bucket once per unit it counts:
    once per session (connection), per transaction (message), per recipient, or with
    the message size at end of data (byte).
    """

    def __init__(self, services: CheckServices, client_address: str) -> None:
        self.services = services
        self.client_address = client_address
        self.fields: dict[str, str] = {"client_address": client_address}
        self.stage = "connect"
        self.size = 0
        self.message: bytes | None = None
        self.spf_outcome: SpfOutcome | None = None
        self.dkim_outcome: dkimlib.DkimOutcome | None = None
        self._spf_task: asyncio.Task[SpfOutcome] | None = None
        self._charges: dict[tuple[str, str], LimitCharge] = {}
        self.helo = ""
        self.sender = ""

    def new_transaction(self) -> None:
        """MAIL FROM: the SPF identity and the per-message and per-recipient charges reset."""
        self.spf_outcome = None
        self._spf_task = None
        self.dkim_outcome = None
        self.message = None
        self._charges = {k: v for k, v in self._charges.items() if k[1] == "session"}
        for name in ("recipient", "recipient_domain"):
            self.fields.pop(name, None)

    async def spf(self) -> str:
        if self.spf_outcome is None:
            self.spf_outcome = await self._run_spf()
        return self.spf_outcome.result

    async def _run_spf(self) -> SpfOutcome:
        settings = self.services.settings
        addresses = (
            settings.spf_egress_addresses if settings.spf_mode == "egress"
            else (self.client_address,)
        )
        worst: SpfOutcome | None = None
        for ip in addresses:
            outcome = await check_spf(
                self.services.resolver, ip, self.sender, self.helo,
                timeout=settings.spf_timeout, executor=self.services.executor,
            )
            # egress mode: every egress address must pass for the sender to be safe.
            if worst is None or outcome.result != "pass":
                worst = outcome
            if outcome.result != "pass":
                break
        assert worst is not None
        return worst

    async def dkim(self) -> tuple[str, str]:
        if self.dkim_outcome is None:
            if self.message is None:
                return "none", ""
            self.dkim_outcome = await dkimlib.verify_dkim(
                self.services.resolver, self.message,
                timeout=self.services.settings.dkim_verify_timeout,
            )
        return self.dkim_outcome.result, self.dkim_outcome.domain

    async def over_limit(self, name: str) -> tuple[bool, float]:
        limiter = self.services.limiter
        spec = limiter.specs[name]
        if spec.count == "connection":
            unit, cost = "session", 1
        elif spec.count == "message":
            unit, cost = "message", 1
        elif spec.count == "recipient":
            if self.stage != "rcpt":
                return False, 0.0  # each recipient was charged (and refused) at its RCPT
            unit, cost = "rcpt:" + self.fields.get("recipient", ""), 1
        else:
            if self.stage != "data":
                return False, 0.0
            unit, cost = "data", max(1, self.size)
        charge = self._charges.get((name, unit))
        if charge is None:
            fallbacks = limiter.fallbacks
            result = await limiter.check(name, self.fields, cost)
            if limiter.fallbacks != fallbacks and self.services.metrics is not None:
                self.services.metrics.ratelimit_fallback()
            charge = LimitCharge(not result.allowed, result.retry_after, result.backend_error)
            self._charges[(name, unit)] = charge
        return charge.over, charge.retry_after

    def backend_failed(self, name: str) -> bool:
        return any(c.backend_error and c.over for (n, _), c in self._charges.items() if n == name)

