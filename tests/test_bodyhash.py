"""The streaming DKIM body hash (relay/checks/bodyhash.py) against dkimpy's own body
canonicalization and hash over the whole body, whatever the pieces it is fed in."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

import dkim
import pytest
from dkim.canonicalization import CanonicalizationPolicy

from relay.checks.bodyhash import BodyCanonicalizer, BodyHashSpec, hash_body
from relay.checks.dkim import split_message

EDGE_CASES = [
    b"",
    b"\r\n",
    b"\r\n\r\n\r\n",
    b"text\r\n",
    b"text",  # no final CRLF
    b"text  \t",  # ... and trailing blanks on that last line
    b"  \t \r\n",  # a line of blanks only: empty once relaxed
    b"a \t  b\t\tc  \r\n",
    b"a\r\n\r\n\r\nb\r\n\r\n",  # empty lines inside are kept, at the end dropped
    b"\r\n\r\ntext\r\n",
    b" \r\n \r\n",
    b"bare\rcr\r\r\n\r",
    b"lf\nonly\n\n",
    b"\xff\xfe 8-bit \x80 octets\t\r\n\xc3\xa9\r\n",
    b"x" * 1000 + b" " * 1000 + b"\r\n" * 1000,
]
# Octets that make the cases: blanks, line ends, bare CR and LF, and 8-bit octets.
ALPHABET = [b"a", b"b", b" ", b"  ", b"\t", b"\r\n", b"\r\n\r\n", b"\r", b"\n", b"\xe9", b"\x00"]
PIECE_SIZES = [1, 2, 3, 7, 64, 1 << 20]


def random_bodies(count: int, seed: int = 6376) -> list[bytes]:
    rng = random.Random(seed)
    return [
        b"".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 60))) for _ in range(count)
    ]


def dkimpy_body(body: bytes) -> bytes:
    """The body as dkimpy hashes it: what its message parser makes of it."""
    return dkim.rfc822_parse(b"Subject: x\r\n\r\n" + body)[1]


def dkimpy_canonical(body: bytes, canonicalization: str) -> bytes:
    policy = CanonicalizationPolicy.from_c_value(f"relaxed/{canonicalization}".encode())
    return policy.canonicalize_body(dkimpy_body(body))


def in_pieces(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def streamed(body: bytes, canonicalization: str, size: int) -> bytes:
    canonicalizer = BodyCanonicalizer(canonicalization)  # type: ignore[arg-type]
    out = b"".join(canonicalizer.feed(piece) for piece in in_pieces(body, size))
    return out + canonicalizer.finish()


@pytest.mark.parametrize("canonicalization", ["simple", "relaxed"])
@pytest.mark.parametrize("size", PIECE_SIZES)
def test_the_canonical_body_is_dkimpys_whatever_the_pieces(canonicalization: str, size: int):
    for body in EDGE_CASES + random_bodies(400):
        assert streamed(body, canonicalization, size) == dkimpy_canonical(
            body, canonicalization
        ), body


def test_the_empty_body_rules_of_rfc_6376():
    # Section 3.4.3: simple makes an empty body one CRLF; 3.4.4: relaxed keeps it empty.
    for empty in (b"", b"\r\n", b"\r\n" * 5):
        assert streamed(empty, "simple", 1) == b"\r\n"
        assert streamed(empty, "relaxed", 1) == b""
    assert streamed(b" \t \r\n\r\n", "relaxed", 1) == b""


@pytest.mark.parametrize("size", [1, 5, 4096])
def test_every_hash_of_one_pass_matches_dkimpys(size: int):
    rng = random.Random(size)
    for body in EDGE_CASES + random_bodies(60, seed=size):
        specs = [
            BodyHashSpec(canonicalization, algorithm, limit)
            for canonicalization in ("simple", "relaxed")
            for algorithm in ("sha256", "sha1")
            for limit in (None, 0, rng.randrange(0, 40), len(body) + 10)
        ]
        got = hash_body(specs, in_pieces(body, size))
        assert set(got) == set(specs)
        for spec in specs:
            canonical = dkimpy_canonical(body, spec.canonicalization)
            signed = canonical if spec.limit is None else canonical[: spec.limit]
            assert got[spec].digest == hashlib.new(spec.algorithm, signed).digest(), (body, spec)
            assert got[spec].canonical_length == len(canonical)


@pytest.mark.parametrize("canonicalization", ["simple", "relaxed"])
def test_empty_lines_and_blanks_are_held_as_a_count_and_two_octets(canonicalization: str):
    # Half a megabyte of empty lines, then of blanks: nothing comes out until a line
    # with content follows them.
    canonicalizer = BodyCanonicalizer(canonicalization)  # type: ignore[arg-type]
    empty_lines = b"\r\n" * 2**18
    for piece in in_pieces(empty_lines, 4096):
        assert canonicalizer.feed(piece) == b""
    if canonicalization == "relaxed":
        for piece in in_pieces(b" \t" * 2**18, 4096):
            assert canonicalizer.feed(piece) == b""
        assert len(canonicalizer._carry) <= 2
        assert canonicalizer.feed(b"x\r\n") + canonicalizer.finish() == empty_lines + b" x\r\n"
    else:
        assert canonicalizer.feed(b"x\r\n") + canonicalizer.finish() == empty_lines + b"x\r\n"


def test_without_specs_the_body_is_not_read():
    def untouchable() -> Iterator[bytes]:
        raise AssertionError("read")
        yield b""

    assert hash_body([], untouchable()) == {}


@pytest.mark.parametrize(("message", "header", "body"), [
    (b"A: b\r\n\r\nbody\r\n", b"A: b\r\n\r\n", b"body\r\n"),
    (b"A: b\n\nbody\n", b"A: b\n\n", b"body\n"),
    (b"A: b\r\n\nbody", b"A: b\r\n\n", b"body"),
    (b"A: b\r\r\n\r\nbody", b"A: b\r\r\n\r\n", b"body"),  # a bare CR does not end a line
    (b"\r\nbody\r\n", b"\r\n", b"body\r\n"),  # an empty header section
    (b"A: b\r\n", b"A: b\r\n", b""),  # no empty line: all header
])
def test_the_header_section_ends_where_dkimpys_parser_ends_it(
    message: bytes, header: bytes, body: bytes
):
    assert split_message(message) == (header, body)
    assert dkim.rfc822_parse(message) == (dkim.rfc822_parse(header)[0], dkimpy_body(body))
