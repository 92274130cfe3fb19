"""SPF outcomes against a real dnsmasq holding the senders' policies."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import spf
from dnsserver import DnsServer, dnsmasq

from relay.checks.dns import DnsSettings, Resolver
from relay.checks.services import CheckServices
from relay.checks.settings import CheckSettings
from relay.checks.spf import SpfOutcome, check_spf, received_spf_header

CLIENT = "127.0.0.1"
INCLUDES = 11  # one more than RFC 7208 section 4.6.4's limit of 10 DNS-querying terms


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    records: dict[str, str] = {
        "pass.test": "v=spf1 ip4:127.0.0.0/8 -all",
        "fail.test": "v=spf1 ip4:192.0.2.1 -all",
        "softfail.test": "v=spf1 ip4:192.0.2.1 ~all",
        "neutral.test": "v=spf1 ?all",
        "notspf.test": "google-site-verification=abc",
        "ten.test": "v=spf1 "
        + " ".join(f"include:n{i}.test" for i in range(9))
        + " ip4:127.0.0.1 -all",
        "many.test": "v=spf1 " + " ".join(f"include:n{i}.test" for i in range(INCLUDES)) + " -all",
        "void.test": "v=spf1 a:v1.test a:v2.test a:v3.test -all",
        "twovoid.test": "v=spf1 a:v1.test a:v2.test ip4:127.0.0.1 -all",
        "slow.test": "v=spf1 include:x.tempfail.test -all",
        "badsyntax.test": "v=spf1 ip4:127.0.0.1 moo -all",
    }
    for i in range(INCLUDES):
        records[f"n{i}.test"] = "v=spf1 ?all"  # neutral: the include does not match
    with dnsmasq(records) as srv:
        yield srv


def resolver_for(server: DnsServer, timeout: float = 0.5) -> Resolver:
    return Resolver(DnsSettings(nameservers=server.nameservers, timeout=timeout, attempts=1))


async def spf_for(server: DnsServer, sender: str, helo: str = "client.test") -> SpfOutcome:
    return await check_spf(resolver_for(server), CLIENT, sender, helo, timeout=5.0)


@pytest.mark.parametrize(
    ("domain", "result"),
    [
        ("pass.test", "pass"),
        ("fail.test", "fail"),
        ("softfail.test", "softfail"),
        ("neutral.test", "neutral"),
        ("nothing.test", "none"),  # NXDOMAIN
        ("notspf.test", "none"),  # TXT present, but no v=spf1
        ("badsyntax.test", "permerror"),
        ("ten.test", "pass"),  # exactly 10 lookups is still fine
        ("twovoid.test", "pass"),  # exactly 2 void lookups is still fine
    ],
)
async def test_spf_result_for_sender_domain(server: DnsServer, domain: str, result: str) -> None:
    outcome = await spf_for(server, f"app@{domain}")
    assert outcome.result == result
    assert outcome.identity == "mailfrom"
    assert outcome.envelope_from == f"app@{domain}"


@pytest.mark.parametrize(
    "sender", ["app@[127.0.0.1]", "app@localhost", "app@" + "a" * 64 + ".test", "app@bad..test"]
)
async def test_spf_none_for_sender_without_checkable_domain(server: DnsServer, sender: str) -> None:
    outcome = await spf_for(server, sender)
    assert (outcome.result, outcome.explanation) == ("none", "no valid domain to check")


async def test_spf_permerror_past_ten_lookups(server: DnsServer) -> None:
    outcome = await spf_for(server, "app@many.test")
    assert outcome.result == "permerror"
    assert "Too many DNS lookups" in outcome.explanation


async def test_spf_permerror_past_two_void_lookups(server: DnsServer) -> None:
    outcome = await spf_for(server, "app@void.test")
    assert outcome.result == "permerror"
    assert "Void lookup limit" in outcome.explanation


async def test_spf_temperror_when_dns_times_out(server: DnsServer) -> None:
    outcome = await spf_for(server, "app@x.tempfail.test")
    assert outcome.result == "temperror"


async def test_spf_temperror_when_include_times_out(server: DnsServer) -> None:
    assert (await spf_for(server, "app@slow.test")).result == "temperror"


async def test_spf_temperror_when_dns_refuses(server: DnsServer) -> None:
    assert (await spf_for(server, "app@x.refused.test")).result == "temperror"


async def test_spf_temperror_for_exceptions_pyspf_lets_escape(server: DnsServer) -> None:
    # An invalid client address makes pyspf raise outside its own error handling.
    outcome = await check_spf(
        resolver_for(server), "not-an-ip", "app@pass.test", "h.test", timeout=5.0
    )
    assert outcome.result == "temperror"


@pytest.mark.parametrize(("helo", "result"), [("pass.test", "pass"), ("fail.test", "fail")])
async def test_null_sender_checks_helo_identity(server: DnsServer, helo: str, result: str) -> None:
    outcome = await spf_for(server, "", helo=helo)
    assert outcome.result == result
    assert outcome.identity == "helo"
    assert outcome.envelope_from == f"postmaster@{helo}"


async def test_overall_timeout_gives_temperror_in_bound(server: DnsServer) -> None:
    # Each lookup may take 2 s but the check as a whole only gets 0.3 s.
    resolver = resolver_for(server, timeout=2.0)
    outcome = await asyncio.wait_for(
        check_spf(resolver, CLIENT, "app@x.tempfail.test", "h.test", timeout=0.3), 1.5
    )
    assert outcome.result == "temperror"


async def test_spf_wait_does_not_block_event_loop(server: DnsServer) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        for _ in range(1000):  # bounded; cancelled long before it ends
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        outcome = await check_spf(
            resolver_for(server, timeout=1.0), CLIENT, "app@x.tempfail.test", "h", timeout=5.0
        )
    finally:
        task.cancel()
    assert outcome.result == "temperror"
    # About 100 ticks fit in the 1 s the lookup waits; a blocked loop would give 0 or 1.
    assert ticks >= 20


async def test_concurrent_checks_use_their_own_resolver(server: DnsServer) -> None:
    with dnsmasq({"pass.test": "v=spf1 -all"}) as other:
        results = await asyncio.gather(
            *(
                check_spf(resolver_for(srv), CLIENT, "a@pass.test", "h", timeout=5.0)
                for srv in (server, other, server, other)
            )
        )
    assert [o.result for o in results] == ["pass", "fail", "pass", "fail"]


def test_received_spf_header_follows_rfc7208_section_9_1() -> None:
    outcome = SpfOutcome("pass", "sender SPF authorized", "mailfrom", "app@pass.test")
    header = received_spf_header(outcome, "127.0.0.1", "client.test", "relay.test")
    assert header == (
        "Received-SPF: pass (relay.test: domain of app@pass.test designates 127.0.0.1\r\n"
        " as permitted sender)\r\n"
        "\treceiver=relay.test;\r\n"
        "\tclient-ip=127.0.0.1;\r\n"
        '\tenvelope-from="app@pass.test";\r\n'
        "\thelo=client.test;\r\n"
        "\tidentity=mailfrom;\r\n"
    )


def test_received_spf_header_strips_control_characters_and_quotes() -> None:
    outcome = SpfOutcome("permerror", "bad (record)\r\nX-Evil: 1", "helo", 'postmaster@e"vil')
    header = received_spf_header(outcome, "127.0.0.1", "e\r\nvil; x=y", "relay.test")
    lines = header.split("\r\n")
    assert lines[-1] == ""
    assert all(line.startswith(("Received-SPF:", "\t", " ")) for line in lines[:-1])
    assert "\\(record\\)" in header.replace("\r\n ", " ")  # unfolded
    assert '\thelo="evil; x=y";' in lines
    assert '\tenvelope-from="postmaster@e\\"vil";' in lines
    assert '\tproblem="bad (record)X-Evil: 1";' in lines


async def test_bounded_executor_serves_each_check_its_resolver(server: DnsServer) -> None:
    with (
        ThreadPoolExecutor(max_workers=1) as pool,
        dnsmasq({"pass.test": "v=spf1 -all"}) as other,
    ):
        results = [
            await check_spf(
                resolver_for(srv), CLIENT, "a@pass.test", "h", timeout=5.0, executor=pool
            )
            for srv in (server, other, server)
        ]
    assert [o.result for o in results] == ["pass", "fail", "pass"]


def test_pyspf_outside_a_check_never_uses_the_system_resolver() -> None:
    # relay.spf replaced pyspf's global lookup; unbound, it refuses instead of falling
    # back to /etc/resolv.conf with search domains.
    result, _code, explanation = spf.query(i=CLIENT, s="a@pass.test", h="h.test").check()
    assert result == "temperror"
    assert "no resolver bound" in explanation


async def test_senders_whose_dns_never_answers_do_not_delay_other_senders(
    server: DnsServer,
) -> None:
    # The relay's own SPF pool ([spf] max_concurrent), 20 evaluations stuck on a DNS
    # server that never answers, then one for a domain that answers at once.
    settings = CheckSettings(dns=DnsSettings(nameservers=server.nameservers, timeout=3.0,
                                             attempts=1), spf_timeout=3.0)
    services = CheckServices(settings, {})
    loop = asyncio.get_running_loop()
    try:
        stuck = [
            asyncio.create_task(check_spf(
                services.resolver, CLIENT, f"app@n{i}.tempfail.test", "h.test",
                timeout=settings.spf_timeout, executor=services.executor))
            for i in range(20)
        ]
        await asyncio.sleep(0.2)  # all 20 are waiting on DNS now
        started = loop.time()
        fast = await check_spf(services.resolver, CLIENT, "app@pass.test", "h.test",
                               timeout=settings.spf_timeout, executor=services.executor)
        elapsed = loop.time() - started
        assert fast.result == "pass"
        assert not any(task.done() for task in stuck)  # answered while they still wait
        assert elapsed < 1.0
        assert {o.result for o in await asyncio.gather(*stuck)} == {"temperror"}
    finally:
        await services.close()


async def test_temperror_explanation_names_no_resolver_internals(server: DnsServer) -> None:
    outcome = await spf_for(server, "app@x.refused.test")
    assert outcome.result == "temperror"
    assert "127.0.0.1" not in outcome.explanation and "Do53" not in outcome.explanation
    header = received_spf_header(outcome, CLIENT, "h.test", "relay.test")
    assert "Do53" not in header and "@127.0.0.1" not in header


def test_received_spf_for_the_null_sender_without_helo_leaves_empty_values_out() -> None:
    outcome = SpfOutcome("none", "no valid domain to check", "helo", "postmaster@")
    header = received_spf_header(outcome, CLIENT, "", "relay.test")
    assert "envelope-from" not in header and "helo=" not in header
    assert 'postmaster@"' not in header
