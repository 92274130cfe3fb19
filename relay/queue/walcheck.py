"""Reading SQLite's write-ahead log before SQLite does: committed transactions that a
damaged frame would make it drop without a word.

SQLite replays the WAL at open up to the first frame whose checksum or salt does not
match (https://sqlite.org/fileformat.html#the_write_ahead_log, "4.3 WAL Checksum
Algorithm"): every frame after it is ignored and the next checkpoint overwrites the log,
so commits stored after a damaged frame vanish silently. A crash (SIGKILL, power loss)
only ever tears the *end* of the log, in the transaction whose commit had not returned
(no 250 was given for it). So damage is a break in the chain that is followed by later
frames of the same log generation (same salts) that are themselves sound: those frames
were written, and synced, after the broken one, by commits that returned.

Each frame can be checked on its own, because its header stores the running checksum:
frame N verifies against the checksum stored in frame N-1's header, whatever frame N-1's
own contents are. A damaged WAL header makes SQLite ignore the whole log; it counts as
damage when frames of its generation follow.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

_HEADER = 32
_FRAME_HEADER = 24
_MAGIC_LITTLE = 0x377F0682  # checksums over little-endian words
_MAGIC_BIG = 0x377F0683


@dataclass(frozen=True, slots=True)
class WalDamage:
    """Where SQLite would stop replaying, and what it would drop after that point."""

    frame: int  # the first frame SQLite would not replay (1-based; 0: the log header)
    # Sound commit frames after it: a lower bound, since a commit frame whose own header
    # the damage reached cannot be told from any other frame.
    commits_lost: int

    def __str__(self) -> str:
        where = "its header" if self.frame == 0 else f"frame {self.frame}"
        return (f"write-ahead log damaged at {where}: at least {self.commits_lost} "
                "committed transaction(s) after it would be dropped")


def _checksum(data: bytes, big_endian: bool, s0: int, s1: int) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def wal_damage(path: Path) -> WalDamage | None:
    """The damage SQLite would silently skip over in the WAL at `path`, or None when
    replaying it loses nothing that was committed (including a log torn at its end)."""
    try:
        log = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(log) < _HEADER:
        return None
    magic, _, page_size, _, salt1, salt2, c0, c1 = struct.unpack(">8I", log[:_HEADER])
    if magic not in (_MAGIC_LITTLE, _MAGIC_BIG) or not 512 <= page_size <= 65536:
        # Without a readable header, frames cannot be told apart: anything after it?
        return WalDamage(0, 1) if len(log) > _HEADER else None
    big = magic == _MAGIC_BIG
    header_sound = _checksum(log[:24], big, 0, 0) == (c0, c1)
    frame_size = _FRAME_HEADER + page_size
    if not header_sound and len(log) >= _HEADER + _FRAME_HEADER:
        # The header's salts may be what was damaged: its generation is the first frame's.
        salt1, salt2 = struct.unpack(">2I", log[_HEADER + 8:_HEADER + 16])
    # Walk the frames as SQLite does; from the first break on, count the sound commits
    # that follow (each verified against its predecessor's stored checksum).
    broken_at = None if header_sound else 0
    previous = (c0, c1)
    commits_lost = 0
    count = (len(log) - _HEADER) // frame_size
    for n in range(count):
        start = _HEADER + n * frame_size
        header = log[start:start + _FRAME_HEADER]
        _, commit_size, s1, s2, f0, f1 = struct.unpack(">6I", header)
        ours = (s1, s2) == (salt1, salt2)
        sound = ours and _checksum(
            header[:8] + log[start + _FRAME_HEADER:start + frame_size], big, *previous
        ) == (f0, f1)
        if broken_at is None and not sound:
            if not ours:
                return None  # the rest is an earlier generation: SQLite rightly stops
            broken_at = n + 1
        elif broken_at is not None and sound and commit_size:
            commits_lost += 1
        previous = (f0, f1)
    if broken_at is None or not commits_lost:
        return None
    return WalDamage(broken_at, commits_lost)
