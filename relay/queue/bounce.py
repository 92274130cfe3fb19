"""Delivery status notifications (RFC 3464) for recipients that failed for good."""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate

_STATUS = re.compile(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")
# RFC 5322 section 2.1.1: lines of at most 998 octets; keep diagnostics well below.
_MAX_DIAGNOSTIC = 500


@dataclass(frozen=True, slots=True)
class Failure:
    """One recipient the notification reports on."""

    recipient: str
    reply: str  # the upstream's last reply, "550 5.1.1 No such user"
    remote_mta: str = ""  # host name of the upstream that gave it, "" if none did
    expired: bool = False  # failed because the queue lifetime ran out

    @property
    def status(self) -> str:
        """RFC 3463 status for the Status: field."""
        if self.expired:
            return "4.4.7"  # RFC 3463 section 3.5: delivery time expired
        if m := _STATUS.match(self.reply):
            return m.group(1)
        code = self.reply[:1]
        return f"{code}.0.0" if code in "45" and code else "5.0.0"


def _clean(text: str) -> str:
    # Reply text comes from the network: one line, ASCII, bounded.
    text = "".join(c if " " <= c <= "~" else " " for c in text)
    return text[:_MAX_DIAGNOSTIC]


def header_section(message: bytes) -> bytes:
    """The original message's header block, without the blank line after it."""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


def build(
    *,
    queue_id: str,
    reporting_mta: str,
    sender: str,
    arrival: float,
    failures: Sequence[Failure],
    original: bytes,
    now: float,
) -> bytes:
    """The DSN as raw bytes (CRLF lines), ready for the spool.

    RFC 3464 section 2: a multipart/report (RFC 6522) with a human-readable part, a
    message/delivery-status part (one per-message block, then one block per recipient)
    and the original headers as text/rfc822-headers, which is enough to identify the
    message without sending its body back.
    """
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{reporting_mta}"
    date = formatdate(now, localtime=False)
    headers = header_section(original)
    eight_bit = any(b > 127 for b in headers)

    human = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "The delivery report below says why.",
        "",
    ]
    for f in failures:
        why = "the message stayed undeliverable for too long" if f.expired else "refused"
        human.append(f"<{f.recipient}>: {why}: {_clean(f.reply)}")

    status = [
        # RFC 3464 section 2.2: per-message fields.
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Queue-ID: {queue_id}",
        f"Arrival-Date: {formatdate(arrival, localtime=False)}",
    ]
    for f in failures:
        # RFC 3464 section 2.3: per-recipient fields, each block after a blank line.
        status += ["", f"Final-Recipient: rfc822; {f.recipient}", "Action: failed",
                   f"Status: {f.status}"]
        if f.remote_mta:
            status.append(f"Remote-MTA: dns; {f.remote_mta}")
        if f.reply and f.reply[:1] in "2345":
            status.append(f"Diagnostic-Code: smtp; {_clean(f.reply)}")
        status.append(f"Last-Attempt-Date: {date}")

    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {date}",
        f"Message-ID: <{queue_id}.dsn@{reporting_mta}>",
        # RFC 3834 section 5: automatic responses must not trigger further ones.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        *human,
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        *status,
        "",
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers",
        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}",
        "",
    ]
    tail = ["", f"--{boundary}--", ""]
    return ("\r\n".join(lines) + "\r\n").encode() + headers + "\r\n".join(tail).encode()
