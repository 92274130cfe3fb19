"""The SMTP listener: sessions from app servers, checked, answered and spooled."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay import replies
from relay.address import problem
from relay.config import Settings
from relay.listeners import ListenerSettings
from relay.replies import Reply
from relay.spool import Envelope as StoredEnvelope
from relay.spool import Spool, new_queue_id

log = logging.getLogger("relay.inbound")


class Session_(Session):
    """aiosmtpd's session, plus the settings snapshot this session started with."""

    settings: Settings


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with the settings snapshot taken when the client connects."""

    def _create_session(self) -> Session:
        session = Session_(self.loop)
        session.settings = self.event_handler.current()
        return session


def client_address(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else "unknown"


def header_safe(text: str) -> str:
    """Text fit for a header we write: no control characters, so no header injection."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def received_header(
    session: Session, envelope: Envelope, hostname: str, queue_id: str, when: float
) -> bytes:
    # RFC 5321 section 4.4 trace line; "with" keywords from RFC 3848.
    proto = "ESMTP" if session.extended_smtp else "SMTP"
    if session.ssl:
        proto += "S"
    if session.authenticated:
        proto += "A"
    helo = header_safe(session.host_name or "unknown")
    line = (
        f"Received: from {helo} ([{header_safe(client_address(session))}])\r\n"
        f"\tby {header_safe(hostname)} (policy-relay) with {proto} id {queue_id}"
    )
    if len(envelope.rcpt_tos) == 1:
        line += f"\r\n\tfor <{header_safe(envelope.rcpt_tos[0])}>"
    return f"{line}; {formatdate(when, localtime=True)}\r\n".encode("ascii")


def envelope_sender(envelope: Envelope) -> str:
    """The reverse-path, with the null sender as "" (aiosmtpd keeps it as "<>")."""
    sender = envelope.mail_from or ""
    return "" if sender == "<>" else sender


def has_bare_line_ending(data: bytes) -> bool:
    """True if DATA holds a CR or LF outside a CRLF pair, or a NUL.

    aiosmtpd 1.4.6 no longer splits messages on "\\n.\\r\\n" but leaves bare CR and LF in
    the content; passed on, they are the raw material of SMTP smuggling (RFC 5321
    section 2.3.8: CR and LF only as a pair).
    """
    crlf = data.count(b"\r\n")
    return b"\0" in data or data.count(b"\r") != crlf or data.count(b"\n") != crlf


class InboundHandler:
    """aiosmtpd handler for one listener; each handle_<VERB> returns the reply line."""

    def __init__(
        self,
        listener: ListenerSettings,
        current: Callable[[], Settings],
        spool: Spool,
        on_queued: Callable[[str], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.listener = listener
        self.current = current
        self.spool = spool
        self.on_queued = on_queued
        self.clock = clock

    async def handle_MAIL(
        self, server: SMTP, session: Session_, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        sender = "" if address == "<>" else address
        if sender and (why := problem(sender)):
            return self._refuse(
                session, "MAIL", replies.BAD_SENDER_SYNTAX, f"from=<{sender}> {why}"
            )
        # Keep aiosmtpd's "<>": it checks mail_from for truth before accepting RCPT.
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return str(replies.SENDER_OK)

    async def handle_RCPT(
        self, server: SMTP, session: Session_, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        settings = session.settings
        if why := problem(address):
            return self._refuse(
                session, "RCPT", replies.BAD_RECIPIENT_SYNTAX, f"to=<{address}> {why}"
            )
        if len(envelope.rcpt_tos) >= settings.max_recipients:
            return self._refuse(session, "RCPT", replies.TOO_MANY_RECIPIENTS, f"to=<{address}>")
        if not self._may_relay(session, settings):
            reply = replies.relay_denied(address)
            return self._refuse(
                session, "RCPT", reply,
                f"from=<{envelope.mail_from}> to=<{address}> helo=<{session.host_name}>",
            )
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return str(replies.RECIPIENT_OK)

    async def handle_DATA(self, server: SMTP, session: Session_, envelope: Envelope) -> str:
        data: bytes = envelope.original_content or b""
        if has_bare_line_ending(data):
            return self._refuse(
                session, "DATA", replies.BAD_LINE_ENDING, f"from=<{envelope.mail_from}>"
            )
        settings = session.settings
        now = self.clock()
        queue_id = new_queue_id()
        message = received_header(session, envelope, settings.smtp_hostname, queue_id, now) + data
        stored = StoredEnvelope(
            sender=envelope_sender(envelope),
            recipients=tuple(envelope.rcpt_tos),
            client_address=client_address(session),
            helo=session.host_name or "",
            listener=self.listener.name,
            sasl_username=str(session.auth_data or "") if session.authenticated else "",
            received_at=now,
        )
        try:
            await self.spool.store(queue_id, stored, message)
        except Exception:
            log.exception("%s: cannot write to the spool", queue_id)
            return str(replies.QUEUE_WRITE_ERROR)
        log.info(
            "%s: client=[%s], from=<%s>, size=%d, nrcpt=%d, listener=%s",
            queue_id, stored.client_address, stored.sender, len(message),
            len(stored.recipients), self.listener.name,
        )
        self.on_queued(queue_id)
        return str(replies.queued(queue_id))

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd would answer "500 Error: (Exception) ...": permanent, and it leaks
        # internals. A bug of ours is a temporary failure for the client.
        log.error("internal error in SMTP session", exc_info=error)
        return str(replies.LOCAL_ERROR)

    def _may_relay(self, session: Session_, settings: Settings) -> bool:
        try:
            ip = ipaddress.ip_address(client_address(session))
        except ValueError:
            return False
        return any(ip in net for net in settings.relay_networks)

    def _refuse(self, session: Session_, stage: str, reply: Reply, detail: str) -> str:
        log.info(
            "NOQUEUE: reject: %s from [%s]: %s; %s listener=%s",
            stage, client_address(session), reply, detail, self.listener.name,
        )
        return str(reply)


async def start_listener(
    listener: ListenerSettings, handler: InboundHandler, settings: Settings
) -> asyncio.Server:
    """Bind one listener in the running event loop (not aiosmtpd's threaded Controller)."""

    def factory() -> Any:
        return RelaySMTP(
            handler,
            hostname=settings.smtp_hostname,
            ident="ESMTP",
            data_size_limit=settings.max_message_size,
            enable_SMTPUTF8=False,
            decode_data=False,
        )

    loop = asyncio.get_running_loop()
    return await loop.create_server(factory, host=listener.host, port=listener.port)
