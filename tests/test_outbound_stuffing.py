"""What DATA puts on the wire upstream: transparency dots and line ends."""

from __future__ import annotations

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from relay.outbound.transaction import dot_stuffed


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
