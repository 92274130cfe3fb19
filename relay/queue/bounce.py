"""Delivery status notifications (RFC 3464) for recipients that failed for good."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate

from relay.headers import header_section
from relay.replies import UpstreamReply

# RFC 5322 section 2.1.1: lines of at most 998 octets; keep diagnostics well below.
_MAX_DIAGNOSTIC = 500


@dataclass(frozen=True, slots=True)
class Failure:
    """One recipient the notification reports on."""

    recipient: str
    reply: UpstreamReply  # the upstream's last reply, or what kept us from getting one
    remote_mta: str = ""  # host name of the upstream that gave it, "" if none did
    expired: bool = False  # failed because the queue lifetime ran out

    @property
    def status(self) -> str:
        """RFC 3463 status for the Status: field."""
        if self.expired:
            return "4.4.7"  # RFC 3463 section 3.5: delivery time expired
        if self.reply.status:
            return self.reply.status
        return "4.0.0" if self.reply.is_temporary else "5.0.0"


def _text(text: str, utf8: bool) -> str:
    """Text from the network for the report: one line, bounded; UTF-8 only in a global
    (RFC 6533) report, else non-ASCII as RFC 6533 section 3's \\x{HHHH} escapes."""
    text = "".join(c if c >= " " and c != "\x7f" else " " for c in text)[:_MAX_DIAGNOSTIC]
    if utf8 or text.isascii():
        return text
    return "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in text)


def _address(address: str, utf8: bool) -> str:
    """RFC 3464 section 2.3.2 / RFC 6533 section 3: rfc822 for ASCII addresses, else the
    utf-8 address type (raw in a global report, escaped in an ASCII one)."""
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {_text(address, utf8)}"


def message_id(queue_id: str, reporting_mta: str) -> str:
    """The Message-ID (without angle brackets) of the notification about `queue_id`."""
    return f"{queue_id}.dsn@{reporting_mta}"


def build(
    *,
    queue_id: str,
    reporting_mta: str,
    sender: str,
    arrival: float,
    failures: Sequence[Failure],
    original: bytes,
    now: float,
    utf8: bool = False,
) -> bytes:
    """The DSN as raw bytes (CRLF lines), ready for the spool.

    RFC 3464 section 2: a multipart/report (RFC 6522) with a human-readable part, a
    delivery-status part (one per-message block, then one block per recipient) and the
    original headers, which is enough to identify the message without sending its body
    back. With `utf8` (an address is not ASCII; the notification then needs SMTPUTF8)
    the parts are RFC 6533's message/global-delivery-status and message/global-headers;
    without it everything is ASCII.
    """
    # RFC 2046 section 5.1.1: at most 70 characters, none of them in the content.
    boundary = f"{queue_id}.{secrets.token_hex(12)}"
    date = formatdate(now, localtime=False)
    headers = header_section(original)
    eight_bit = not headers.isascii()

    human = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "The delivery report below says why.",
        "",
    ]
    for f in failures:
        why = "the message stayed undeliverable for too long" if f.expired else "refused"
        human.append(f"<{_text(f.recipient, utf8)}>: {why}: {_text(str(f.reply), utf8)}")

    status = [
        # RFC 3464 section 2.2: per-message fields.
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Queue-ID: {queue_id}",
        f"Arrival-Date: {formatdate(arrival, localtime=False)}",
    ]
    for f in failures:
        # RFC 3464 section 2.3: per-recipient fields, each block after a blank line.
        status += ["", f"Final-Recipient: {_address(f.recipient, utf8)}", "Action: failed",
                   f"Status: {f.status}"]
        if f.remote_mta:
            status.append(f"Remote-MTA: dns; {f.remote_mta}")
        if f.reply.code:
            status.append(f"Diagnostic-Code: smtp; {_text(str(f.reply), utf8)}")
        status.append(f"Last-Attempt-Date: {date}")

    if utf8:
        report_type, headers_type = "global-delivery-status", "message/global-headers"
    else:
        report_type, headers_type = "delivery-status", "text/rfc822-headers"
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {date}",
        f"Message-ID: <{message_id(queue_id, reporting_mta)}>",
        # RFC 3834 section 5: automatic responses must not trigger further ones.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f"Content-Type: multipart/report; report-type={report_type};",
        f' boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        f"Content-Type: text/plain; charset={'utf-8' if utf8 else 'us-ascii'}",
        *(["Content-Transfer-Encoding: 8bit"] if utf8 else []),
        "",
        *human,
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        f"Content-Type: message/{report_type}",
        *(["Content-Transfer-Encoding: 8bit"] if utf8 else []),
        "",
        *status,
        "",
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        f"Content-Type: {headers_type}",
        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}",
        "",
    ]
    tail = ["", f"--{boundary}--", ""]
    return ("\r\n".join(lines) + "\r\n").encode() + headers + "\r\n".join(tail).encode()
