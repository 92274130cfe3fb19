"""The header fields the relay writes follow RFC 5322 (folding, length, ASCII) and RFC 8601."""

from __future__ import annotations

import email.parser
import email.policy
import re
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import authres
import pytest
from conftest import ROOT, RelayProcess, Sink, free_port
from dnsserver import DnsServer, dnsmasq, split_txt

from relay.checks.authresults import authentication_results_header
from relay.checks.dkim import DkimOutcome, DkimSignatureResult, generate_key
from relay.checks.dmarc import DmarcOutcome
from relay.checks.spf import SpfOutcome, received_spf_header
from relay.headers import strip_forged_authentication_results

LONG_LOCAL = "a" * 64
LONG_DOMAIN = ".".join(["d" * 60] * 3) + ".test"  # 187 octets: a 252-octet address
LONG_SENDER = f"{LONG_LOCAL}@{LONG_DOMAIN}"
LONG_HELO = "h" * 63 + "." + "e" * 63 + ".test"


def check_field(field: str) -> str:
    """Assert RFC 5322 line rules on ``field``; return it unfolded."""
    assert field.endswith("\r\n")
    lines = field[:-2].split("\r\n")
    for line in lines:
        assert len(line.encode()) <= 998
        assert line.strip(" \t"), "a line of only whitespace"
        if len(line) > 78:
            # Only when there is no place to fold: no space after the leading WSP.
            assert " " not in line.lstrip(" \t")[1:], line
    assert all(line[:1] in (" ", "\t") for line in lines[1:])
    assert field.isascii()
    return re.sub(r"\r\n(?=[ \t])", "", field)


def test_long_senders_and_error_texts_are_folded_and_bounded() -> None:
    problem = "bad record: " + "word " * 300  # a long, multi-word explanation
    spf = SpfOutcome("permerror", problem, "mailfrom", LONG_SENDER)
    helo = SpfOutcome("temperror", problem, "helo", f"postmaster@{LONG_HELO}")
    dkim_outcome = DkimOutcome("fail", "", (
        DkimSignatureResult(LONG_DOMAIN, "s" * 63, "fail", problem, "rsa-sha256"),
    ))
    dmarc = DmarcOutcome("fail", LONG_DOMAIN, "reject")
    header = authentication_results_header(
        "relay.test", spf, dkim_outcome, spf_helo=helo, dmarc=dmarc)
    unfolded = check_field(header)
    assert f"smtp.mailfrom={LONG_SENDER}" in unfolded
    assert f"smtp.helo={LONG_HELO}" in unfolded
    for outcome in (spf, helo):
        check_field(received_spf_header(outcome, "127.0.0.1", LONG_HELO, "relay.test"))


def parse_authentication_results(field: str) -> authres.AuthenticationResultsHeader:
    """Parsed by authres, an RFC 8601 implementation independent of ours."""
    unfolded = re.sub(r"\r\n(?=[ \t])", "", field).rstrip("\r\n")
    return authres.AuthenticationResultsHeader.parse(unfolded)


def test_an_independent_rfc8601_parser_reads_what_we_wrote() -> None:
    problem = "bad record: " + "word " * 40
    spf = SpfOutcome("permerror", problem, "mailfrom", LONG_SENDER)
    helo = SpfOutcome("pass", "", "helo", f"postmaster@{LONG_HELO}")
    dkim_outcome = DkimOutcome("pass", "example.test", (
        DkimSignatureResult("example.test", "rsa", "pass", "", "rsa-sha256"),
        DkimSignatureResult("x.tempfail.test", "s", "temperror", "key lookup failed: timed out",
                            "ed25519-sha256"),
    ))
    header = authentication_results_header(
        "relay.test", spf, dkim_outcome, spf_helo=helo,
        dmarc=DmarcOutcome("fail", "example.test", "reject"))
    parsed = parse_authentication_results(header)
    assert parsed.authserv_id == "relay.test"
    assert [(r.method, r.result, [(p.type, p.name, p.value) for p in r.properties])
            for r in parsed.results] == [
        ("spf", "permerror", [("smtp", "mailfrom", LONG_SENDER)]),
        ("spf", "pass", [("smtp", "helo", LONG_HELO)]),
        ("dkim", "pass", [("header", "d", "example.test"), ("header", "s", "rsa"),
                          ("header", "a", "rsa-sha256")]),
        ("dkim", "temperror", [("header", "d", "x.tempfail.test"), ("header", "s", "s"),
                               ("header", "a", "ed25519-sha256")]),
        ("dmarc", "fail", [("header", "from", "example.test")]),
    ]
    assert " ".join(parsed.results[0].reason.split()) == " ".join(problem.split())


def test_headers_parse_back_to_the_values_written() -> None:
    spf = SpfOutcome("pass", "", "mailfrom", LONG_SENDER)
    header = authentication_results_header("relay.test", spf, None)
    parsed = email.parser.Parser(policy=email.policy.default).parsestr(header + "\r\n")
    value = " ".join(str(parsed["Authentication-Results"]).split())
    assert value == f"relay.test; spf=pass smtp.mailfrom={LONG_SENDER}"


def test_utf8_only_for_smtputf8_messages() -> None:
    spf = SpfOutcome("pass", "", "mailfrom", "jörg@exämple.test")
    assert authentication_results_header("relay.test", spf, None).isascii()
    utf8 = authentication_results_header("relay.test", spf, None, utf8=True)
    assert "jörg@exämple.test" in utf8  # RFC 6532 section 3.2
    assert received_spf_header(spf, "127.0.0.1", "h.test", "relay.test").isascii()


def test_no_empty_helo_or_postmaster_at_nothing() -> None:
    spf = SpfOutcome("none", "no valid domain to check", "helo", "postmaster@")
    header = authentication_results_header("relay.test", spf, None)
    assert 'smtp.helo=""' not in header and "smtp.helo" not in header
    assert header == "Authentication-Results: relay.test;\r\n\tspf=none\r\n"


OURS = "relay.test"


@pytest.mark.parametrize("field", [
    b"Authentication-Results: relay.test; spf=pass\r\n",
    b"Authentication-Results: RELAY.Test; spf=pass\r\n",
    b"Authentication-Results: relay.test.; spf=pass\r\n",  # trailing dot
    b"Authentication-Results: (forged) relay.test; dkim=pass\r\n",  # comment first
    b"Authentication-Results: relay.test (a (nested) comment); dkim=pass\r\n",
    b'Authentication-Results: "relay.test"; dkim=pass\r\n',  # quoted-string
    b"Authentication-Results: relay.test 1; dkim=pass\r\n",  # with an authres-version
    b"authentication-results :\r\n relay.test;\r\n\tdkim=pass\r\n",  # folded
])
def test_forged_authentication_results_variants_are_removed(field: bytes) -> None:
    message = field + b"Subject: x\r\n\r\nbody\r\n"
    stripped, removed = strip_forged_authentication_results(message, OURS)
    assert (stripped, removed) == (b"Subject: x\r\n\r\nbody\r\n", 1)


@pytest.mark.parametrize("field", [
    b"Authentication-Results: relay.test.evil; spf=pass\r\n",
    b"Authentication-Results: mx.other.test; spf=pass relay.test\r\n",
])
def test_other_authentication_results_stay(field: bytes) -> None:
    message = field + b"Subject: x\r\n\r\nbody\r\n"
    assert strip_forged_authentication_results(message, OURS) == (message, 0)


def test_our_id_with_a_trailing_dot_matches_fields_without() -> None:
    message = b"Authentication-Results: relay.test; spf=pass\r\n\r\n"
    assert strip_forged_authentication_results(message, "Relay.Test.")[1] == 1


# -- in the running relay ------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[str, ...]]]:
    directory = tmp_path_factory.mktemp("keys")
    pem, txt = generate_key("ed25519")
    (directory / "signed.test").mkdir()
    (directory / "signed.test" / "s1.key").write_bytes(pem)
    return directory, {"s1._domainkey.signed.test": split_txt(txt)}


@pytest.fixture(scope="module")
def dns(keys: tuple[Path, dict[str, tuple[str, ...]]]) -> Iterator[DnsServer]:
    with dnsmasq({**keys[1], "signed.test": "v=spf1 ip4:127.0.0.1 -all",
                  "unsigned.test": "v=spf1 ip4:127.0.0.1 -all"}) as server:
        yield server


@pytest.fixture
def relay(tmp_path: Path, sink: Sink, dns: DnsServer, keys: tuple[Path, object],
          start_relay) -> RelayProcess:
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    (policies / "lists" / "our-domains.txt").write_text("signed.test\nunsigned.test\n")
    relay: RelayProcess = start_relay(
        sink.port, extra=f'policies_dir = "{policies}"', metrics=f"127.0.0.1:{free_port()}",
        sections=(
            f'\n[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\ntimeout = "1s"\nattempts = 1\n'
            f'\n[dkim]\nkey_directory = "{keys[0]}"\n'))
    return relay


def unsigned_count(relay: RelayProcess) -> float:
    port = re.search(r'listen = "127\.0\.0\.1:(\d+)"', relay.config.read_text())
    assert port is not None
    url = f"http://127.0.0.1:{port.group(1)}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    found = re.search(r"^relay_dkim_unsigned_total (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize(("domain", "unsigned"), [("signed.test", 1.0), ("unsigned.test", 0.0)])
async def test_a_malformed_header_section_is_delivered_unsigned_never_deferred(
    relay: RelayProcess, sink: Sink, domain: str, unsigned: float
):
    # The first line is body text. dkimpy cannot parse it, which used to mean 451 forever
    # for a signing domain while a domain without keys got 250: retrying cannot fix it,
    # so both get 250 (like Postfix, the whole text is body) and the signing domain's
    # message goes unsigned, with a log line and a metric.
    data = f"this is not a header\r\nFrom: <app@{domain}>\r\n\r\nbody\r\n".encode()
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port,
                               local_hostname="app1.test") as client:
        _, reply = await client.sendmail(f"app@{domain}", ["b@dest.test"], data)
    assert reply.startswith("2.0.0 Ok: queued as")
    [got] = sink.wait_messages(1)
    assert b"DKIM-Signature:" not in got.data
    assert got.data.endswith(data)
    assert unsigned_count(relay) == unsigned
    if unsigned:
        assert ("not DKIM-signed: header section is not RFC 5322 syntax (line 1 is not a "
                "header field)") in relay.log_text()


async def test_headers_written_live_are_folded_ascii_and_parse(
    relay: RelayProcess, sink: Sink
):
    long_local = "x" * 60
    data = (f"From: <{long_local}@signed.test>\r\nTo: <b@dest.test>\r\nSubject: hi\r\n"
            "\r\nbody\r\n").encode()
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port,
                               local_hostname=LONG_HELO) as client:
        await client.sendmail(f"{long_local}@signed.test", ["b@dest.test"], data)
    [got] = sink.wait_messages(1)
    head = got.data.split(b"\r\n\r\n")[0].decode("ascii") + "\r\n"
    fields = re.findall(r"^(?:Authentication-Results|Received-SPF):.*?\r\n(?![ \t])", head,
                        re.MULTILINE | re.DOTALL)
    assert len(fields) == 2
    for field in fields:
        check_field(field)
    [results] = [f for f in fields if f.startswith("Authentication-Results:")]
    parsed = parse_authentication_results(results)
    assert [(r.method, r.result) for r in parsed.results] == [("spf", "pass"), ("dkim", "none")]


async def test_received_is_folded_for_a_long_helo(relay: RelayProcess, sink: Sink):
    data = b"From: <app@elsewhere.test>\r\nSubject: hi\r\n\r\nbody\r\n"
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port,
                               local_hostname=LONG_HELO) as client:
        await client.sendmail("app@elsewhere.test", ["b@dest.test"], data)
    [got] = sink.wait_messages(1)
    head = got.data.split(b"\r\n\r\n")[0].decode("ascii") + "\r\n"
    [received] = re.findall(r"^Received:.*?\r\n(?![ \t])", head, re.MULTILINE | re.DOTALL)
    assert f"from {LONG_HELO}" in check_field(received)
