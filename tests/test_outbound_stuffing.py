"""What DATA puts on the wire upstream: transparency dots and line ends."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from conftest import Sink

from relay.outbound.pool import Host
from relay.outbound.smarthosts import UpstreamSettings
from relay.outbound.transaction import dot_stuffed, transmit
from relay.queue.content import Content


@pytest.mark.parametrize("message", [
    b"",
    b"no final line end",
    b".first line\r\nsecond\r\n",
    b"a\r\n.\r\n..\r\n.x\r\nmid . dot\r\n",
    b"bare\nline\rends\r\n.after bare\n.x",
    b"\r\n\r\n.\r\n",
])
def test_dot_stuffing_matches_aiosmtplib(message: bytes):
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message))
    assert dot_stuffed(message) == expected


def test_a_clean_message_without_leading_dots_is_sent_as_it_is():
    message = b"Subject: x\r\n\r\nbody\r\n"
    assert dot_stuffed(message) is message


async def test_a_message_sent_from_its_file_in_pieces_is_stuffed_as_if_whole(
    tmp_path: Path, sink: Sink
):
    # Lines starting with a dot fall on every side of the piece boundaries.
    lines = [b".%d" % i + b"." * (i % 7) + b"x" * (i % 50) for i in range(3000)]
    message = b"Subject: pieces\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    path = tmp_path / "message"
    path.write_bytes(message)
    content = Content(path, len(message))
    pieces = [p async for p in content.pieces(piece=1000)]
    assert b"".join(pieces) == message and len(pieces) > 50
    assert all(p.endswith(b"\r\n") for p in pieces)
    settings = UpstreamSettings("default", hosts=(("127.0.0.1", sink.port),))
    host = Host(settings.members[0], settings, "relay.test")
    try:
        async with host.borrow() as conn:
            sent = await transmit(conn, "a@example.test", ["b@dest.test"], content, settings)
    finally:
        await host.close()
    assert [r.accepted for r in sent.results] == [True]
    [got] = sink.wait_messages(1)
    assert got.data == message
