"""The relay's resolver against a real dnsmasq on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dnsserver import DnsServer, TxtValue, dnsmasq, split_txt

from relay.checks.dns import DnsSettings, DnsTempError, Resolver

LONG = "v=DKIM1; k=rsa; p=" + "A" * 600


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    records: dict[str, TxtValue] = {
        "short.test": "hello world",
        "long.test": split_txt(LONG),
    }
    with dnsmasq(records) as srv:
        yield srv


def resolver_for(server: DnsServer, timeout: float = 0.5, attempts: int = 1) -> Resolver:
    return Resolver(DnsSettings(nameservers=server.nameservers, timeout=timeout, attempts=attempts))


async def test_txt_returns_record(server: DnsServer) -> None:
    assert await resolver_for(server).txt("short.test") == [b"hello world"]


async def test_long_txt_strings_are_joined(server: DnsServer) -> None:
    assert await resolver_for(server).txt("long.test") == [LONG.encode()]


async def test_nxdomain_is_empty_answer(server: DnsServer) -> None:
    assert await resolver_for(server).txt("missing.test") == []


async def test_no_data_is_empty_answer(server: DnsServer) -> None:
    resolver = resolver_for(server)
    assert await resolver.a("short.test") == []
    assert await resolver.aaaa("short.test") == []
    assert await resolver.mx("short.test") == []


async def test_timeout_is_temp_error(server: DnsServer) -> None:
    with pytest.raises(DnsTempError):
        await resolver_for(server, timeout=0.2).txt("slow.tempfail.test")


async def test_refused_is_temp_error(server: DnsServer) -> None:
    with pytest.raises(DnsTempError):
        await resolver_for(server).txt("x.refused.test")


async def test_malformed_name_is_temp_error(server: DnsServer) -> None:
    with pytest.raises(DnsTempError):
        await resolver_for(server).txt("a" * 64 + ".test")


def test_sync_half_uses_same_servers(server: DnsServer) -> None:
    resolver = resolver_for(server)
    assert resolver.txt_sync("short.test") == [b"hello world"]
    assert resolver.txt_sync("missing.test") == []
    with pytest.raises(DnsTempError):
        resolver.txt_sync("x.refused.test")


def test_sync_lifetime_can_only_shorten(server: DnsServer) -> None:
    resolver = resolver_for(server, timeout=0.3)
    with pytest.raises(DnsTempError, match="no time left"):
        resolver.query_sync("short.test", "TXT", lifetime=0)


async def test_answers_are_cached_for_their_ttl() -> None:
    with dnsmasq({"cached.test": "v1"}, local_ttl=300) as srv:
        resolver = resolver_for(srv)
        assert await resolver.txt("cached.test") == [b"v1"]
    # The server is gone; only the cache can answer now.
    assert await resolver.txt("cached.test") == [b"v1"]
    assert resolver.txt_sync("cached.test") == [b"v1"]


async def test_zero_ttl_answers_are_not_cached() -> None:
    with dnsmasq({"uncached.test": "v1"}) as srv:
        resolver = resolver_for(srv, timeout=0.2)
        assert await resolver.txt("uncached.test") == [b"v1"]
    with pytest.raises(DnsTempError):
        await resolver.txt("uncached.test")


async def test_ptr_of_a_non_ip_is_temp_error(server: DnsServer) -> None:
    with pytest.raises(DnsTempError, match="not an IP address"):
        await resolver_for(server).ptr("not-an-ip")
