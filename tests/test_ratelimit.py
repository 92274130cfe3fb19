"""Rate-limit buckets: exact burst boundaries, evasion, Redis sharing and fallback, reload."""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redisserver import RedisServer

from relay.checks.ratelimit import (
    Limiter,
    LimitSpec,
    LocalBuckets,
    RedisBuckets,
    bucket_key,
    read_limit,
    redis_client,
)
from relay.schema import Errors, Table

MICRO = 1e-6


class Clock:
    """A clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def parse_limit(name: str, table: dict[str, Any]) -> tuple[LimitSpec | None, list[str]]:
    """A `[limit.NAME]` table read as the policy loader reads it, and its errors."""
    errors = Errors()
    parsed = read_limit(name, Table(table, f"limit.{name}", "policy.toml", errors))
    return parsed, [m.removeprefix("policy.toml: ") for m in errors.messages]


def spec(name: str = "lim", **table: Any) -> LimitSpec:
    table.setdefault("key", ["client_address"])
    table.setdefault("rate", "600/1h")  # one unit every 6 s
    table.setdefault("burst", 5)
    parsed, errors = parse_limit(name, table)
    assert errors == []
    assert parsed is not None
    return parsed


CLIENT = {"client_address": "192.0.2.10"}


# --- exact burst boundaries ------------------------------------------------------------------


@pytest.mark.parametrize("count", ["message", "connection", "recipient"])
def test_burst_n_passes_at_once_then_one_per_interval(count: str) -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    s = spec(count=count, burst=5)
    key = bucket_key(s, CLIENT)
    assert s.emission_interval == 6.0

    results = [buckets.check(s, key) for _ in range(5)]
    assert [r.allowed for r in results] == [True] * 5
    assert [r.remaining for r in results] == [4, 3, 2, 1, 0]
    refused = buckets.check(s, key)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(6.0)

    clock.advance(6.0 - 1e-3)
    assert not buckets.check(s, key).allowed
    clock.advance(1e-3 - 10 * MICRO)
    assert not buckets.check(s, key).allowed
    clock.advance(10 * MICRO)
    assert buckets.check(s, key).allowed  # exactly one interval after the burst
    assert not buckets.check(s, key).allowed


def test_burst_boundary_with_an_interval_that_is_not_a_round_number() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    s = spec(rate="7/1h", burst=3)  # T = 514.2857... s
    key = bucket_key(s, CLIENT)
    assert [buckets.check(s, key).allowed for _ in range(4)] == [True, True, True, False]
    clock.advance(s.emission_interval - 10 * MICRO)
    assert not buckets.check(s, key).allowed
    clock.advance(10 * MICRO)
    assert buckets.check(s, key).allowed


def test_a_message_with_k_recipients_consumes_k() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    s = spec(count="recipient", burst=10)
    key = bucket_key(s, CLIENT)
    assert buckets.check(s, key, 4).remaining == 6
    assert buckets.check(s, key, 6).allowed
    refused = buckets.check(s, key, 3)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(3 * 6.0)
    clock.advance(3 * 6.0 - 10 * MICRO)
    assert not buckets.check(s, key, 3).allowed
    clock.advance(10 * MICRO)
    assert buckets.check(s, key, 3).allowed


def test_byte_burst_is_in_bytes_and_a_message_over_it_never_passes() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    s = spec(count="byte", rate="1000/10s", burst=1000)  # 10 ms per byte
    key = bucket_key(s, CLIENT)
    assert buckets.check(s, key, 400).allowed
    assert buckets.check(s, key, 400).allowed
    assert buckets.check(s, key, 200).allowed
    assert not buckets.check(s, key, 1).allowed
    clock.advance(300 * 0.01 - 10 * MICRO)
    assert not buckets.check(s, key, 300).allowed
    clock.advance(10 * MICRO)
    assert buckets.check(s, key, 300).allowed

    clock.advance(3600)  # idle: the whole burst is back, and still too small
    too_big = buckets.check(s, key, 1001)
    assert not too_big.allowed
    assert too_big.retry_after == math.inf
    assert buckets.check(s, key, 1000).allowed


def test_peek_does_not_consume() -> None:
    buckets = LocalBuckets(Clock())
    s = spec(burst=2)
    key = bucket_key(s, CLIENT)
    for _ in range(10):
        assert buckets.check(s, key, update=False).remaining == 1
    assert [buckets.check(s, key).allowed for _ in range(3)] == [True, True, False]
    assert not buckets.check(s, key, update=False).allowed


# --- leaky vs strict -------------------------------------------------------------------------


def test_hammering_while_refused_costs_nothing_in_leaky_mode() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    s = spec(mode="leaky", burst=3)
    key = bucket_key(s, CLIENT)
    assert all(buckets.check(s, key).allowed for _ in range(3))
    for _ in range(50):
        assert not buckets.check(s, key).allowed
    clock.advance(6.0)
    assert buckets.check(s, key).allowed


def test_hammering_while_refused_digs_deeper_in_strict_mode() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    s = spec(mode="strict", burst=3)
    key = bucket_key(s, CLIENT)
    assert all(buckets.check(s, key).allowed for _ in range(3))
    refused = [buckets.check(s, key) for _ in range(10)]
    assert not any(r.allowed for r in refused)
    assert refused[-1].retry_after == pytest.approx(11 * 6.0)  # 10 refusals counted
    clock.advance(6.0)
    assert not buckets.check(s, key).allowed  # this attempt counts too: 12 intervals now
    clock.advance(11 * 6.0 - 10 * MICRO)
    assert not buckets.check(s, key, update=False).allowed
    clock.advance(10 * MICRO)
    assert buckets.check(s, key).allowed


# --- evasion: the same client or sender written differently counts once ---------------------


def test_case_and_quoting_variants_of_an_address_share_a_bucket() -> None:
    s = spec(key=["sender", "recipient_domain"])
    keys = {
        bucket_key(s, {"sender": v, "recipient": r})
        for v, r in [
            ("Alice@Example.COM", "x@Dest.TEST"),
            ("alice@example.com", "y@dest.test."),
            ("<ALICE@example.com>", "z@DEST.test"),
            ('"alice"@example.com', "z@dest.test"),
        ]
    }
    assert keys == {"alice@example.com|dest.test"}
    assert bucket_key(s, {"sender": "", "recipient": "a@b"}) == "<>|b"


def test_ipv6_addresses_in_one_slash64_share_a_bucket() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    s = spec(key=["client_address/24/64"], burst=3)
    rotating = ["2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:DB8:1:2:abcd:1:2:3"]
    keys = {bucket_key(s, {"client_address": a}) for a in rotating}
    assert keys == {"2001:db8:1:2::/64"}
    assert [buckets.check(s, bucket_key(s, {"client_address": a})).allowed for a in rotating] == [
        True,
        True,
        True,
    ]
    assert not buckets.check(s, bucket_key(s, {"client_address": "2001:db8:1:2::77"})).allowed
    assert buckets.check(s, bucket_key(s, {"client_address": "2001:db8:1:3::1"})).allowed
    assert bucket_key(s, {"client_address": "::ffff:192.0.2.77"}) == "192.0.2.0/24"
    assert bucket_key(spec(key=["client_address/64"]), {"client_address": "192.0.2.7"}) == (
        "192.0.2.7"
    )


async def test_many_recipients_in_one_message_count_per_recipient() -> None:
    limiter = Limiter(
        [spec(count="recipient", burst=10, exempt_recipients=["postmaster"])], clock=Clock()
    )
    fields = dict(CLIENT, sender="app@example.com")
    allowed = [
        (await limiter.check("lim", dict(fields, recipient=f"user{i}@dest.test"))).allowed
        for i in range(15)
    ]
    assert allowed == [True] * 10 + [False] * 5
    exempt = await limiter.check("lim", dict(fields, recipient="PostMaster@dest.test"))
    assert exempt.allowed and exempt.exempt


# --- memory ----------------------------------------------------------------------------------


def test_idle_buckets_are_pruned() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock, prune_every=60)
    s = spec(burst=5)
    for i in range(1000):
        buckets.check(s, bucket_key(s, {"client_address": f"10.0.{i // 256}.{i % 256}"}))
    assert len(buckets) == 1000
    clock.advance(61)  # past every TAT (6 s) and the prune interval
    buckets.check(s, "one more")
    assert len(buckets) == 1


# --- reload ----------------------------------------------------------------------------------


async def test_reload_keeps_unchanged_buckets_and_resets_changed_ones() -> None:
    clock = Clock()
    same, changed, removed = spec("same", burst=2), spec("changed", burst=2), spec("gone", burst=2)
    limiter = Limiter([same, changed, removed], clock=clock)
    for name in ("same", "changed", "gone"):
        for _ in range(2):
            assert (await limiter.check(name, CLIENT)).allowed
        assert not (await limiter.check(name, CLIENT)).allowed

    await limiter.reload([spec("same", burst=2), spec("changed", burst=3)])

    assert not (await limiter.check("same", CLIENT)).allowed
    assert [(await limiter.check("changed", CLIENT)).allowed for _ in range(4)] == [
        True,
        True,
        True,
        False,
    ]
    assert "gone" not in limiter.specs
    assert {s.limit for s in await limiter.show()} == {"same", "changed"}


async def test_show_lists_busy_buckets() -> None:
    clock = Clock()
    limiter = Limiter([spec(burst=5)], clock=clock)
    await limiter.check("lim", CLIENT, 2)
    await limiter.check("lim", {"client_address": "198.51.100.1"})
    states = await limiter.show("lim", "192.0.2.*")
    assert [(s.key, s.backend, s.remaining) for s in states] == [("192.0.2.10", "local", 3)]
    assert states[0].full_in == pytest.approx(12.0)


# --- parse_limit -----------------------------------------------------------------------------


def errors_of(table: dict[str, Any]) -> list[str]:
    base: dict[str, Any] = {"key": ["client_address"], "rate": "600/1h", "burst": 10}
    parsed, errors = parse_limit("per_app", base | table)
    assert parsed is None
    return errors


def test_parse_limit_reads_a_full_table() -> None:
    parsed, errors = parse_limit(
        "per_app",
        {
            "key": ["client_address/24/64", "Sender_domain".lower()],
            "rate": "2k / 1d",
            "burst": 200,
            "count": "byte",
            "exempt_recipients": ["PostMaster", "Abuse@Example.com"],
            "backend": "redis",
            "mode": "strict",
        },
    )
    assert errors == []
    assert parsed == LimitSpec(
        name="per_app",
        key_fields=("client_address", "sender_domain"),
        client_prefix_v4=24,
        client_prefix_v6=64,
        rate_count=2048,
        rate_period_seconds=86400,
        burst=200,
        count="byte",
        exempt_recipients=("postmaster", "abuse@example.com"),
        backend="redis",
        mode="strict",
    )
    assert spec(rate="600/1h") == spec(rate="600/h")
    assert spec(rate="600/1h") != spec(rate="600/2h")


def test_parse_limit_bad_rate() -> None:
    assert errors_of({"rate": "600 per hour"}) == [
        'limit.per_app.rate: expected a rate "N/period" of at least 1 (period units s, m, h, d, '
        "e.g. \"600/1h\"), got '600 per hour'"
    ]
    assert errors_of({"rate": "0/1h"}) == [
        'limit.per_app.rate: expected a rate "N/period" of at least 1 (period units s, m, h, d, '
        "e.g. \"600/1h\"), got '0/1h'"
    ]


def test_parse_limit_bad_count() -> None:
    assert errors_of({"count": "messages"}) == [
        "limit.per_app.count: must be one of message, recipient, byte, connection, "
        "got 'messages'"
    ]


def test_parse_limit_unknown_key_field() -> None:
    assert errors_of({"key": ["client_ip", "sender/24"]}) == [
        'limit.per_app.key: unknown field "client_ip" (expected one of client_address, '
        "sasl_username, sender, sender_domain, recipient, recipient_domain, listener)",
        'limit.per_app.key: "sender/24": only client_address takes a prefix length',
    ]
    assert errors_of({"key": ["client_address/129"]})[0].startswith(
        'limit.per_app.key: "client_address/129": expected client_address/V4'
    )


def test_parse_limit_unknown_table_key() -> None:
    assert errors_of({"brust": 5}) == [
        "limit.per_app.brust: unknown key"
    ]


def test_parse_limit_burst_below_one() -> None:
    assert errors_of({"burst": 0}) == ["limit.per_app.burst: must be at least 1, got 0"]
    assert errors_of({"burst": "10"}) == ["limit.per_app.burst: expected an integer, got '10'"]


def test_parse_limit_reports_every_error_at_once() -> None:
    parsed, errors = parse_limit("bad name", {"rate": "fast", "burst": -1, "mode": "lenient"})
    assert parsed is None
    assert [e.split(":")[0] for e in errors] == [
        f"limit.bad name.{key}" for key in ("name", "key", "rate", "burst", "mode")
    ]


# --- Redis -----------------------------------------------------------------------------------


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def clients(redis_server: RedisServer) -> AsyncIterator[list[aioredis.Redis]]:
    """Two independent clients, as two relays behind one load balancer would have."""
    pair = [redis_client(redis_server.url, timeout=0.5) for _ in range(2)]
    yield pair
    for c in pair:
        await c.aclose()


def shared_spec(**table: Any) -> LimitSpec:
    table.setdefault("rate", "1/1h")
    return spec(backend="redis", **table)


async def test_redis_boundary_matches_the_local_algorithm(clients: list[aioredis.Redis]) -> None:
    buckets = RedisBuckets(clients[0], prefix="t:")
    s = shared_spec(rate="600/1h", burst=5)
    t0 = 1_700_000_000.0  # passed explicitly: the exact boundary needs a controlled clock
    assert [(await buckets.check(s, "k", now=t0)).allowed for _ in range(6)] == [True] * 5 + [False]
    assert not (await buckets.check(s, "k", now=t0 + 6.0 - 10 * MICRO)).allowed
    assert (await buckets.check(s, "k", now=t0 + 6.0)).allowed
    assert await clients[0].pttl("t:rl:lim:k") > 0


async def test_two_relays_sharing_redis_let_exactly_the_burst_through(
    clients: list[aioredis.Redis],
) -> None:
    s = shared_spec(burst=7)
    relays = [Limiter([s], clock=Clock(), redis=c, key_prefix="smtprelay:") for c in clients]
    sequential = [(await relays[i % 2].check("lim", CLIENT)).allowed for i in range(10)]
    assert sequential == [True] * 7 + [False] * 3

    other = {"client_address": "198.51.100.7"}
    concurrent = await asyncio.gather(*(relays[i % 2].check("lim", other) for i in range(30)))
    assert sum(r.allowed for r in concurrent) == 7
    assert all(r.allowed or r.retry_after > 0 for r in concurrent)
    assert {(b.key, b.backend) for b in await relays[0].show("lim")} == {
        ("192.0.2.10", "redis"),
        ("198.51.100.7", "redis"),
    }


async def test_redis_down_falls_back_to_local_and_recovers(
    redis_server: RedisServer, clients: list[aioredis.Redis], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.conditions")
    clocks = [Clock(), Clock()]
    s = shared_spec(burst=3)
    relays = [
        Limiter([s], clock=clk, redis=c, on_backend_error="local", redis_retry_interval=5.0)
        for clk, c in zip(clocks, clients, strict=True)
    ]
    assert (await relays[0].check("lim", CLIENT)).allowed

    redis_server.stop()
    # Each relay now counts on its own, from a fresh local bucket.
    local = [(await relays[0].check("lim", CLIENT)).allowed for _ in range(5)]
    assert local == [True] * 3 + [False] * 2
    assert not relays[0].redis_available
    assert relays[0].fallbacks == 5
    assert relays[0].outages == 1
    assert relays[0].redis_errors == 1  # not retried on every check
    clocks[0].advance(5.0)
    await relays[0].check("lim", CLIENT)
    assert relays[0].redis_errors == 2  # one probe per interval
    warnings = [r.getMessage() for r in caplog.records if r.name == "relay.conditions"]
    assert len(warnings) == 1
    assert warnings[0].startswith("redis_down started: rate-limit Redis failed (")

    redis_server.start()
    for _ in range(100):  # bounded: the probe needs the server to accept connections
        clocks[0].advance(5.0)
        await relays[0].check("lim", {"client_address": "203.0.113.1"})
        if relays[0].redis_available:
            break
        await asyncio.sleep(0.05)
    assert relays[0].redis_available
    messages = [r.getMessage() for r in caplog.records if r.name == "relay.conditions"]
    assert len(messages) == 2
    assert re.fullmatch(rf"redis_down ended after \d+s and {relays[0].fallbacks} checks "
                        "without Redis", messages[1])

    # Shared again: the restarted (empty) server gives both relays one burst between them.
    clocks[1].advance(5.0)
    together = [(await relays[i % 2].check("lim", CLIENT)).allowed for i in range(6)]
    assert together == [True] * 3 + [False] * 3
    assert relays[1].redis_available


@pytest.mark.parametrize(("policy", "allowed"), [("tempfail", False), ("allow", True)])
async def test_redis_down_with_tempfail_or_allow(
    redis_server: RedisServer, clients: list[aioredis.Redis], policy: Any, allowed: bool
) -> None:
    clock = Clock()
    limiter = Limiter(
        [shared_spec(burst=1)], clock=clock, redis=clients[0], on_backend_error=policy
    )
    assert (await limiter.check("lim", CLIENT)).allowed
    redis_server.stop()
    for _ in range(3):
        result = await limiter.check("lim", CLIENT)
        assert result.backend_error
        assert result.allowed is allowed
    assert limiter.fallbacks == 3
    assert limiter.redis_errors == 1


async def test_redis_timeout_is_bounded(clients: list[aioredis.Redis]) -> None:
    # A Redis that accepts connections but never answers: a listening socket nobody reads.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    silent = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    limiter = Limiter(
        [shared_spec()], clock=Clock(), redis=silent, redis_timeout=0.2, on_backend_error="tempfail"
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await limiter.check("lim", CLIENT)
    assert result.backend_error and not result.allowed
    assert loop.time() - started < 2.0
    await silent.aclose()
    server.close()


async def test_reload_resets_changed_redis_buckets(clients: list[aioredis.Redis]) -> None:
    limiter = Limiter(
        [shared_spec(burst=1), shared_spec(name="other", burst=1)], clock=Clock(), redis=clients[0]
    )
    for name in ("lim", "other"):
        assert (await limiter.check(name, CLIENT)).allowed
        assert not (await limiter.check(name, CLIENT)).allowed
    await limiter.reload([shared_spec(burst=1), shared_spec(name="other", burst=2)])
    assert not (await limiter.check("lim", CLIENT)).allowed
    assert (await limiter.check("other", CLIENT)).allowed
    assert await clients[1].exists("smtprelay:rl:lim:192.0.2.10") == 1


@pytest.mark.parametrize(
    ("mode", "passes_after_one_interval"), [("leaky", True), ("strict", False)]
)
async def test_redis_leaky_and_strict(
    clients: list[aioredis.Redis], mode: str, passes_after_one_interval: bool
) -> None:
    buckets = RedisBuckets(clients[0], prefix="t:")
    s = shared_spec(rate="600/1h", burst=2, mode=mode)
    t0 = 1_700_000_000.0
    assert [(await buckets.check(s, "k", now=t0)).allowed for _ in range(2)] == [True, True]
    for _ in range(10):
        assert not (await buckets.check(s, "k", now=t0)).allowed
    peek = await buckets.check(s, "k", now=t0 + 6.0, update=False)
    assert peek.allowed is passes_after_one_interval
    assert (await buckets.check(s, "k", now=t0 + 6.0)).allowed is passes_after_one_interval
