"""SPF and DKIM in the running relay: real SMTP sessions, a real DNS server (dnsmasq)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import dkim as dkimpy
import pytest
from conftest import ROOT, RelayProcess, Sink, run_cli
from cryptography.hazmat.primitives import serialization
from dnsserver import DnsServer, dnsmasq, split_txt

from relay.checks.dkim import SigningKey, generate_key, load_key, sign, verify_dkim
from relay.checks.dns import DnsSettings, Resolver

# pass.test allows 127.0.0.1 (the relay's test clients); fail.test only 192.0.2.1, the
# "egress" address of the egress-mode test.
SPF = {
    "pass.test": "v=spf1 ip4:127.0.0.1 -all",
    "fail.test": "v=spf1 ip4:192.0.2.1 -all",
    "softfail.test": "v=spf1 ~all",
    "neutral.test": "v=spf1 ?all",
    "none.test": "no SPF here",
    "toomany.test": "v=spf1 " + " ".join(f"include:i{n}.test" for n in range(11)) + " -all",
    **{f"i{n}.test": "v=spf1 ?all" for n in range(11)},
}
OUR_DOMAINS = ["pass.test", "fail.test", "softfail.test", "neutral.test", "none.test",
               "toomany.test", "tempfail.test", "example.test"]


class Keys:
    def __init__(self, directory: Path) -> None:
        self.records: dict[str, tuple[str, ...]] = {}
        self.directory = directory
        self.rsa = self.make("example.test", "rsa1", "rsa")
        self.ed = self.make("example.test", "ed1", "ed25519")
        self.unpublished = self.make("example.test", "gone", "rsa", publish=False)
        self.slow = self.make("tempfail.test", "s1", "ed25519", publish=False)

    def make(self, domain: str, selector: str, kind: str, publish: bool = True) -> SigningKey:
        pem, txt = generate_key(kind)  # type: ignore[arg-type]
        path = self.directory / domain / f"{selector}.key"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pem)
        if publish:
            self.records[f"{selector}._domainkey.{domain}"] = split_txt(txt)
        return load_key(path, domain, selector)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def dns(keys: Keys) -> Iterator[DnsServer]:
    with dnsmasq({**SPF, **keys.records}) as server:
        yield server


def shipped_policies(tmp_path: Path) -> Path:
    """The shipped policies, with our test domains as the relay's own domains."""
    directory = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", directory)
    (directory / "lists" / "our-domains.txt").write_text("\n".join(OUR_DOMAINS) + "\n")
    return directory


def dns_sections(dns: DnsServer, spf: str = "", dkim: str = "") -> str:
    return (f'\n[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\ntimeout = "1s"\nattempts = 1\n'
            f'\n[spf]\ntimeout = "3s"\n{spf}\n\n[dkim]\n{dkim}\n')


@pytest.fixture
def relay(tmp_path: Path, sink: Sink, dns: DnsServer, start_relay) -> RelayProcess:
    return start_relay(sink.port, extra=f'policies_dir = "{shipped_policies(tmp_path)}"',
                       sections=dns_sections(dns))


def message(sender: str, body: bytes = b"Hello\r\n") -> bytes:
    return (f"From: <{sender}>\r\nTo: <b@dest.test>\r\nSubject: checks\r\n"
            "Message-ID: <1@x.test>\r\nDate: Sat, 28 Nov 2026 00:00:00 +0000\r\n\r\n"
            ).encode() + body


async def send(port: int, sender: str, data: bytes | None = None) -> str:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="app1.test") as c:
        _, reply = await c.sendmail(sender, ["b@dest.test"], data or message(sender))
        return reply


async def refused(port: int, sender: str) -> tuple[int, str]:
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as caught:
        await send(port, sender)
    [error] = caught.value.recipients
    return error.code, error.message


@pytest.mark.parametrize(("domain", "result"), [
    ("pass.test", "pass"), ("softfail.test", "softfail"), ("neutral.test", "neutral"),
    ("none.test", "none"), ("toomany.test", "permerror"),
])
async def test_spf_results_that_are_accepted_are_recorded(
    relay: RelayProcess, sink: Sink, domain: str, result: str
):
    await send(relay.port, f"app@{domain}")
    [got] = sink.wait_messages(1)
    assert f"spf={result}".encode() in got.data
    assert f"Received-SPF: {result}".encode() in got.data
    assert b"Authentication-Results: relay.test;" in got.data
    if result != "pass":
        # The shipped rule only logs what a stricter policy would do.
        assert (f"rule=spf-other-own-domain would reject: 550 5.7.23 SPF {result} for "
                f"{domain}") in relay.log_text()


async def test_spf_fail_for_our_domain_is_rejected_with_5_7_23(relay: RelayProcess):
    assert await refused(relay.port, "app@fail.test") == (
        550, "5.7.23 SPF check failed for fail.test")


async def test_spf_temperror_defers_with_4_7_24(relay: RelayProcess):
    assert await refused(relay.port, "app@tempfail.test") == (
        451, "4.7.24 SPF temporary error for tempfail.test, try again later")


async def test_spf_is_not_looked_up_for_other_domains(relay: RelayProcess, sink: Sink):
    await send(relay.port, "app@elsewhere.test")
    [got] = sink.wait_messages(1)
    assert b"Received-SPF" not in got.data


async def test_egress_mode_checks_the_upstream_address(
    tmp_path: Path, sink: Sink, dns: DnsServer, start_relay
):
    relay = start_relay(
        sink.port, extra=f'policies_dir = "{shipped_policies(tmp_path)}"',
        sections=dns_sections(dns, spf='mode = "egress"\negress_addresses = ["192.0.2.1"]'),
    )
    await send(relay.port, "app@fail.test")  # 192.0.2.1 is what fail.test allows
    assert await refused(relay.port, "app@pass.test") == (
        550, "5.7.23 SPF check failed for pass.test")


def signed_by_dkimpy(key: SigningKey, data: bytes, length: bool = False) -> bytes:
    """Signed by plain dkimpy on the whole message, relaxed/relaxed; with l= if asked
    (our own signer never uses it)."""
    private = serialization.load_pem_private_key(key.private_key, password=None)
    if key.algorithm == "rsa-sha256":
        pem = private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    else:  # dkimpy takes the base64 of the 32-octet seed
        pem = base64.b64encode(private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption()))
    header = dkimpy.DKIM(data).sign(key.selector.encode(), key.domain.encode(), pem,
                                    signature_algorithm=key.algorithm.encode(),
                                    canonicalize=(b"relaxed", b"relaxed"), length=length)
    return bytes(header) + data


def dkim_cases(keys: Keys) -> dict[str, tuple[bytes, str]]:
    base = message("app@example.test")
    valid = sign(base, [keys.rsa], ["from", "to", "subject"]) + base
    return {
        "valid": (valid, "pass"),
        "ed25519": (sign(base, [keys.ed], ["from", "subject"]) + base, "pass"),
        "body changed": (valid.replace(b"Hello", b"Jello"), "fail"),
        "header changed": (valid.replace(b"Subject: checks", b"Subject: chex"), "fail"),
        "key missing": (sign(base, [keys.unpublished], ["from"]) + base, "permerror"),
        "key lookup times out": (sign(base, [keys.slow], ["from"]) + base, "temperror"),
        "l= with appended content": (signed_by_dkimpy(keys.rsa, base, length=True) + b"more\r\n",
                                     "policy"),
        "unsigned": (base, "none"),
    }


@pytest.mark.parametrize("case", [
    "valid", "ed25519", "body changed", "header changed", "key missing",
    "key lookup times out", "l= with appended content", "unsigned",
])
async def test_dkim_results_are_tagged(relay: RelayProcess, sink: Sink, keys: Keys, case: str):
    data, expected = dkim_cases(keys)[case]
    await send(relay.port, "app@elsewhere.test", data)
    [got] = sink.wait_messages(1)
    assert f"X-Relay-DKIM: {expected}\r\n".encode() in got.data
    assert f"dkim={expected}".encode() in got.data


@pytest.fixture
def signing_relay(tmp_path: Path, sink: Sink, dns: DnsServer, keys: Keys, start_relay
                  ) -> RelayProcess:
    """A relay that signs mail from example.test with its published RSA and Ed25519 keys."""
    return start_signing_relay(tmp_path, sink, dns, keys, start_relay)


def start_signing_relay(tmp_path: Path, sink: Sink, dns: DnsServer, keys: Keys, start_relay,
                        extra: str = "") -> RelayProcess:
    key_dir = tmp_path / "signing"
    shutil.copytree(keys.directory / "example.test", key_dir / "example.test",
                    ignore=shutil.ignore_patterns("gone.key"))
    return start_relay(sink.port, extra=extra,
                       sections=dns_sections(dns, dkim=f'key_directory = "{key_dir}"'))


async def test_relay_signs_and_the_signatures_verify_at_the_receiver(
    signing_relay: RelayProcess, sink: Sink, dns: DnsServer
):
    await send(signing_relay.port, "app@example.test")
    [got] = sink.wait_messages(1)
    assert got.data.count(b"DKIM-Signature:") == 2  # RSA and Ed25519 side by side
    outcome = await verify_dkim(Resolver(DnsSettings(nameservers=dns.nameservers)), got.data,
                                timeout=5)
    assert sorted((s.selector, s.result) for s in outcome.signatures) == [
        ("ed1", "pass"), ("rsa1", "pass")]
    # dkimpy itself agrees, for the first signature.
    assert dkimpy.verify(got.data, dnsfunc=lambda name, timeout=5: _txt(dns, name))


def large_body(size: int = 3 * 2**20) -> bytes:
    """Several MB, so the relay keeps the body's start in memory and writes the rest to a
    file as it arrives (relay.message.Tail): lines with blanks where relaxed
    canonicalization changes them, and dots where SMTP stuffs them."""
    line = b".a line\t with  blanks of a large message " + b"x" * 30 + b"  \r\n"
    return line * (size // len(line)) + b"\r\n\r\n"


async def test_relay_signs_a_large_message_and_plain_dkimpy_verifies_it(
    signing_relay: RelayProcess, sink: Sink, dns: DnsServer
):
    data = message("app@example.test", large_body())
    await send(signing_relay.port, "app@example.test", data)
    [got] = sink.wait_messages(1)
    assert got.data.endswith(data) and got.data.count(b"DKIM-Signature:") == 2
    for idx in range(2):
        assert dkimpy.DKIM(got.data).verify(idx=idx,
                                            dnsfunc=lambda name, timeout=5: _txt(dns, name))


@pytest.mark.parametrize(("old", "new", "expected"), [
    (b"", b"", "pass"),
    (b"with  blanks", b"with blanks", "pass"),  # relaxed: one blank less is no change
    (b"large", b"LARGE", "fail"),
])
async def test_a_large_message_signed_elsewhere_is_verified_by_the_relay(
    relay: RelayProcess, sink: Sink, keys: Keys, old: bytes, new: bytes, expected: str
):
    data = signed_by_dkimpy(keys.rsa, message("app@example.test", large_body()))
    if old:  # near the end: in what went to disk
        at = data.index(old, len(data) - 1000)
        data = data[:at] + new + data[at + len(old):]
    await send(relay.port, "app@elsewhere.test", data)
    [got] = sink.wait_messages(1)
    assert f"X-Relay-DKIM: {expected}\r\n".encode() in got.data


async def test_a_large_message_signed_elsewhere_is_verified_then_signed_by_the_relay(
    tmp_path: Path, sink: Sink, dns: DnsServer, keys: Keys, start_relay
):
    # The shipped policies verify every message (dkim-results): the body hash for the
    # relay's own signatures comes from that same read of the file.
    relay = start_signing_relay(tmp_path, sink, dns, keys, start_relay,
                                extra=f'policies_dir = "{shipped_policies(tmp_path)}"')
    data = signed_by_dkimpy(keys.ed, message("app@example.test", large_body()))
    await send(relay.port, "app@example.test", data)
    [got] = sink.wait_messages(1)
    assert b"X-Relay-DKIM: pass\r\n" in got.data
    assert got.data.count(b"DKIM-Signature:") == 3  # the relay's two, then the sender's
    for idx in range(3):
        assert dkimpy.DKIM(got.data).verify(idx=idx,
                                            dnsfunc=lambda name, timeout=5: _txt(dns, name))


def _txt(dns: DnsServer, name: bytes) -> bytes:
    resolver = Resolver(DnsSettings(nameservers=dns.nameservers))
    return b"".join(resolver.txt_sync(name.decode().rstrip(".")))


async def test_slow_dns_does_not_hold_up_other_sessions(relay: RelayProcess):
    finished: list[str] = []

    async def session(sender: str) -> None:
        with contextlib.suppress(aiosmtplib.SMTPRecipientsRefused):
            await send(relay.port, sender)
        finished.append(sender)

    slow = asyncio.create_task(session("app@tempfail.test"))  # waits out the DNS timeout
    await asyncio.sleep(0.1)
    await session("app@pass.test")
    assert finished == ["app@pass.test"]
    await slow
    assert finished == ["app@pass.test", "app@tempfail.test"]


@pytest.mark.parametrize(("sender", "status"), [("app@pass.test", 0), ("app@fail.test", 5),
                                                 ("app@tempfail.test", 4)])
def test_dry_run_with_live_checks(tmp_path: Path, dns: DnsServer, sender: str, status: int):
    config = tmp_path / "config.toml"
    config.write_text(dns_sections(dns))
    result = run_cli("test", "--config", str(config), "--policies",
                     str(shipped_policies(tmp_path)), "--live-checks", "--helo", "app1.test",
                     "--from", sender, "--to", "b@dest.test")
    assert result.returncode == status, result.stdout + result.stderr
    expected = {0: "pass", 5: "fail", 4: "temperror"}[status]
    assert f"\nchecks: spf={expected} dkim=" in result.stdout
