"""DKIM verification and signing against keys published in a real dnsmasq."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dkim
import dkim.crypto
import pytest
from cryptography.hazmat.primitives import serialization
from dkim.canonicalization import CanonicalizationPolicy
from dnsserver import DnsServer, TxtValue, dnsmasq, split_txt

from relay.checks.authresults import authentication_results_header
from relay.checks.dkim import (
    DEFAULT_SIGNED_HEADERS,
    MAX_SIGNATURES,
    SIGNING_BODY,
    DkimOutcome,
    DkimSignatureResult,
    SigningKey,
    check_published_key,
    generate_key,
    load_key,
    sign,
    verify_dkim,
)
from relay.checks.dns import DnsSettings, Resolver
from relay.checks.spf import SpfOutcome
from relay.message import Tail

DOMAIN = "example.test"

MESSAGE = (
    b"From: App <app@example.test>\r\n"
    b"To: User <user@dest.test>\r\n"
    b"Subject: Your receipt\r\n"
    b"Date: Sat, 28 Nov 2026 01:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"\r\n"
    b"Thank you for your order.\r\n"
    b"Total: 12.00\r\n"
)


@dataclass(frozen=True)
class Keys:
    rsa: SigningKey
    ed25519: SigningKey
    unpublished: SigningKey
    slow: SigningKey  # its domain is under tempfail.test: the key fetch times out
    other: SigningKey  # published at a selector that holds a different key


@pytest.fixture(scope="module")
def keys() -> Keys:
    rsa_pem, _ = generate_key("rsa")
    ed_pem, _ = generate_key("ed25519")
    other_pem, _ = generate_key("ed25519")
    return Keys(
        rsa=SigningKey(DOMAIN, "rsa", "rsa-sha256", rsa_pem),
        ed25519=SigningKey(DOMAIN, "ed", "ed25519-sha256", ed_pem),
        unpublished=SigningKey(DOMAIN, "missing", "rsa-sha256", rsa_pem),
        slow=SigningKey("x.tempfail.test", "rsa", "rsa-sha256", rsa_pem),
        other=SigningKey(DOMAIN, "ed", "ed25519-sha256", other_pem),
    )


def public_txt(key: SigningKey) -> str:
    private = serialization.load_pem_private_key(key.private_key, password=None)
    if key.algorithm == "rsa-sha256":
        der = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"


@pytest.fixture(scope="module")
def server(keys: Keys) -> Iterator[DnsServer]:
    rsa_txt = public_txt(keys.rsa)
    assert len(rsa_txt) > 255  # a 2048-bit key needs several character-strings
    records: dict[str, TxtValue] = {
        "rsa._domainkey.example.test": split_txt(rsa_txt),
        "ed._domainkey.example.test": public_txt(keys.ed25519),
        "broken._domainkey.example.test": "v=DKIM1; k=rsa; p=bm90IGEga2V5",
    }
    with dnsmasq(records) as srv:
        yield srv


def resolver_for(server: DnsServer, timeout: float = 0.5) -> Resolver:
    return Resolver(DnsSettings(nameservers=server.nameservers, timeout=timeout, attempts=1))


async def verify(server: DnsServer, message: bytes, dns_timeout: float = 0.5) -> DkimOutcome:
    return await verify_dkim(resolver_for(server, dns_timeout), message, timeout=5.0)


def signed(message: bytes, *keys: SigningKey) -> bytes:
    return sign(message, keys, DEFAULT_SIGNED_HEADERS) + message


def pkcs1(key: SigningKey) -> bytes:
    private = serialization.load_pem_private_key(key.private_key, password=None)
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


async def test_unsigned_message_is_none(server: DnsServer) -> None:
    assert await verify(server, MESSAGE) == DkimOutcome("none")


async def test_rsa_signature_with_split_key_record_passes(server: DnsServer, keys: Keys) -> None:
    outcome = await verify(server, signed(MESSAGE, keys.rsa))
    assert outcome.result == "pass"
    assert outcome.domain == DOMAIN
    assert [(s.domain, s.selector, s.result) for s in outcome.signatures] == [
        (DOMAIN, "rsa", "pass")
    ]


async def test_ed25519_signature_passes(server: DnsServer, keys: Keys) -> None:
    outcome = await verify(server, signed(MESSAGE, keys.ed25519))
    assert (outcome.result, outcome.domain) == ("pass", DOMAIN)
    assert outcome.signatures[0].algorithm == "ed25519-sha256"


async def test_rsa_and_ed25519_side_by_side_both_pass(server: DnsServer, keys: Keys) -> None:
    message = signed(MESSAGE, keys.rsa, keys.ed25519)
    assert message.count(b"DKIM-Signature:") == 2
    outcome = await verify(server, message)
    assert outcome.result == "pass"
    assert [(s.selector, s.result) for s in outcome.signatures] == [
        ("rsa", "pass"),
        ("ed", "pass"),
    ]
    # dkimpy's own verifier agrees, through its default path fed by the same records.
    resolver = resolver_for(server)
    for idx in range(2):
        assert dkim.DKIM(message).verify(idx=idx, dnsfunc=lambda n, timeout=5: dnsfunc(resolver, n))


def dnsfunc(resolver: Resolver, name: bytes) -> bytes | None:
    records = resolver.txt_sync(name.decode())
    return records[0] if records else None


async def test_signature_is_relaxed_without_l_and_oversigns_from(keys: Keys) -> None:
    header = sign(MESSAGE, [keys.rsa], ["Subject", "From"])
    tags = dkim.util.parse_tag_value(header.split(b":", 1)[1])
    assert tags[b"c"] == b"relaxed/relaxed"
    assert b"l" not in tags
    assert [h.strip() for h in tags[b"h"].split(b":")] == [b"from", b"from", b"subject"]
    assert header.endswith(b"\r\n")


async def test_changed_body_fails(server: DnsServer, keys: Keys) -> None:
    message = signed(MESSAGE, keys.rsa).replace(b"12.00", b"99.00")
    outcome = await verify(server, message)
    assert outcome.result == "fail"
    assert "body hash" in outcome.signatures[0].reason


async def test_changed_header_fails(server: DnsServer, keys: Keys) -> None:
    message = signed(MESSAGE, keys.rsa, keys.ed25519).replace(b"Your receipt", b"Your prize")
    outcome = await verify(server, message)
    assert outcome.result == "fail"
    assert {s.result for s in outcome.signatures} == {"fail"}


async def test_added_second_from_fails(server: DnsServer, keys: Keys) -> None:
    message = signed(MESSAGE, keys.rsa)
    message = message.replace(b"\r\n\r\n", b"\r\nFrom: ceo@example.test\r\n\r\n", 1)
    assert (await verify(server, message)).result == "fail"


async def test_missing_key_is_permerror(server: DnsServer, keys: Keys) -> None:
    outcome = await verify(server, signed(MESSAGE, keys.unpublished))
    assert outcome.result == "permerror"
    assert "no key" in outcome.signatures[0].reason


async def test_unparsable_key_is_permerror(server: DnsServer, keys: Keys) -> None:
    key = SigningKey(DOMAIN, "broken", "rsa-sha256", keys.rsa.private_key)
    assert (await verify(server, signed(MESSAGE, key))).result == "permerror"


async def test_key_of_other_type_is_permerror(server: DnsServer, keys: Keys) -> None:
    # An RSA signature whose selector publishes an Ed25519 key.
    key = SigningKey(DOMAIN, "ed", "rsa-sha256", keys.rsa.private_key)
    assert (await verify(server, signed(MESSAGE, key))).result == "permerror"


async def test_wrong_published_key_fails(server: DnsServer, keys: Keys) -> None:
    assert (await verify(server, signed(MESSAGE, keys.other))).result == "fail"


async def test_key_fetch_timeout_is_temperror(server: DnsServer, keys: Keys) -> None:
    outcome = await verify(server, signed(MESSAGE, keys.slow), dns_timeout=0.3)
    assert outcome.result == "temperror"
    assert outcome.signatures[0].result == "temperror"


async def test_key_fetch_refused_is_temperror(server: DnsServer, keys: Keys) -> None:
    key = SigningKey("x.refused.test", "rsa", "rsa-sha256", keys.rsa.private_key)
    assert (await verify(server, signed(MESSAGE, key))).result == "temperror"


async def test_overall_timeout_is_temperror(server: DnsServer, keys: Keys) -> None:
    resolver = resolver_for(server, timeout=2.0)
    outcome = await asyncio.wait_for(
        verify_dkim(resolver, signed(MESSAGE, keys.slow), timeout=0.3), 1.5
    )
    assert outcome.result == "temperror"
    assert [s.result for s in outcome.signatures] == ["temperror"]


async def test_temperror_outranks_fail_and_pass_outranks_all(server: DnsServer, keys: Keys) -> None:
    slow_and_missing = signed(MESSAGE, keys.slow, keys.unpublished)
    assert (await verify(server, slow_and_missing, dns_timeout=0.3)).result == "temperror"
    good_and_missing = signed(MESSAGE, keys.unpublished, keys.ed25519)
    outcome = await verify(server, good_and_missing)
    assert (outcome.result, outcome.domain) == ("pass", DOMAIN)
    assert [s.result for s in outcome.signatures] == ["permerror", "pass"]


async def test_signatures_past_the_limit_are_not_evaluated(server: DnsServer, keys: Keys) -> None:
    header = sign(MESSAGE, [keys.unpublished], DEFAULT_SIGNED_HEADERS)
    message = header * MAX_SIGNATURES + sign(MESSAGE, [keys.ed25519], ["from"]) + MESSAGE
    outcome = await verify(server, message)
    assert outcome.result == "neutral"
    assert [s.result for s in outcome.signatures] == ["permerror"] * MAX_SIGNATURES + ["neutral"]


async def test_key_wait_does_not_block_event_loop(server: DnsServer, keys: Keys) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        for _ in range(1000):  # bounded; cancelled long before it ends
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        outcome = await verify(server, signed(MESSAGE, keys.slow), dns_timeout=1.0)
    finally:
        task.cancel()
    assert outcome.result == "temperror"
    assert ticks >= 20  # about 100 fit in the 1 s wait; a blocked loop gives 0 or 1


def dkimpy_signature(
    key: SigningKey, message: bytes, canonicalize: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
    **kwargs: object,
) -> bytes:
    return bytes(
        dkim.DKIM(message).sign(
            key.selector.encode(),
            key.domain.encode(),
            pkcs1(key),
            canonicalize=canonicalize,
            **kwargs,
        )
    )


async def test_body_length_limit_with_appended_content_is_not_pass(
    server: DnsServer, keys: Keys
) -> None:
    message = dkimpy_signature(keys.rsa, MESSAGE, length=True) + MESSAGE
    assert (await verify(server, message)).result == "pass"  # nothing appended yet
    appended = message + b"\r\nClick here: http://evil.test/\r\n"
    outcome = await verify(server, appended)
    assert outcome.result == "policy"
    assert "l=" in outcome.signatures[0].reason


async def test_signature_not_covering_from_is_policy(server: DnsServer, keys: Keys) -> None:
    # dkimpy refuses to sign without From, so build such a signature by hand.
    signer = dkim.DKIM(MESSAGE)
    signer.hasher = hashlib.sha256
    canon = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    body_hash = base64.b64encode(hashlib.sha256(canon.canonicalize_body(signer.body)).digest())
    fields = [
        (b"v", b"1"),
        (b"a", b"rsa-sha256"),
        (b"c", b"relaxed/relaxed"),
        (b"d", DOMAIN.encode()),
        (b"s", b"rsa"),
        (b"h", b"subject"),
        (b"bh", body_hash),
        (b"b", b"0" * 60),
    ]
    private = dkim.crypto.parse_pem_private_key(pkcs1(keys.rsa))
    value = signer.gen_header(fields, [b"subject"], canon, b"DKIM-Signature", private)
    outcome = await verify(server, b"DKIM-Signature: " + value + MESSAGE)
    assert outcome.result == "policy"
    assert "From" in outcome.signatures[0].reason


async def test_malformed_signature_header_is_permerror(server: DnsServer) -> None:
    message = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=rsa\r\n" + MESSAGE
    outcome = await verify(server, message)
    assert outcome.result == "permerror"
    assert outcome.signatures[0].domain == DOMAIN


async def test_unparsable_header_section_is_permerror(server: DnsServer) -> None:
    # (A message without any DKIM-Signature is "none" before it is parsed at all.)
    outcome = await verify(server, b"no colon here\r\nDKIM-Signature: v=1\r\n" + MESSAGE)
    assert outcome.result == "permerror"
    assert "unparsable" in outcome.reason
    header = authentication_results_header("relay.test", None, outcome)
    assert header.startswith('Authentication-Results: relay.test;\r\n\tdkim=permerror reason="')


async def test_rsa_sha1_is_permerror(server: DnsServer, keys: Keys) -> None:
    header = dkimpy_signature(keys.rsa, MESSAGE, signature_algorithm=b"rsa-sha1")
    outcome = await verify(server, header + MESSAGE)
    assert outcome.result == "permerror"


def test_sign_refuses_fields_that_must_not_be_signed(keys: Keys) -> None:
    with pytest.raises(ValueError, match="received"):
        sign(MESSAGE, [keys.rsa], ["from", "Received"])


def test_signing_key_repr_hides_private_key(keys: Keys) -> None:
    assert b"PRIVATE" in keys.rsa.private_key
    assert "PRIVATE" not in repr(keys.rsa)


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
async def test_generated_key_loads_and_is_found_published(tmp_path: Path, kind: str) -> None:
    pem, txt = generate_key(kind)  # type: ignore[arg-type]
    path = tmp_path / "key.pem"
    path.write_bytes(pem)
    key = load_key(path, DOMAIN, "new")
    assert key.algorithm == ("rsa-sha256" if kind == "rsa" else "ed25519-sha256")
    with dnsmasq({"new._domainkey.example.test": split_txt(txt)}) as srv:
        resolver = resolver_for(srv)
        assert await check_published_key(resolver, key) == (
            True,
            "new._domainkey.example.test: public key matches",
        )
        ok, detail = await check_published_key(
            resolver, SigningKey(DOMAIN, "absent", key.algorithm, pem)
        )
        assert not ok and "no TXT record" in detail
        outcome = await verify_dkim(resolver, signed(MESSAGE, key), timeout=5.0)
        assert outcome.result == "pass"


async def test_check_published_key_reports_mismatch(server: DnsServer, keys: Keys) -> None:
    ok, detail = await check_published_key(resolver_for(server), keys.other)
    assert not ok and "does not match" in detail


def test_load_key_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(b"not a key")
    with pytest.raises(ValueError, match=r"bad\.pem"):
        load_key(path, DOMAIN, "s")
    with pytest.raises(ValueError, match=r"absent\.pem"):
        load_key(tmp_path / "absent.pem", DOMAIN, "s")


def test_authentication_results_header_lists_each_check() -> None:
    spf = SpfOutcome("pass", "sender SPF authorized", "mailfrom", "app@example.test")
    dkim_outcome = DkimOutcome(
        "pass",
        DOMAIN,
        (
            DkimSignatureResult(DOMAIN, "rsa", "pass", "", "rsa-sha256"),
            DkimSignatureResult("other.test", "s1", "permerror", "no key", "ed25519-sha256"),
        ),
    )
    assert authentication_results_header("relay.test", spf, dkim_outcome) == (
        "Authentication-Results: relay.test;\r\n"
        "\tspf=pass smtp.mailfrom=app@example.test;\r\n"
        "\tdkim=pass header.d=example.test header.s=rsa header.a=rsa-sha256;\r\n"
        '\tdkim=permerror reason="no key" header.d=other.test header.s=s1\r\n'
        " header.a=ed25519-sha256\r\n"
    )


def test_authentication_results_header_for_helo_and_unsigned() -> None:
    spf = SpfOutcome("temperror", "DNS timeout", "helo", "postmaster@client.test")
    assert authentication_results_header("relay.test", spf, DkimOutcome("none")) == (
        "Authentication-Results: relay.test;\r\n"
        '\tspf=temperror reason="DNS timeout" smtp.helo=client.test;\r\n'
        "\tdkim=none\r\n"
    )
    assert authentication_results_header("relay.test", None, None) == (
        "Authentication-Results: relay.test; none\r\n"
    )


def test_authentication_results_header_strips_control_characters() -> None:
    spf = SpfOutcome("permerror", 'bad\r\nX-Evil: "1"', "mailfrom", "a\r\n@evil.test")
    header = authentication_results_header("relay\r\n.test", spf, None)
    assert header.count("\r\n") == 2  # the fold and the end, nothing injected
    assert 'reason="badX-Evil: \\"1\\""' in header
    assert "relay.test;" in header


async def test_a_key_that_never_answers_spoils_only_its_own_signature(
    server: DnsServer, keys: Keys
) -> None:
    # The resolver would wait 5 s x 2 tries, as long as the whole check may take: each
    # key lookup still gets only its share of verify_timeout.
    resolver = Resolver(DnsSettings(nameservers=server.nameservers, timeout=5.0, attempts=2))
    message = signed(MESSAGE, keys.slow, keys.rsa)
    outcome = await asyncio.wait_for(verify_dkim(resolver, message, timeout=1.5), 5.0)
    assert [(s.domain, s.result) for s in outcome.signatures] == [
        ("x.tempfail.test", "temperror"), (DOMAIN, "pass")
    ]
    assert (outcome.result, outcome.domain) == ("pass", DOMAIN)
    assert "127.0.0.1" not in outcome.signatures[0].reason  # no resolver internals


async def test_a_slow_key_does_not_hide_a_tampered_signature(
    server: DnsServer, keys: Keys
) -> None:
    resolver = Resolver(DnsSettings(nameservers=server.nameservers, timeout=5.0, attempts=2))
    message = signed(MESSAGE, keys.slow, keys.rsa).replace(b"12.00", b"99.00")
    outcome = await asyncio.wait_for(verify_dkim(resolver, message, timeout=1.5), 5.0)
    assert [s.result for s in outcome.signatures] == ["temperror", "fail"]
    # Retrying may still find the slow key valid, so the message is temperror; the
    # tampered signature keeps its own verdict, in Authentication-Results too.
    assert outcome.result == "temperror"
    header = authentication_results_header("relay.test", None, outcome)
    assert "dkim=fail" in header and "dkim=temperror" in header


async def test_reasons_hold_no_python_reprs(server: DnsServer, keys: Keys) -> None:
    message = signed(MESSAGE, keys.rsa).replace(b"12.00", b"99.00")
    [sig] = (await verify(server, message)).signatures
    assert sig.result == "fail"
    assert "body hash" in sig.reason
    assert "b'" not in sig.reason and 'b"' not in sig.reason


# -- Large messages: the body hashed as it is read from disk, never whole -----------------


def large_message(size: int = 4 * 2**20) -> bytes:
    """A message with a Tail's worth of body, with what canonicalization changes: blanks
    at line ends and in runs, empty lines inside and at the end, 8-bit octets."""
    lines = [b"line %d of the report,\t with  blanks \t" % n for n in range(200)]
    lines += [b"", b"caf\xc3\xa9  au lait", b"", b"", b"   "]
    block = b"\r\n".join(lines) + b"\r\n"
    return MESSAGE + block * (size // len(block)) + b"\r\n\r\n"


def as_tail(message: bytes, directory: Path, at: int = 256 * 1024) -> tuple[bytes, Tail]:
    """``message`` as relay/inbound/protocol.py leaves a large one: its first ``at``
    octets in memory, the rest in a file."""
    path = directory / "tail"
    path.write_bytes(message[at:])
    return message[:at], Tail(path, len(message) - at, False, 0, False, False)


def split_inside_a_crlf(message: bytes) -> int:
    return message.index(b"\r\n", 256 * 1024) + 1


@contextlib.contextmanager
def traced_peak() -> Iterator[list[int]]:
    """The most memory Python allocated (in any thread) inside the block, in the list
    it gives once the block ends."""
    peak: list[int] = []
    tracemalloc.start()
    try:
        yield peak
        peak.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()


async def verify_large(server: DnsServer, message: bytes, directory: Path, at: int = 256 * 1024
                       ) -> DkimOutcome:
    head, tail = as_tail(message, directory, at)
    return await verify_dkim(resolver_for(server), head, timeout=5.0, tail=tail)


async def test_a_large_message_signed_from_its_tail_verifies_with_plain_dkimpy(
    server: DnsServer, keys: Keys, tmp_path: Path
) -> None:
    message = large_message()
    head, tail = as_tail(message, tmp_path, split_inside_a_crlf(message))
    signature = sign(head, [keys.rsa, keys.ed25519], DEFAULT_SIGNED_HEADERS, tail)
    whole = signature + message
    resolver = resolver_for(server)
    for idx in range(2):
        assert dkim.DKIM(whole).verify(idx=idx, dnsfunc=lambda n, timeout=5: dnsfunc(resolver, n))


def test_signing_from_the_tail_gives_dkimpys_signature_byte_for_byte(
    keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dkim.time, "time", lambda: 1_796_000_000.0)  # t= is the same
    message = large_message(2**20)
    head, tail = as_tail(message, tmp_path)
    include = [b"from", b"from"] + [h.encode() for h in DEFAULT_SIGNED_HEADERS if h != "from"]
    for key in (keys.rsa, keys.ed25519):
        expected = dkim.DKIM(message, signature_algorithm=key.algorithm.encode()).sign(
            key.selector.encode(), key.domain.encode(),
            pkcs1(key) if key.algorithm == "rsa-sha256" else ed25519_seed(key),
            canonicalize=(b"relaxed", b"relaxed"), include_headers=include,
        )
        assert sign(head, [key], DEFAULT_SIGNED_HEADERS, tail) == expected


def ed25519_seed(key: SigningKey) -> bytes:
    private = serialization.load_pem_private_key(key.private_key, password=None)
    return base64.b64encode(private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
        serialization.NoEncryption()))


@pytest.mark.parametrize("canonicalize", [
    (b"relaxed", b"relaxed"), (b"simple", b"simple"), (b"relaxed", b"simple"),
])
async def test_a_large_message_signed_by_dkimpy_passes_from_its_tail(
    server: DnsServer, keys: Keys, tmp_path: Path, canonicalize: tuple[bytes, bytes]
) -> None:
    message = large_message()
    whole = dkimpy_signature(keys.rsa, message, canonicalize=canonicalize) + message
    outcome = await verify_large(server, whole, tmp_path, split_inside_a_crlf(whole))
    assert (outcome.result, outcome.domain) == ("pass", DOMAIN)


async def test_a_large_message_changed_in_its_tail_fails(
    server: DnsServer, keys: Keys, tmp_path: Path
) -> None:
    message = signed(large_message(), keys.rsa, keys.ed25519)
    changed = message[:-1000] + message[-1000:].replace(b"report", b"REPORT", 1)
    outcome = await verify_large(server, changed, tmp_path)
    assert [s.result for s in outcome.signatures] == ["fail", "fail"]
    assert all("body hash mismatch" in s.reason for s in outcome.signatures)
    # Blanks changed in number only: relaxed does not mind.
    respaced = message[:-1000] + message[-1000:].replace(b"with  blanks", b"with blanks")
    assert (await verify_large(server, respaced, tmp_path)).result == "pass"


async def test_l_over_part_of_a_large_body_is_policy(
    server: DnsServer, keys: Keys, tmp_path: Path
) -> None:
    message = large_message()
    whole = dkimpy_signature(keys.rsa, message, length=True) + message
    assert (await verify_large(server, whole, tmp_path)).result == "pass"
    outcome = await verify_large(server, whole + b"appended\r\n", tmp_path)
    assert outcome.result == "policy"
    [sig] = outcome.signatures
    assert sig.reason.startswith("l=") and "covers part of a" in sig.reason


async def test_verifying_a_large_message_never_holds_it_whole(
    server: DnsServer, keys: Keys, tmp_path: Path
) -> None:
    head, tail = as_tail(signed(large_message(8 * 2**20), keys.rsa, keys.ed25519), tmp_path)
    resolver = resolver_for(server)
    with traced_peak() as peak:
        outcome = await verify_dkim(resolver, head, timeout=5.0, tail=tail)
    assert [s.result for s in outcome.signatures] == ["pass", "pass"]
    # The in-memory part and a few pieces of 256 KiB; read whole, it would be 8 MiB.
    assert peak[0] < 3 * 2**20, peak


def test_signing_a_large_message_never_holds_it_whole(keys: Keys, tmp_path: Path) -> None:
    head, tail = as_tail(large_message(8 * 2**20), tmp_path)
    with traced_peak() as peak:
        sign(head, [keys.rsa, keys.ed25519], DEFAULT_SIGNED_HEADERS, tail)
    assert peak[0] < 3 * 2**20, peak


async def test_verifying_a_large_message_also_hashes_its_body_for_signing(
    server: DnsServer, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dkim.time, "time", lambda: 1_796_000_000.0)  # t= is the same
    message = large_message()
    whole = dkimpy_signature(keys.rsa, message, canonicalize=(b"simple", b"simple")) + message
    head, tail = as_tail(whole, tmp_path)
    outcome = await verify_dkim(resolver_for(server), head, timeout=5.0, tail=tail,
                                also=[SIGNING_BODY])
    assert outcome.result == "pass"
    known = outcome.body_hashes[SIGNING_BODY]
    # Given that hash, signing does not read the tail again (its file is gone).
    gone = Tail(tmp_path / "gone", tail.size, False, 0, False, False)
    assert sign(head, [keys.rsa, keys.ed25519], DEFAULT_SIGNED_HEADERS, gone, known) == sign(
        head, [keys.rsa, keys.ed25519], DEFAULT_SIGNED_HEADERS, tail)


async def test_an_unsigned_large_message_is_not_read_by_verification(
    server: DnsServer, tmp_path: Path
) -> None:
    head, _ = as_tail(large_message(), tmp_path)
    gone = Tail(tmp_path / "gone", 4 * 2**20, False, 0, False, False)
    outcome = await verify_dkim(resolver_for(server), head, timeout=5.0, tail=gone,
                                also=[SIGNING_BODY])
    assert outcome == DkimOutcome("none") and not outcome.body_hashes
