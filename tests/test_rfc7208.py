"""The RFC 7208 test suite, through our own SPF path and resolver, against a real dnsmasq.

rfc7208/rfc7208-tests.yml is the OpenSPF / SPF council suite as shipped in pyspf 2.0.14's
source distribution (test/rfc7208-tests.yml), unchanged; its BSD-style licence is
rfc7208/LICENSE. Each scenario's zone data is served by dnsmasq; every test is one
`check_spf` call, exactly as the relay makes it. Results only: the relay does not use
SPF explanations.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
import yaml
from dnsserver import DnsServer, start_dnsmasq

from relay.checks.dns import DnsSettings, Resolver
from relay.checks.spf import check_spf

SUITE = Path(__file__).parent / "rfc7208" / "rfc7208-tests.yml"
# null-text (RFC 7208 section 3.3) publishes a TXT record with no character-strings
# beside the SPF one. Such a record cannot reach our resolver: dnsmasq serves no answer
# for it (the test sees a timeout), and dnspython refuses a whole response holding one
# ("FormError: the list of strings must not be empty"), so the other record is lost with
# it and the result is temperror, never the expected pass. Nothing in our DNS adapter
# can see past that; it stays the one known failure (README, "SPF").
KNOWN_FAILURES: frozenset[str] = frozenset({"null-text"})
TYPES = {"A": 1, "CNAME": 5, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28, "SPF": 99}


def scenarios() -> list[dict[str, Any]]:
    with SUITE.open("rb") as f:
        return list(yaml.safe_load_all(f))


def _records(name: str, entries: Sequence[Any]) -> Iterator[tuple[str, str, object]]:
    """(name, type, value) as pyspf's own harness reads the zone data: SPF records also
    give TXT ones unless the name lists TXT itself; "NONE" is no record of that type."""
    has_txt = any(isinstance(e, dict) and "TXT" in e for e in entries)
    for entry in entries:
        if entry == "TIMEOUT":
            yield name, "TIMEOUT", None
            continue
        for rtype, value in entry.items():
            if value == "NONE" or value == ["NONE"]:
                continue
            yield name, rtype, value
            if rtype == "SPF" and not has_txt:
                yield name, "TXT", value


def _wire(rtype: str, value: object) -> str:
    if rtype in ("TXT", "SPF"):
        strings = [value] if isinstance(value, str) else list(value)  # type: ignore[call-overload]
        data = b"".join(
            bytes([len(b)]) + b for b in (s.encode("utf-8") for s in strings)
        )
        return data.hex()
    if rtype == "MX":
        preference, exchange = value  # type: ignore[misc]
        text = f"{preference} {exchange}"
    else:
        text = str(value)
    if rtype in ("MX", "PTR", "CNAME") and not text.endswith("."):
        text += "."
    rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rtype), text)
    return rdata.to_wire().hex()


def dnsmasq_options(zonedata: dict[str, Sequence[Any]]) -> Any:
    def options(dead_port: int) -> list[str]:
        # Every name not in the zone data does not exist (NXDOMAIN), as in pyspf's own
        # harness; a TIMEOUT name's questions go to the socket that never answers.
        out = ["--local=/#/"]
        names = [name.rstrip(".").lower() for name in zonedata]
        timeouts = set()
        # Names holding records other than aliases: the targets dnsmasq can alias to.
        data = {
            name for name, entries in zip(names, zonedata.values(), strict=True)
            if any(rtype not in ("CNAME", "TIMEOUT") for _, rtype, _v in _records(name, entries))
        }
        for name, entries in zip(names, zonedata.values(), strict=True):
            for owner, rtype, value in _records(name, entries):
                if rtype == "TIMEOUT":
                    timeouts.add(owner)
                    out.append(f"--server=/{owner}/127.0.0.1#{dead_port}")
                elif rtype == "CNAME" and str(value).rstrip(".").lower() in data:
                    # dnsmasq chases its own aliases, as a recursive server does (an
                    # alias to an alias, or a loop, it refuses at start: served raw).
                    out.append(f"--cname={owner},{str(value).rstrip('.').lower()}")
                else:
                    out.append(f"--dns-rr={owner},{TYPES[rtype]},{_wire(rtype, value)}")
        # dnsmasq forwards the subdomains of a --server name too; the zone's own names
        # below a TIMEOUT name answer from the zone data.
        out += [f"--local=/{name}/" for name in names
                if name not in timeouts and any(name.endswith("." + t) for t in timeouts)]
        return out

    return options


CASES = [
    (scenario, name, test)
    for scenario in scenarios()
    for name, test in scenario["tests"].items()
]


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[int, DnsServer]]:
    running: dict[int, DnsServer] = {}
    try:
        yield running
    finally:
        for server in running.values():
            server.stop()


def server_for(servers: dict[int, DnsServer], scenario: dict[str, Any]) -> DnsServer:
    key = id(scenario)
    if key not in servers:
        servers[key] = start_dnsmasq({}, extra=dnsmasq_options(scenario["zonedata"]))
    return servers[key]


@pytest.mark.parametrize(("scenario", "name", "test"), CASES, ids=[c[1] for c in CASES])
async def test_rfc7208_suite(
    request: pytest.FixtureRequest, servers: dict[int, DnsServer], scenario: dict[str, Any],
    name: str, test: dict[str, Any],
) -> None:
    if name in KNOWN_FAILURES:
        # strict: should it start passing, the list (and the README's score) must change.
        request.applymarker(pytest.mark.xfail(strict=True, reason="see KNOWN_FAILURES"))
    server = server_for(servers, scenario)
    resolver = Resolver(DnsSettings(nameservers=server.nameservers, timeout=0.3, attempts=1))
    outcome = await check_spf(
        resolver, test["host"], test.get("mailfrom", ""), test.get("helo", ""), timeout=5.0
    )
    expected = test["result"]
    accepted = [expected] if isinstance(expected, str) else list(expected)
    assert outcome.result in accepted, f"{test.get('spec')}: {outcome.explanation}"
