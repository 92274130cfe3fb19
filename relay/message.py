"""Checks of message bytes as received: line endings and line lengths; and the part of a
large message that went to disk as it arrived, read and written in pieces."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Tail:
    """What a large message holds past its first octets (relay/inbound/protocol.py keeps
    those in memory: the header section and the start of the body): a file in the
    spool's incoming directory, dot-unstuffed, and what the line checks found in it."""

    path: Path
    size: int
    bare_line_ending: bool
    # The longest line when one is over the session's max_line_length (or the reader's
    # limit, if lower); otherwise some length within those limits.
    longest_line: int
    eight_bit: bool  # an octet over 127
    dot_lines: bool  # a line that starts with a dot (once unstuffed)


# What a reader of a stored or large message holds of it at once (besides a large
# message's in-memory part).
PIECE = 256 * 1024


def pieces(start: bytes, tail: Tail | None, size: int = PIECE) -> Iterator[bytes]:
    """``start`` (e.g. the body part of a message's in-memory bytes), then the tail file
    in reads of ``size`` octets: for what must see every octet (a DKIM body hash), so
    that a large message is never read back into memory whole. Blocks on the file: call
    it in a worker thread."""
    yield start
    if tail is not None:
        with tail.path.open("rb") as file:
            while piece := file.read(size):
                yield piece


def write_all(fd: int, data: bytes) -> None:
    """All of `data` at `fd`'s offset (os.write may take less than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def has_bare_line_ending(data: bytes | bytearray) -> bool:
    """True if DATA holds a CR or LF outside a CRLF pair, or a NUL.

    aiosmtpd 1.4.6 no longer splits messages on "\\n.\\r\\n" but leaves bare CR and LF in
    the content; passed on, they are the raw material of SMTP smuggling (RFC 5321
    section 2.3.8: CR and LF only as a pair).
    """
    crlf = data.count(b"\r\n")
    return b"\0" in data or data.count(b"\r") != crlf or data.count(b"\n") != crlf


def longest_line(data: bytes | bytearray) -> int:
    """Octets in the longest line of `data`, CRLF not counted."""
    return max(map(len, data.split(b"\r\n")), default=0)


def has_long_line(data: bytes | bytearray, limit: int, exact: bool = False) -> bool:
    """True if a line of `data` has more than `limit` octets before its CRLF; a last
    line without CRLF counts only once it is that long.

    Steps from window to window (rfind in C) instead of splitting the message into
    lines. That takes every LF as a line end: with bare CR or LF in `data`, pass
    `exact` to split on CRLF only.
    """
    if exact:
        return any(len(line) > limit for line in data.split(b"\r\n"))
    end, start = len(data), 0
    while end - start > limit + 1:
        # The line starting here ends within the window if it is short enough; every
        # line between here and the window's last LF is shorter still.
        last_lf = data.rfind(b"\n", start, start + limit + 2)
        if last_lf < 0:
            return True
        start = last_lf + 1
    return end - start > limit and data.find(b"\n", start) < 0
