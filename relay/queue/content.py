"""A stored message's bytes, read from its spool file in pieces that end at line ends, so
that sending (or bouncing) a message never holds it whole in memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from relay.message import PIECE


@dataclass(frozen=True, slots=True)
class Checked:
    """What the listener found in a message's every octet as it arrived, so that its
    first delivery need not read the message again to find it out: CR and LF only come
    as CRLF pairs, with no NUL (else the message was refused); whether an octet is over
    127 (RFC 6152), and whether a line starts with a dot (RFC 5321 section 4.5.2: without
    one, the message goes upstream as it is, in pieces of any length)."""

    eight_bit: bool
    dot_lines: bool


@dataclass(frozen=True, slots=True)
class Content:
    """The bytes of one message: its spool file, or (for tests and tools) bytes at hand.
    `checked` when the listener has just stored them; a message read back from the
    spool (a retry, a restart) is looked at again."""

    path: Path | None
    size: int
    data: bytes = b""
    checked: Checked | None = None

    @classmethod
    def of(cls, data: bytes) -> Content:
        return cls(None, len(data), data)

    async def pieces(self, piece: int = PIECE, lines: bool = True) -> AsyncIterator[bytes]:
        """The bytes in order, each piece ending with a line end except maybe the last
        (so that a line never straddles two pieces: dot-stuffing looks at line starts);
        without `lines`, as the file gives them."""
        if self.path is None:
            if self.data:
                yield self.data
            return
        loop = asyncio.get_running_loop()
        f = await loop.run_in_executor(None, self.path.open, "rb")
        try:
            carry = b""
            while chunk := await loop.run_in_executor(None, f.read, piece):
                if not lines:
                    yield chunk
                    continue
                data = carry + chunk
                end = data.rfind(b"\n") + 1
                carry, data = data[end:], data[:end]
                if data:
                    yield data
            if carry:
                yield carry
        finally:
            f.close()

    async def eight_bit(self) -> bool:
        """Whether any octet is over 127 (RFC 6152: BODY=8BITMIME)."""
        if self.checked is not None:
            return self.checked.eight_bit
        async for data in self.pieces():
            if not data.isascii():
                return True
        return False

    async def head(self, limit: int) -> bytes:
        """The first `limit` bytes at most (a bounce quotes the header section only)."""
        if self.path is None:
            return self.data[:limit]
        loop = asyncio.get_running_loop()

        def read() -> bytes:
            assert self.path is not None
            with self.path.open("rb") as f:
                return f.read(limit)

        return await loop.run_in_executor(None, read)
