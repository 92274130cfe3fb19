"""DKIM body hashes computed piece by piece (RFC 6376 sections 3.4.3, 3.4.4 and 3.7), so
that a large message is hashed as it is read from disk, never held whole.

The result equals dkimpy's ``CanonicalizationPolicy.canonicalize_body`` followed by the
hash, on the whole body: tests/test_bodyhash.py compares the two. That includes dkimpy's
reading of line ends (every LF is a line end, a CR before it belongs to it: its
``rfc822_parse``) and of a last line without CRLF (relaxed compresses its whitespace but
keeps a trailing run, then adds the CRLF).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Canonicalization = Literal["simple", "relaxed"]

_CRLF = b"\r\n"
_WSP = b" \t"


@dataclass(frozen=True, slots=True)
class BodyHashSpec:
    """One body hash a signature needs: how the body is canonicalized, the hashlib name of
    the hash, and the l= limit (octets of canonical body hashed; None: all of it)."""

    canonicalization: Canonicalization
    algorithm: str
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class BodyHash:
    digest: bytes
    canonical_length: int  # of the whole canonical body, whatever the limit


class BodyCanonicalizer:
    """Canonicalizes a body fed in pieces of any size: ``feed`` returns the canonical
    octets that are certain so far, ``finish`` the rest.

    Held back between pieces: a CR that may start a CRLF, a whitespace run (relaxed: it
    is dropped at a line end, else one SP) and a count of empty lines, which are dropped
    at the end of the body (RFC 6376 section 3.4.3) and written out only when a line
    with content follows. So what is held is a few octets and a number, however many
    empty lines or blanks a client sends.
    """

    def __init__(self, canonicalization: Canonicalization) -> None:
        self.relaxed = canonicalization == "relaxed"
        self._carry = b""  # the unfinished end of the last piece (at most " \r")
        self._empty_lines = 0  # empty lines not yet written
        self._in_line = False  # part of the current line was already written
        self._written = False  # any line written at all

    def feed(self, piece: bytes) -> bytes:
        data = self._carry + piece
        last_lf = data.rfind(b"\n")
        if last_lf < 0:
            return self._partial(data)
        return self._lines(data[: last_lf + 1]) + self._partial(data[last_lf + 1 :])

    def finish(self) -> bytes:
        rest, self._carry = self._carry, b""
        if rest or self._in_line:
            # A last line without CRLF: RFC 6376 sections 3.4.3 and 3.4.4 add one.
            self._in_line = False
            return self._line_start() + rest + _CRLF
        if not self.relaxed and not self._written:
            # Section 3.4.3: simple turns an empty body into one CRLF; section 3.4.4:
            # relaxed keeps it empty.
            self._written = True
            return _CRLF
        return b""

    def _lines(self, data: bytes) -> bytes:
        """Whole lines (``data`` ends with LF): what they contribute, their trailing
        empty lines held back."""
        if data.count(b"\n") != data.count(_CRLF):
            # dkimpy's rfc822_parse: every LF ends a line, with the CR before it if any.
            data = data.replace(_CRLF, b"\n").replace(b"\n", _CRLF)
        if self.relaxed:
            data = _reduce_blanks(data)
        content, empty = _split_trailing_empty_lines(data)
        if not content and not self._in_line:
            self._empty_lines += empty
            return b""
        # The first CRLF of the run ends the line with content before it.
        out = self._line_start() + content + _CRLF
        self._in_line, self._empty_lines = False, empty - 1
        return out

    def _partial(self, data: bytes) -> bytes:
        """The start of a line whose end has not arrived: written except for what its
        end may still change."""
        keep = len(data)
        if data.endswith(b"\r"):
            keep -= 1  # may be the CR of a CRLF
        if self.relaxed:
            keep = len(data[:keep].rstrip(_WSP))  # dropped if the line ends here
            head = _reduce_blanks(data[:keep])
            # Any run of blanks canonicalizes like a single SP: hold just that.
            held = data[keep:]
            self._carry = (b" " if held[:1] in (b" ", b"\t") else b"") + held.lstrip(_WSP)
        else:
            head, self._carry = data[:keep], data[keep:]
        if not head:
            return b""
        out = self._line_start() + head
        self._in_line = True
        return out

    def _line_start(self) -> bytes:
        """The empty lines held back, now that a line with content follows them."""
        out = _CRLF * self._empty_lines
        self._empty_lines, self._written = 0, True
        return out


def _reduce_blanks(data: bytes) -> bytes:
    """RFC 6376 section 3.4.4 a: each run of WSP as one SP, and none before a CRLF.
    bytes.replace rather than re.sub, which makes an object per match: 40 times the
    size of a piece dense with blanks. A run of n blanks takes log2(n) rounds."""
    data = data.replace(b"\t", b" ")
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data.replace(b" \r\n", _CRLF)


def _split_trailing_empty_lines(data: bytes) -> tuple[bytes, int]:
    """``data`` (whole CRLF lines) as the part before its last run of CRLFs and the
    number of CRLFs in that run. Found with C-speed scans: a body of nothing but empty
    lines costs no Python loop per line."""
    stripped = len(data.rstrip(b"\r\n"))
    run = data[stripped:]
    # Every LF has its CR by now, so a doubled CR marks the last bare CR (content).
    bare_cr = run.rfind(b"\r\r")
    pairs = (len(run) - (bare_cr + 1)) // 2
    return data[: len(data) - 2 * pairs], pairs


@dataclass(slots=True)
class _Limited:
    """A hash over at most ``limit`` octets of what it is given (RFC 6376 l=)."""

    hasher: Any
    limit: int | None
    taken: int = field(default=0)

    def update(self, data: bytes) -> None:
        if self.limit is not None:
            data = data[: max(self.limit - self.taken, 0)]
        self.taken += len(data)
        self.hasher.update(data)


def hash_body(
    specs: Iterable[BodyHashSpec], pieces: Iterable[bytes]
) -> dict[BodyHashSpec, BodyHash]:
    """Every body hash in ``specs``, in one pass over the body given as ``pieces``: one
    canonicalizer per canonicalization, feeding one hash per (algorithm, limit). With
    no specs, ``pieces`` is not read at all."""
    wanted = set(specs)
    if not wanted:
        return {}
    canonicalizers = {c: BodyCanonicalizer(c) for c in {s.canonicalization for s in wanted}}
    hashes = {s: _Limited(hashlib.new(s.algorithm), s.limit) for s in wanted}
    lengths = dict.fromkeys(canonicalizers, 0)

    def take(canonicalization: Canonicalization, canonical: bytes) -> None:
        lengths[canonicalization] += len(canonical)
        for spec, limited in hashes.items():
            if spec.canonicalization == canonicalization:
                limited.update(canonical)

    for piece in pieces:
        for canonicalization, canonicalizer in canonicalizers.items():
            take(canonicalization, canonicalizer.feed(piece))
    for canonicalization, canonicalizer in canonicalizers.items():
        take(canonicalization, canonicalizer.finish())
    return {
        s: BodyHash(limited.hasher.digest(), lengths[s.canonicalization])
        for s, limited in hashes.items()
    }
