"""Burst-and-rate buckets (GCRA) kept in memory or shared through Redis."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import ipaddress
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from relay.address import domain_of
from relay.ipaddr import client_ip
from relay.ops.conditions import REDIS_DOWN, Conditions
from relay.schema import Table

if TYPE_CHECKING:
    from relay.workers.link import Link

log = logging.getLogger("relay.ratelimit")

KEY_FIELDS = (
    "client_address",
    "sasl_username",
    "sender",
    "sender_domain",
    "recipient",
    "recipient_domain",
    "listener",
)
COUNTS = ("message", "recipient", "byte", "connection")
BACKENDS = ("local", "redis")
MODES = ("leaky", "strict")
TABLE_KEYS = ("key", "rate", "burst", "count", "exempt_recipients", "backend", "mode")

BackendErrorPolicy = Literal["local", "tempfail", "allow"]

# Times are microseconds held in floats (Python float == Lua double, so both backends compute
# the same thing). Near the current epoch a double resolves ~0.25 us, so a unit may pass up
# to this much early rather than be refused by a rounding error on the exact boundary.
_SLACK_US = 1.0

_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_RATE_RE = re.compile(r"(\d+)([kmg]?)\s*/\s*(\d*)\s*([smhd])", re.IGNORECASE)
_PERIOD_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_FACTOR = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_RATE_HELP = 'a rate "N/period" of at least 1 (period units s, m, h, d, e.g. "600/1h")'


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitSpec:
    """One `[limit.NAME]` table. Two specs are equal when they define the same bucket.

    `burst` is in the unit being counted: messages, recipients, connections or bytes. A single
    check whose cost exceeds `burst` (say a message larger than a byte burst) can never pass
    and is refused with `retry_after = inf`; size the byte burst above the largest message.
    """

    name: str
    key_fields: tuple[str, ...]
    client_prefix_v4: int | None = None
    client_prefix_v6: int | None = None
    rate_count: int
    rate_period_seconds: int
    burst: int
    count: str = "message"
    exempt_recipients: tuple[str, ...] = ()
    backend: str = "local"
    mode: str = "leaky"

    @property
    def emission_interval(self) -> float:
        """Seconds for one unit to drain: `period / rate`."""
        return self.rate_period_seconds / self.rate_count

    @property
    def interval_us(self) -> float:
        return self.rate_period_seconds * 1e6 / self.rate_count

    def is_exempt(self, recipient: str) -> bool:
        """True when `recipient` matches an exempt local part (any domain) or full address."""
        if not self.exempt_recipients:
            return False
        address = normalize_address(recipient)
        local = address.rpartition("@")[0] or address
        return address in self.exempt_recipients or local in self.exempt_recipients


@dataclass(frozen=True, slots=True)
class LimitResult:
    """Outcome of one check.

    `remaining` is how many more units would pass right now (0 when unknown). With
    `backend_error` set the bucket could not be consulted: `allowed` then only reflects
    `on_backend_error` ("tempfail" refuses, and the caller should answer 451 4.3.0 rather
    than its over-limit reply; "allow" passes).
    """

    allowed: bool
    retry_after: float
    remaining: int
    key: str = ""
    backend_error: bool = False
    exempt: bool = False


@dataclass(frozen=True, slots=True)
class BucketState:
    """One non-idle bucket, for `policy-relay limits show`."""

    limit: str
    key: str
    backend: str  # "local", "redis", or "fallback" (local stand-in while Redis is down)
    remaining: int
    full_in: float  # seconds until the bucket is idle (full burst available) again


# --- configuration ---------------------------------------------------------------------------


def read_limit(name: str, table: Table) -> LimitSpec | None:
    """Validate one `[limit.NAME]` table; None when it has errors (all reported)."""
    before = len(table.errors.messages)
    if not _NAME_RE.fullmatch(name):
        # The name is part of the Redis key `<prefix>rl:<name>:<key>`, which `show` splits on ":".
        table.error("name", 'must consist of letters, digits, "_" and "-"')

    key_fields: list[str] = []
    prefix_v4: int | None = None
    prefix_v6: int | None = None
    if not table.has("key"):
        table.error("key", 'required (a list of fields, e.g. ["client_address/24/64"])')
    for item in table.strings("key", ()):
        field, _, prefix = item.partition("/")
        if field not in KEY_FIELDS:
            table.error("key", f'unknown field "{item}" (expected one of {", ".join(KEY_FIELDS)})')
            continue
        if field in key_fields:
            table.error("key", f'field "{field}" listed twice')
            continue
        key_fields.append(field)
        if not prefix:
            continue
        if field != "client_address":
            table.error("key", f'"{item}": only client_address takes a prefix length')
            continue
        parsed = _parse_prefixes(prefix)
        if parsed is None:
            table.error(
                "key",
                f'"{item}": expected client_address/V4, client_address/V6 or '
                "client_address/V4/V6 (V4 1-32, V6 33-128 when given alone)",
            )
        else:
            prefix_v4, prefix_v6 = parsed

    if not table.has("rate"):
        table.error("rate", f"required, {_RATE_HELP}")
    rate_count, period = table.value("rate", (0, 0), parse_rate, _RATE_HELP)
    if not table.has("burst"):
        table.error("burst", "required (units that may pass at once from an idle bucket)")
    burst = table.integer("burst", 1, 1, None)
    count = table.string("count", COUNTS[0], COUNTS)
    backend = table.string("backend", BACKENDS[0], BACKENDS)
    mode = table.string("mode", MODES[0], MODES)
    exempt = [normalize_address(e) for e in table.strings("exempt_recipients", ()) if e]
    table.finish()
    if len(table.errors.messages) > before:
        return None
    return LimitSpec(
        name=name,
        key_fields=tuple(key_fields),
        client_prefix_v4=prefix_v4,
        client_prefix_v6=prefix_v6,
        rate_count=rate_count,
        rate_period_seconds=period,
        burst=burst,
        count=count,
        exempt_recipients=tuple(dict.fromkeys(exempt)),
        backend=backend,
        mode=mode,
    )


def parse_rate(value: object) -> tuple[int, int]:
    """(units, seconds) from "600/1h", "2k / 1d"; ValueError when malformed or zero."""
    match = _RATE_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError
    count = int(match[1]) * _SIZE_FACTOR[match[2].lower()]
    period = int(match[3] or 1) * _PERIOD_SECONDS[match[4].lower()]
    if count < 1 or period < 1:
        raise ValueError
    return count, period


def _parse_prefixes(text: str) -> tuple[int | None, int | None] | None:
    parts = text.split("/")
    if not all(p.isdigit() for p in parts) or len(parts) > 2:
        return None
    numbers = [int(p) for p in parts]
    if len(numbers) == 2:
        v4, v6 = numbers
        return (v4, v6) if 1 <= v4 <= 32 and 1 <= v6 <= 128 else None
    # A lone length is unambiguous by size: nobody aggregates IPv6 wider than /32.
    (n,) = numbers
    if 1 <= n <= 32:
        return n, None
    if 33 <= n <= 128:
        return None, n
    return None


# --- bucket keys -----------------------------------------------------------------------------


def normalize_domain(domain: str) -> str:
    """Lower-case, drop a trailing dot, and turn IDN U-labels into their A-label form."""
    domain = domain.strip().rstrip(".").lower()
    if not domain.isascii():
        # not valid IDNA: the lower-cased form is still a stable key
        with contextlib.suppress(UnicodeError):
            domain = domain.encode("idna").decode("ascii")
    return domain


def normalize_address(address: str) -> str:
    """One spelling per mailbox, so variants of an address cannot each get a fresh bucket.

    RFC 5321 section 2.4 lets a server treat local parts case-sensitively, but for counting
    the safe direction is to aggregate: `Bob@X`, `bob@x` and `"bob"@x` share a bucket.
    """
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if not address:
        return "<>"  # the null sender is one identity, not a free pass
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower()
    if len(local) >= 2 and local[0] == local[-1] == '"':
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return f"{local.lower()}@{normalize_domain(domain)}"


def _client_key(value: str, prefix_v4: int | None, prefix_v6: int | None) -> str:
    ip = client_ip(value)
    if ip is None:
        return value.strip().lower()
    prefix = prefix_v4 if ip.version == 4 else prefix_v6
    if prefix is None:
        return str(ip)
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def _field_value(field: str, fields: Mapping[str, str], spec: LimitSpec) -> str:
    if field == "client_address":
        return _client_key(fields.get(field, ""), spec.client_prefix_v4, spec.client_prefix_v6)
    if field in ("sender", "recipient"):
        return normalize_address(fields.get(field, ""))
    if field in ("sender_domain", "recipient_domain"):
        domain = fields.get(field)
        if domain is None:  # derive it rather than let a missing field merge everyone
            domain = normalize_address(fields.get(field.removesuffix("_domain"), ""))
            domain = domain_of(domain) if "@" in domain else ""
        return normalize_domain(domain)
    if field == "sasl_username":
        return fields.get(field, "").strip().lower()
    return fields.get(field, "")  # listener: a configured name, verbatim


def bucket_key(spec: LimitSpec, fields: Mapping[str, str]) -> str:
    """The bucket that `fields` count against: normalised key values joined by "|"."""
    if not spec.key_fields:
        return "*"
    values = (_field_value(f, fields, spec) for f in spec.key_fields)
    return "|".join(v.replace("%", "%25").replace("|", "%7C") for v in values)


# --- the algorithm ---------------------------------------------------------------------------


def _decide(
    spec: LimitSpec, stored_tat: float | None, now: float, cost: int
) -> tuple[bool, float, bool]:
    """GCRA on microseconds: (allowed, TAT after this attempt, whether the TAT moved).

    TAT is the time at which the bucket is idle again. A unit passes when, after adding its
    interval T, the TAT is at most burst*T ahead of now. That is GCRA with tolerance
    (burst-1)*T: from an idle bucket exactly `burst` units pass (tolerance burst*T, the
    textbook slip, would let burst+1 through).
    """
    interval = spec.interval_us
    tat = now if stored_tat is None or stored_tat < now else stored_tat
    if cost > spec.burst:
        return False, tat, False
    new_tat = tat + cost * interval
    allowed = new_tat - now <= spec.burst * interval + _SLACK_US
    # leaky (Exim's default): a refused attempt costs nothing; strict: every attempt counts.
    moves = cost > 0 and (allowed or spec.mode == "strict")
    return allowed, new_tat if moves else tat, moves


def _remaining(spec: LimitSpec, tat: float, now: float) -> int:
    interval = spec.interval_us
    room = spec.burst * interval + _SLACK_US - max(tat - now, 0.0)
    return max(0, min(spec.burst, math.floor(room / interval)))


def _result(
    spec: LimitSpec, key: str, allowed: bool, tat: float, now: float, cost: int
) -> LimitResult:
    if allowed:
        retry = 0.0
    elif cost > spec.burst:
        retry = math.inf
    else:
        retry = max(0.0, tat + cost * spec.interval_us - spec.burst * spec.interval_us - now) / 1e6
    return LimitResult(allowed, retry, _remaining(spec, tat, now), key)


class LocalBuckets:
    """Buckets in this process's memory, keyed by limit name and bucket key."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, prune_every: float = 60.0):
        self._clock = clock
        self._tats: dict[str, dict[str, float]] = {}
        self._prune_every_us = prune_every * 1e6
        self._next_prune = -math.inf

    def __len__(self) -> int:
        return sum(len(b) for b in self._tats.values())

    def check(
        self, spec: LimitSpec, key: str, cost: int = 1, *, update: bool = True
    ) -> LimitResult:
        """Count `cost` units against bucket `key` of `spec`; `update=False` only looks."""
        if cost < 0:
            raise ValueError(f"cost must not be negative, got {cost}")
        now = self._clock() * 1e6
        if now >= self._next_prune:
            self._prune(now)
        buckets = self._tats.setdefault(spec.name, {})
        allowed, tat, moved = _decide(spec, buckets.get(key), now, cost)
        if update and moved:
            buckets[key] = tat
        return _result(spec, key, allowed, tat, now, cost)

    def _prune(self, now: float) -> None:
        # A TAT in the past is an idle bucket, the same as no entry: forgetting it keeps
        # memory proportional to the clients active within one burst window.
        for name in list(self._tats):
            buckets = self._tats[name]
            for key in [k for k, tat in buckets.items() if tat <= now]:
                del buckets[key]
            if not buckets:
                del self._tats[name]
        self._next_prune = now + self._prune_every_us

    def drop(self, name: str) -> None:
        self._tats.pop(name, None)

    def clear(self) -> None:
        self._tats.clear()

    def states(
        self,
        specs: Mapping[str, LimitSpec],
        name: str | None = None,
        key: str | None = None,
        backend: str = "local",
    ) -> list[BucketState]:
        now = self._clock() * 1e6
        out = []
        for limit, buckets in self._tats.items():
            spec = specs.get(limit)
            if spec is None or name not in (None, limit):
                continue
            for bucket, tat in buckets.items():
                if tat > now and (key is None or fnmatch.fnmatchcase(bucket, key)):
                    out.append(
                        BucketState(
                            limit, bucket, backend, _remaining(spec, tat, now), (tat - now) / 1e6
                        )
                    )
        return out


# One round trip, atomic: read TAT, decide, write. ARGV: interval_us, burst, cost, update,
# strict, now_us ("" = this server's TIME, so relays with skewed clocks still agree), slack_us.
# Values go through string.format: Lua would print large numbers with too few digits.
_GCRA_LUA = """
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now
if ARGV[6] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[6])
end
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allowed = 0
local moved = false
if cost <= burst then
  local new_tat = tat + cost * interval
  if new_tat - now <= burst * interval + tonumber(ARGV[7]) then allowed = 1 end
  if cost > 0 and (allowed == 1 or ARGV[5] == '1') then
    tat = new_tat
    moved = true
  end
end
if moved and ARGV[4] == '1' then
  local ttl = math.max(1, math.ceil((tat - now) / 1000))
  redis.call('SET', KEYS[1], string.format('%.17g', tat), 'PX', string.format('%d', ttl))
end
return {allowed, string.format('%.17g', tat), string.format('%.17g', now)}
"""


def redis_client(url: str, *, timeout: float = 0.25) -> aioredis.Redis:
    """A client that fails fast: a slow or dead Redis must not stall every SMTP reply."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # one immediate retry covers a pooled connection the server closed while idle
        retry=Retry(NoBackoff(), 1),
    )


class RedisBuckets:
    """Buckets shared by every relay using one Redis, at `<prefix>rl:<limit>:<key>`."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "smtprelay:"):
        self._client = client
        self._prefix = prefix
        self._script = client.register_script(_GCRA_LUA)

    def redis_key(self, limit: str, key: str) -> str:
        return f"{self._prefix}rl:{limit}:{key}"

    async def check(
        self,
        spec: LimitSpec,
        key: str,
        cost: int = 1,
        *,
        update: bool = True,
        now: float | None = None,
    ) -> LimitResult:
        """As `LocalBuckets.check`; `now` (seconds) overrides the Redis server's clock."""
        if cost < 0:
            raise ValueError(f"cost must not be negative, got {cost}")
        args = (
            repr(spec.interval_us),
            spec.burst,
            cost,
            int(update),
            int(spec.mode == "strict"),
            "" if now is None else repr(now * 1e6),
            repr(_SLACK_US),
        )
        allowed, tat, server_now = await self._script(
            keys=[self.redis_key(spec.name, key)], args=args
        )
        return _result(spec, key, bool(allowed), float(tat), float(server_now), cost)

    async def _scan(self, name: str | None) -> list[bytes]:
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", f"{self._prefix}rl:") + (
            f"{name}:*" if name else "*"
        )
        return [k async for k in self._client.scan_iter(match=pattern, count=500)]

    async def drop(self, name: str) -> int:
        """Delete every bucket of limit `name`; returns how many were deleted."""
        keys = await self._scan(name)
        for i in range(0, len(keys), 500):
            await self._client.unlink(*keys[i : i + 500])
        return len(keys)

    async def states(
        self, specs: Mapping[str, LimitSpec], name: str | None = None, key: str | None = None
    ) -> list[BucketState]:
        keys = await self._scan(name)
        seconds, micros = await self._client.time()
        now = seconds * 1e6 + micros
        head = len(f"{self._prefix}rl:")
        out = []
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            for raw, value in zip(chunk, await self._client.mget(chunk), strict=True):
                limit, _, bucket = raw.decode("utf-8", "replace")[head:].partition(":")
                spec = specs.get(limit)
                if value is None or spec is None or spec.backend != "redis":
                    continue
                tat = float(value)
                if tat > now and (key is None or fnmatch.fnmatchcase(bucket, key)):
                    out.append(
                        BucketState(
                            limit, bucket, "redis", _remaining(spec, tat, now), (tat - now) / 1e6
                        )
                    )
        return out


# --- the limiter -----------------------------------------------------------------------------


class Limiter:
    """The configured limits, each checked against its own backend.

    When Redis fails, `on_backend_error` decides: "local" counts in this process's memory
    until Redis answers again, "tempfail" refuses with `backend_error` set, "allow" passes.
    A failed Redis is probed again at most every `redis_retry_interval` seconds, so a dead
    Redis does not add a timeout to every message.
    """

    def __init__(
        self,
        specs: Iterable[LimitSpec],
        *,
        clock: Callable[[], float] = time.monotonic,
        redis: aioredis.Redis | None = None,
        key_prefix: str = "smtprelay:",
        on_backend_error: BackendErrorPolicy = "local",
        redis_timeout: float = 0.25,
        redis_retry_interval: float = 5.0,
        shared: Link | None = None,
        conditions: Conditions | None = None,
    ):
        if on_backend_error not in ("local", "tempfail", "allow"):
            raise ValueError(
                f"on_backend_error: expected local | tempfail | allow, got {on_backend_error!r}"
            )
        self._clock = clock
        self._redis = RedisBuckets(redis, prefix=key_prefix) if redis is not None else None
        self._specs = self._index(specs)
        self._local = LocalBuckets(clock)
        self._fallback = LocalBuckets(clock)
        # With workers, the in-memory buckets live in the supervisor's hub, so that they
        # count every worker's traffic (relay/workers/hub.py).
        self._shared = shared
        self._on_backend_error = on_backend_error
        self._redis_timeout = redis_timeout
        self._retry_interval = redis_retry_interval
        self._redis_down = False
        self._redis_failure = ""
        self._retry_at = 0.0
        # Redis down is a condition: logged when it starts and ends, in /readyz (refusing
        # mail only with on_backend_error = "tempfail") and in the metrics.
        self.conditions = conditions or Conditions()
        self.fallbacks = 0  # checks answered without Redis because it failed
        self.outages = 0  # times Redis went from answering to failing
        self.redis_errors = 0  # Redis calls that failed (probes included)

    def _index(self, specs: Iterable[LimitSpec]) -> dict[str, LimitSpec]:
        indexed: dict[str, LimitSpec] = {}
        for spec in specs:
            if spec.name in indexed:
                raise ValueError(f"limit.{spec.name}: defined twice")
            if spec.backend == "redis" and self._redis is None:
                raise ValueError(f"limit.{spec.name}: backend = redis, but no Redis is configured")
            indexed[spec.name] = spec
        return indexed

    @property
    def specs(self) -> Mapping[str, LimitSpec]:
        return dict(self._specs)

    @property
    def redis_available(self) -> bool:
        """False from a failed Redis call until a later probe succeeds."""
        return self._redis is not None and not self._redis_down

    async def check(
        self, spec_name: str, fields: Mapping[str, str], cost: int = 1, *, update: bool = True
    ) -> LimitResult:
        """Count `cost` units (messages, recipients, bytes, connections) for `fields`."""
        spec = self._specs[spec_name]
        recipient = fields.get("recipient")
        if recipient and spec.is_exempt(recipient):
            return LimitResult(True, 0.0, spec.burst, exempt=True)
        key = bucket_key(spec, fields)
        if spec.backend == "local" or self._redis is None:
            if self._shared is not None:
                return await self._shared.check("local", spec, key, cost, update)
            return self._local.check(spec, key, cost, update=update)
        return await self._check_redis(self._redis, spec, key, cost, update)

    async def _check_redis(
        self, redis: RedisBuckets, spec: LimitSpec, key: str, cost: int, update: bool
    ) -> LimitResult:
        if self._redis_down:
            now = self._clock()
            if now < self._retry_at:
                return await self._without_redis(spec, key, cost, update)
            # claim the probe: concurrent checks keep using the fallback meanwhile
            self._retry_at = now + self._retry_interval
        try:
            async with asyncio.timeout(self._redis_timeout):
                result = await redis.check(spec, key, cost, update=update)
        except (RedisError, OSError, TimeoutError) as exc:
            self.redis_errors += 1
            self._retry_at = self._clock() + self._retry_interval
            if not self._redis_down:
                self._redis_down = True
                self.outages += 1
                self._redis_failure = f"rate-limit Redis failed ({type(exc).__name__}: {exc})"
            return await self._without_redis(spec, key, cost, update)
        if self._redis_down:
            self._redis_down = False
            self._fallback.clear()  # Redis holds the shared truth again
            if self._shared is not None:
                self._shared.send("clear", store="fallback")
            self.conditions.cleared(REDIS_DOWN)
        return result

    async def _without_redis(
        self, spec: LimitSpec, key: str, cost: int, update: bool
    ) -> LimitResult:
        self.fallbacks += 1
        self.conditions.failing(
            REDIS_DOWN, self._redis_failure, unit="checks without Redis",
            consequence=f"on_backend_error={self._on_backend_error} until it answers, "
            f"probing every {self._retry_interval:g}s",
            blocks_mail=self._on_backend_error == "tempfail")
        if self._on_backend_error == "local":
            if self._shared is not None:
                return await self._shared.check("fallback", spec, key, cost, update)
            return self._fallback.check(spec, key, cost, update=update)
        if self._on_backend_error == "allow":
            return LimitResult(True, 0.0, 0, key, backend_error=True)
        retry = max(0.0, self._retry_at - self._clock())
        return LimitResult(False, retry, 0, key, backend_error=True)

    async def reload(self, new_specs: Iterable[LimitSpec]) -> None:
        """Swap in new specs; buckets survive only where their spec is unchanged."""
        old = self._specs
        self._specs = self._index(new_specs)
        changed = [name for name, spec in old.items() if self._specs.get(name) != spec]
        for name in changed:
            self._local.drop(name)
            self._fallback.drop(name)
        if self._redis is None or self._redis_down:
            return  # stale Redis buckets then simply expire (PX) within one burst window
        for name in changed:
            if old[name].backend != "redis":
                continue
            try:
                await self._redis.drop(name)
            except (RedisError, OSError) as exc:
                log.warning(
                    "limit.%s changed, but its Redis buckets could not be reset: %s", name, exc
                )

    async def show(self, name: str | None = None, key: str | None = None) -> list[BucketState]:
        """Non-idle buckets, optionally of one limit and matching a key glob."""
        if self._shared is not None:
            specs = self._specs.values()
            states = await self._shared.states("local", specs, name, key)
            states += await self._shared.states("fallback", specs, name, key)
        else:
            states = self._local.states(self._specs, name, key)
            states += self._fallback.states(self._specs, name, key, backend="fallback")
        wants_redis = any(
            s.backend == "redis" and name in (None, s.name) for s in self._specs.values()
        )
        if self._redis is not None and wants_redis:
            states += await self._redis.states(self._specs, name, key)
        return sorted(states, key=lambda s: (s.limit, s.key, s.backend))
