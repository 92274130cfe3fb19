"""Metrics: the exposition text after real calls, and the HTTP endpoints on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.ops.metrics import MAX_REQUEST, Metrics, readiness, start_http
from relay.queue.spool import Envelope, Outcome, Spool


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


def looks_like_address(text: str) -> bool:
    if "@" in text:
        return True
    for candidate in (text, text.rsplit(":", 1)[0], text.strip("[]")):
        try:
            ipaddress.ip_address(candidate)
            return True
        except ValueError:
            pass
    return False


@dataclass
class FakePool:
    idle: int
    busy: int


def test_counters_and_gauges_show_what_was_recorded() -> None:
    m = Metrics(clock=lambda: 1000.0)
    m.connection_opened("smtp")
    m.connection_opened("smtp")
    m.connection_closed("smtp")
    m.message_received("smtp")
    m.decision("rcpt", "app-servers", "accept")
    m.decision("rcpt", "app-servers", "accept")
    m.rejected("rcpt", 554)
    m.ratelimit_exceeded("per-app")
    m.ratelimit_fallback()
    m.spf_result("pass")
    m.dkim_result("none")
    m.delivered("default", "sent", 0.25)
    m.delivered("default", "deferred", 12.0)
    m.connect_failed("bulk")
    m.upstream_up("default", True)
    m.upstream_up("bulk", False)
    m.pools({"default": [FakePool(2, 1), FakePool(1, 0)]})
    m.reload_failed()

    assert value(m, "relay_smtpd_connections_total", listener="smtp") == 2
    assert value(m, "relay_smtpd_active_connections", listener="smtp") == 1
    assert value(m, "relay_messages_received_total", listener="smtp") == 1
    assert value(m, "relay_policy_decisions_total",
                 stage="rcpt", rule="app-servers", action="accept") == 2
    assert value(m, "relay_smtpd_rejects_total", stage="rcpt", code="554") == 1
    assert value(m, "relay_ratelimit_exceeded_total", limit="per-app") == 1
    assert value(m, "relay_ratelimit_backend_fallbacks_total") == 1
    assert value(m, "relay_spf_results_total", result="pass") == 1
    assert value(m, "relay_dkim_results_total", result="none") == 1
    assert value(m, "relay_deliveries_total", upstream="default", status="sent") == 1
    assert value(m, "relay_delivery_duration_seconds_count", upstream="default") == 2
    assert value(m, "relay_delivery_duration_seconds_sum", upstream="default") == 12.25
    assert value(m, "relay_delivery_duration_seconds_bucket", upstream="default", le="1.0") == 1
    assert value(m, "relay_upstream_connect_failures_total", upstream="bulk") == 1
    assert value(m, "relay_upstream_up", upstream="default") == 1
    assert value(m, "relay_upstream_up", upstream="bulk") == 0
    assert value(m, "relay_upstream_pool_connections", upstream="default", state="idle") == 3
    assert value(m, "relay_upstream_pool_connections", upstream="default", state="busy") == 1
    assert value(m, "relay_config_last_reload_successful") == 0
    assert value(m, "relay_config_reload_failures_total") == 1
    # The start-up load counts as the last success.
    assert value(m, "relay_config_last_reload_success_timestamp_seconds") == 1000.0
    m.reload_succeeded()
    assert value(m, "relay_config_last_reload_successful") == 1


def test_address_like_label_values_never_reach_the_exposition() -> None:
    m = Metrics()
    m.connection_opened("10.20.0.5")
    m.decision("rcpt", "user@example.org", "reject")
    m.upstream_up("192.0.2.25:587", False)
    m.delivered("[2001:db8::1]:25", "sent", 0.1)
    m.pool("::1", 1, 0)
    for (_, labels), _v in samples(m).items():
        for _name, label_value in labels:
            assert not looks_like_address(label_value), label_value
    assert value(m, "relay_smtpd_connections_total", listener="other") == 1


def test_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.message_received("smtp")
    assert ("relay_messages_received_total", (("listener", "smtp"),)) not in samples(b)


async def test_queue_gauges_come_from_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    await spool.open()
    try:
        env = Envelope("a@example.com", ("b@example.org",), "127.0.0.1", "app", "smtp",
                       received_at=900.0)
        await spool.store("NEW1", env, b"Subject: x\r\n\r\nx\r\n")
        await spool.store("OLD1", replace(env, received_at=400.0), b"x")
        await spool.record_attempt("OLD1", [Outcome(0, "pending", "451 4.3.0 later")],
                                   2000.0, "451 4.3.0 later")
        await spool.store("HELD", replace(env, hold=True), b"x")
        m = Metrics(clock=lambda: 1000.0)
        await m.refresh(spool)
    finally:
        await spool.close()
    assert value(m, "relay_queue_messages", state="active") == 1
    assert value(m, "relay_queue_messages", state="deferred") == 1
    assert value(m, "relay_queue_messages", state="hold") == 1
    assert value(m, "relay_queue_messages", state="failed") == 0
    assert value(m, "relay_queue_oldest_message_age_seconds", state="deferred") == 600
    assert value(m, "relay_queue_oldest_message_age_seconds", state="active") == 100
    assert value(m, "relay_queue_oldest_message_age_seconds", state="failed") == 0


# -- HTTP ------------------------------------------------------------------------------


async def http(port: int, raw: bytes) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[int, Metrics, dict[str, bool], list[int]]]:
    metrics = Metrics()
    state = {"listeners": False, "spool": True, "policy": True}
    refreshed: list[int] = []

    async def refresh() -> None:
        refreshed.append(1)
        metrics.upstream_up("default", True)

    ready = readiness({
        "listeners": lambda: state["listeners"],
        "spool": lambda: state["spool"],
        "policy": lambda: state["policy"],
    })
    server = await start_http(metrics, "127.0.0.1", 0, ready, refresh)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, metrics, state, refreshed
    finally:
        server.close()
        await server.wait_closed()


async def test_metrics_endpoint_serves_the_registry_after_refresh(
    endpoint: tuple[int, Metrics, dict[str, bool], list[int]],
) -> None:
    port, metrics, _, refreshed = endpoint
    metrics.message_received("smtp")
    status, body = await http(port, get("/metrics"))
    assert status == 200
    assert refreshed == [1]
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert families["relay_messages_received"].samples[0].value == 1
    assert families["relay_upstream_up"].samples[0].value == 1


async def test_healthz_answers_ok(
    endpoint: tuple[int, Metrics, dict[str, bool], list[int]],
) -> None:
    assert await http(endpoint[0], get("/healthz")) == (200, "ok\n")


async def test_readyz_is_503_with_details_until_every_check_passes(
    endpoint: tuple[int, Metrics, dict[str, bool], list[int]],
) -> None:
    port, _, state, _ = endpoint
    status, body = await http(port, get("/readyz"))
    assert status == 503
    assert "listeners: failing" in body and "spool: ok" in body
    state["listeners"] = True
    status, body = await http(port, get("/readyz"))
    assert status == 200
    assert body.startswith("ready\n")


async def test_unknown_paths_and_methods_are_refused(
    endpoint: tuple[int, Metrics, dict[str, bool], list[int]],
) -> None:
    port = endpoint[0]
    assert (await http(port, get("/admin")))[0] == 404
    assert (await http(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0] == 405
    assert (await http(port, b"garbage\r\n\r\n"))[0] == 400


async def test_oversized_request_is_rejected_with_431(
    endpoint: tuple[int, Metrics, dict[str, bool], list[int]],
) -> None:
    port = endpoint[0]
    huge = b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * (MAX_REQUEST * 2) + b"\r\n\r\n"
    status, _ = await http(port, huge)
    assert status == 431
    # The server is still there for the next client.
    assert (await http(port, get("/healthz")))[0] == 200
