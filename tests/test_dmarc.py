"""DMARC (RFC 7489) against records in a real dnsmasq, and in the running relay."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest
from conftest import ROOT, RelayProcess, Sink, run_cli
from dnsserver import DnsServer, dnsmasq, split_txt

from relay.checks.dkim import generate_key, load_key, sign
from relay.checks.dmarc import (
    DmarcOutcome,
    aligned,
    author_domain,
    evaluate_dmarc,
    organizational_domain,
    parse_record,
)
from relay.checks.dns import DnsSettings, Resolver

RECORDS = {
    "_dmarc.example.test": "v=DMARC1; p=reject; sp=quarantine",
    "_dmarc.strict.test": "v=DMARC1; p=quarantine; adkim=s; aspf=s",
    "_dmarc.monitor.test": "v=DMARC1; p=none; rua=mailto:d@monitor.test",
    "_dmarc.broken.test": "v=DMARC1; p=sometimes",
    "_dmarc.other.test": "v=DMARC1; p=reject",
    "_dmarc.notdmarc.test": "v=spf1 -all",
    "_dmarc.sub.nested.test": "v=DMARC1; p=none",
}


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    with dnsmasq(RECORDS) as srv:
        yield srv


def resolver_for(server: DnsServer) -> Resolver:
    return Resolver(DnsSettings(nameservers=server.nameservers, timeout=0.5, attempts=1))


async def dmarc(
    server: DnsServer, from_domain: str | None, spf: tuple[str, str] = ("none", ""),
    dkim: tuple[str, ...] = (),
) -> DmarcOutcome:
    return await evaluate_dmarc(resolver_for(server), from_domain, spf, dkim, timeout=3.0)


def test_organizational_domain_follows_the_public_suffix_list() -> None:
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert organizational_domain("mail.example.com.") == "example.com"
    assert organizational_domain("co.uk") == "co.uk"
    assert aligned("bounces.example.com", "example.com", "r")
    assert not aligned("bounces.example.com", "example.com", "s")
    assert not aligned("example.co.uk", "other.co.uk", "r")


@pytest.mark.parametrize(("spf", "dkim", "result"), [
    (("pass", "example.test"), (), "pass"),  # SPF aligned
    (("pass", "bounce.example.test"), (), "pass"),  # relaxed: same organisational domain
    (("none", ""), ("mail.example.test",), "pass"),  # DKIM aligned (relaxed)
    (("pass", "elsewhere.test"), ("elsewhere.test",), "fail"),  # both pass, neither aligned
    (("fail", "example.test"), (), "fail"),
])
async def test_dmarc_result_from_alignment(
    server: DnsServer, spf: tuple[str, str], dkim: tuple[str, ...], result: str
) -> None:
    outcome = await dmarc(server, "example.test", spf, dkim)
    assert (outcome.result, outcome.policy) == (result, "reject")


async def test_strict_alignment_needs_the_same_name(server: DnsServer) -> None:
    assert (await dmarc(server, "strict.test", dkim=("mail.strict.test",))).result == "fail"
    assert (await dmarc(server, "strict.test", dkim=("strict.test",))).result == "pass"


async def test_subdomain_inherits_the_organisational_record_with_sp(server: DnsServer) -> None:
    outcome = await dmarc(server, "news.example.test", dkim=("example.test",))
    assert (outcome.result, outcome.policy) == ("pass", "quarantine")


@pytest.mark.parametrize(("domain", "result", "policy"), [
    ("nothing.test", "none", ""),  # no record anywhere
    ("notdmarc.test", "none", ""),  # a TXT record that is not DMARC
    ("monitor.test", "fail", "none"),
    ("broken.test", "permerror", ""),  # p= unusable and no rua=
    ("x.tempfail.test", "temperror", ""),  # DNS never answers
])
async def test_dmarc_none_permerror_and_temperror(
    server: DnsServer, domain: str, result: str, policy: str
) -> None:
    outcome = await dmarc(server, domain)
    assert (outcome.result, outcome.policy) == (result, policy)


async def test_more_than_one_author_is_permerror(server: DnsServer) -> None:
    assert author_domain(b"From: a@x.test, b@y.test\r\n\r\n") is None
    assert author_domain(b"From: a@x.test\r\nFrom: b@x.test\r\n\r\n") is None
    assert author_domain(b"From: App <a@X.Test>\r\n\r\n") == "x.test"
    assert (await dmarc(server, None)).result == "permerror"


def test_record_parsing() -> None:
    assert parse_record(b"v=spf1 -all") is None
    assert parse_record(b"p=reject; v=DMARC1") is None  # v= must come first
    record = parse_record(b"v=DMARC1;p=Quarantine;adkim=s")
    assert not isinstance(record, str) and record is not None
    assert (record.policy, record.adkim, record.aspf) == ("quarantine", "s", "r")
    assert parse_record(b"v=DMARC1; p=nope; rua=mailto:x@y.test").policy == "none"  # type: ignore[union-attr]


# -- in the running relay ------------------------------------------------------------------

INBOUND_POLICY = """
[[rule]]
name = "dmarc-tag"
match.dmarc = ["pass", "fail", "none", "temperror", "permerror"]
action = "tag"
add_headers = { "X-DMARC" = "{dmarc} {dmarc_policy}" }

[[rule]]
name = "loopback"
match.client_address = "127.0.0.0/8"
action = "accept"
"""


class Signing:
    def __init__(self, directory: Path) -> None:
        pem, txt = generate_key("ed25519")
        path = directory / "example.test" / "s1.key"
        path.parent.mkdir(parents=True)
        path.write_bytes(pem)
        self.directory = directory
        self.key = load_key(path, "example.test", "s1")
        self.records = {"s1._domainkey.example.test": split_txt(txt)}


@pytest.fixture(scope="module")
def signing(tmp_path_factory: pytest.TempPathFactory) -> Signing:
    return Signing(tmp_path_factory.mktemp("dmarc-keys"))


@pytest.fixture(scope="module")
def relay_dns(signing: Signing) -> Iterator[DnsServer]:
    with dnsmasq({**RECORDS, **signing.records,
                  "example.test": "v=spf1 ip4:127.0.0.1 -all"}) as srv:
        yield srv


def sections(dns: DnsServer, dkim: str = "") -> str:
    return (f'\n[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\ntimeout = "1s"\nattempts = 1\n'
            f"\n[dkim]\n{dkim}\n")


def message(author: str) -> bytes:
    return (f"From: <{author}>\r\nTo: <b@dest.test>\r\nSubject: dmarc\r\n"
            "Message-ID: <1@x.test>\r\nDate: Sat, 28 Nov 2026 00:00:00 +0000\r\n\r\nHi\r\n"
            ).encode()


async def send(port: int, sender: str, data: bytes) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port,
                               local_hostname="app1.test") as client:
        await client.sendmail(sender, ["b@dest.test"], data)


@pytest.mark.parametrize(("author", "data_of", "expected"), [
    ("app@example.test", "signed", b"dmarc=pass (p=reject) header.from=example.test"),
    ("app@other.test", "signed", b"dmarc=fail (p=reject) header.from=other.test"),
    ("app@nothing.test", "plain", b"dmarc=none header.from=nothing.test"),
])
async def test_inbound_dmarc_is_recorded_in_authentication_results(
    tmp_path: Path, sink: Sink, relay_dns: DnsServer, signing: Signing, start_relay,
    author: str, data_of: str, expected: bytes,
):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "10-test.toml").write_text(INBOUND_POLICY)
    relay = start_relay(sink.port, extra=f'policies_dir = "{policies}"',
                        sections=sections(relay_dns))
    data = message(author)
    if data_of == "signed":  # signed by example.test: aligned only for example.test
        data = sign(data, [signing.key], ["from", "subject"]) + data
    await send(relay.port, "app@elsewhere.test", data)
    [got] = sink.wait_messages(1)
    head = got.data.split(b"\r\n\r\n")[0].replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
    assert expected in head


@pytest.fixture
def outbound_relay(tmp_path: Path, sink: Sink, relay_dns: DnsServer, signing: Signing,
                   start_relay) -> RelayProcess:
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    (policies / "lists" / "our-domains.txt").write_text("example.test\n")
    return start_relay(
        sink.port, extra=f'policies_dir = "{policies}"',
        sections=sections(relay_dns, dkim=f'key_directory = "{signing.directory}"'),
    )


async def test_outbound_prediction_passes_for_mail_we_sign_aligned(
    outbound_relay: RelayProcess, sink: Sink
):
    await send(outbound_relay.port, "app@example.test", message("app@example.test"))
    [got] = sink.wait_messages(1)
    assert b"DKIM-Signature:" in got.data
    assert "dmarc-outbound-own-domain" not in outbound_relay.log_text()


async def test_outbound_prediction_logs_would_reject_for_a_misaligned_author(
    outbound_relay: RelayProcess, sink: Sink
):
    # Our sender, but a From: domain we hold no key for and whose policy is reject:
    # receivers would fail DMARC, and the shipped rule says so before the mail leaves.
    await send(outbound_relay.port, "app@example.test", message("app@other.test"))
    sink.wait_messages(1)
    assert ("rule=dmarc-outbound-own-domain would reject: 550 5.7.1 DMARC would fail for "
            "example.test") in outbound_relay.log_text()


@pytest.mark.parametrize(("assumed", "logged"), [("fail", True), ("pass", False)])
def test_dry_run_takes_an_assumed_outbound_result(
    tmp_path: Path, assumed: str, logged: bool
):
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    (policies / "lists" / "our-domains.txt").write_text("example.test\n")
    (tmp_path / "config.toml").write_text("")
    mail = tmp_path / "mail.eml"
    mail.write_bytes(message("app@example.test"))
    result = run_cli("test", "--config", str(tmp_path / "config.toml"), "--policies",
                     str(policies), "--from", "app@example.test", "--to", "b@dest.test",
                     "--message", str(mail), "--dmarc-outbound", assumed)
    assert result.returncode == 0, result.stdout + result.stderr
    line = 'log: rule "dmarc-outbound-own-domain" would reject'
    assert (line in result.stdout) == logged, result.stdout


class _Suffixes:
    """publicsuffixlist in the shape pydmarc's alignment check asks for."""

    @staticmethod
    def get_public_suffix(domain: str) -> str:
        return organizational_domain(domain)


CROSS_CHECK = [
    ("example.test", ("pass", "example.test"), ()),
    ("example.test", ("pass", "bounce.example.test"), ()),
    ("example.test", ("fail", "example.test"), ("mail.example.test",)),
    ("example.test", ("pass", "elsewhere.test"), ("elsewhere.test",)),
    ("news.example.test", ("none", ""), ("example.test",)),
    ("news.example.test", ("softfail", "news.example.test"), ()),
    ("strict.test", ("pass", "mail.strict.test"), ("mail.strict.test",)),
    ("strict.test", ("none", ""), ("strict.test",)),
    ("monitor.test", ("pass", "other.test"), ()),
]


@pytest.mark.parametrize(("author", "spf", "dkim"), CROSS_CHECK)
async def test_an_independent_dmarc_implementation_agrees(
    server: DnsServer, author: str, spf: tuple[str, str], dkim: tuple[str, ...]
) -> None:
    # pydmarc (the `dmarc` package) judges the same record text and the same SPF and DKIM
    # results; it does no DNS itself, so the record is the one our discovery found.
    import dmarc as pydmarc

    ours = await dmarc(server, author, spf, dkim)
    org = organizational_domain(author)
    inherited = f"_dmarc.{author}" not in RECORDS
    record = RECORDS[f"_dmarc.{org}" if inherited else f"_dmarc.{author}"]
    judge = pydmarc.DMARC(publicsuffix=_Suffixes())
    policy = judge.parse_record(record, author, org_domain=org if inherited else None)
    theirs = judge.get_result(
        policy,
        auth_results=pydmarc.AuthResults(
            spf=pydmarc.SPFAuthResult(spf[1], pydmarc.SPFResult(spf[0])) if spf[1] else None,
            dkim=[pydmarc.DKIMAuthResult(d, pydmarc.DKIMResult("pass")) for d in dkim],
        ),
    )
    assert ours.result == theirs.result.value
    published = policy.sp if inherited and policy.sp.value != "unspecified" else policy.p
    assert ours.policy == published.value
