"""The SMTP listener: sessions from app servers, checked against policy, answered and spooled."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
import time
from collections.abc import Callable
from email.utils import formatdate

from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import Envelope, Session

from relay import replies
from relay.address import problem
from relay.checks.services import CheckServices
from relay.config import Settings
from relay.headers import header_safe, header_stats, strip_forged_authentication_results
from relay.inbound.connlimits import ConnectionLimits
from relay.inbound.listeners import ListenerSettings
from relay.inbound.protocol import (
    DataBudget,
    RelaySession,
    RelaySMTP,
    client_address,
    declared_size,
    has_bare_line_ending,
    has_long_line,
    longest_line,
)
from relay.ops.metrics import Metrics
from relay.policy.session import SessionPolicy
from relay.queue.spool import Envelope as StoredEnvelope
from relay.queue.spool import Spool, new_queue_id
from relay.replies import Reply
from relay.runtime import Runtime

log = logging.getLogger("relay.inbound")

# An implicit-TLS client that never finishes its handshake is dropped after this long.
TLS_HANDSHAKE_TIMEOUT = 30.0


def received_header(
    session: Session, envelope: Envelope, hostname: str, queue_id: str, when: float
) -> bytes:
    # RFC 5321 section 4.4 trace line; "with" keywords from RFC 3848 and RFC 6531 3.7.3.
    proto = "UTF8SMTP" if envelope.smtp_utf8 else "ESMTP" if session.extended_smtp else "SMTP"
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
    return f"{line}; {_date(int(when))}\r\n".encode("ascii")


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    # RFC 5322 date-time; to the second, so a few cached values serve every message.
    return formatdate(second, localtime=True)


def envelope_sender(envelope: Envelope) -> str:
    """The reverse-path, with the null sender as "" (aiosmtpd keeps it as "<>")."""
    sender = envelope.mail_from or ""
    return "" if sender == "<>" else sender


class InboundHandler:
    """aiosmtpd handler for one listener; each handle_<VERB> returns the reply line.

    The handler checks what no policy may allow (syntax, limits, smuggling); whether a
    client may relay, and what happens to its mail, is the policy's decision
    (relay.pipeline runs it at MAIL, each RCPT and the end of DATA).
    """

    def __init__(
        self,
        listener: ListenerSettings,
        current: Callable[[], Runtime],
        services: Callable[[], CheckServices],
        spool: Spool,
        on_queued: Callable[[str, StoredEnvelope, bytes], None],
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        budget: DataBudget | None = None,
    ) -> None:
        self.listener = listener
        # One budget for all listeners of the process (relay.app passes it in).
        self.budget = budget or DataBudget(current().settings.max_data_memory)
        self.current = current
        self.services = services
        self.spool = spool
        self.on_queued = on_queued
        self.metrics = metrics
        self.clock = clock

    def _policy(self, server: RelaySMTP, session: RelaySession) -> SessionPolicy:
        if session.policy is None:
            session.policy = SessionPolicy(
                session.runtime.policy, session.services, session.settings.smtp_hostname,
                self.listener.name, client_address(session),
                on_decision=lambda stage, d: self.metrics.decision(stage, d.rule, d.action),
            )
        return session.policy

    async def handle_PROXY(
        self, server: RelaySMTP, session: RelaySession, envelope: Envelope, proxy: ProxyData
    ) -> bool:
        return server.accept_proxy(proxy)

    async def handle_MAIL(
        self, server: RelaySMTP, session: RelaySession, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:
        sender = "" if address == "<>" else address
        if sender and not sender.isascii() and not envelope.smtp_utf8:
            return self._refuse(session, "MAIL", replies.NEEDS_SMTPUTF8, f"from=<{sender}>")
        if sender and (why := problem(sender, utf8=envelope.smtp_utf8)):
            return self._refuse(
                session, "MAIL", replies.BAD_SENDER_SYNTAX, f"from=<{sender}> {why}"
            )
        size = declared_size(options)
        if why := self._storage_short(session.settings, size):
            return self._refuse(session, "MAIL", replies.INSUFFICIENT_STORAGE, why)
        reply = await self._policy(server, session).mail(
            sender, sasl_username(session), size or None, server.tls_active
        )
        if reply is not None:
            return self._refuse(session, "MAIL", reply, f"from=<{sender}>")
        # Keep aiosmtpd's "<>": it checks mail_from for truth before accepting RCPT.
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return str(replies.SENDER_OK)

    async def handle_RCPT(
        self, server: RelaySMTP, session: RelaySession, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:
        settings = session.settings
        if not address.isascii() and not envelope.smtp_utf8:
            return self._refuse(session, "RCPT", replies.NEEDS_SMTPUTF8, f"to=<{address}>")
        if why := problem(address, utf8=envelope.smtp_utf8):
            return self._refuse(
                session, "RCPT", replies.BAD_RECIPIENT_SYNTAX, f"to=<{address}> {why}"
            )
        if len(envelope.rcpt_tos) >= settings.max_recipients:
            return self._refuse(session, "RCPT", replies.TOO_MANY_RECIPIENTS, f"to=<{address}>")
        decision = await self._policy(server, session).rcpt(address, tuple(envelope.rcpt_tos))
        if decision.refused and decision.reply is not None:
            self._count_limit(session, decision.rule)
            return self._refuse(
                session, "RCPT", decision.reply,
                f"from=<{envelope.mail_from}> to=<{address}> helo=<{session.host_name}>",
                decision.rule,
            )
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return str(replies.RECIPIENT_OK)

    async def handle_DATA(
        self, server: RelaySMTP, session: RelaySession, envelope: Envelope
    ) -> str:
        data: bytes = envelope.original_content or b""
        sender = f"from=<{envelope.mail_from}>"
        if has_bare_line_ending(data):
            return self._refuse(session, "DATA", replies.BAD_LINE_ENDING, sender)
        settings = session.settings
        if has_long_line(data, settings.max_line_length):
            # RelaySMTP's check on the wire allows one octet more, for a dot-stuffed line.
            return self._refuse(session, "DATA", replies.LINE_TOO_LONG,
                                f"{sender} line of {longest_line(data)} octets")
        header_size, hops = header_stats(data)
        if header_size > settings.max_header_size:
            return self._refuse(session, "DATA", replies.HEADER_TOO_BIG,
                                f"{sender} header size {header_size}")
        if hops >= settings.max_hops:
            # RFC 5321 section 6.3: count Received: fields to break mail loops.
            return self._refuse(session, "DATA", replies.TOO_MANY_HOPS, f"{sender} hops {hops}")
        our_id = settings.checks.authserv_id or settings.smtp_hostname
        data, forged = strip_forged_authentication_results(data, our_id)
        queue_id = new_queue_id()
        if forged:
            log.info("%s: removed %d Authentication-Results header(s) claiming to be ours",
                     queue_id, forged)
        policy = self._policy(server, session)
        verdict = await policy.data(tuple(envelope.rcpt_tos), data)
        self._count_checks(policy)
        if verdict.action in ("reject", "tempfail") and verdict.reply is not None:
            self._count_limit(session, verdict.rule)
            return self._refuse(session, "DATA", verdict.reply, sender, verdict.rule)
        stored = StoredEnvelope(
            sender=envelope_sender(envelope),
            recipients=tuple(envelope.rcpt_tos),
            client_address=client_address(session),
            helo=session.host_name or "",
            listener=self.listener.name,
            sasl_username=sasl_username(session),
            received_at=self.clock(),
            route=verdict.route or "default",
            hold=verdict.action == "hold",
            smtputf8=bool(envelope.smtp_utf8),
        )
        if verdict.action == "discard":
            # Accepted and dropped, as the rule says; the client cannot tell.
            log.info("%s: client=[%s], from=<%s>, nrcpt=%d, rule=%s, discard",
                     queue_id, stored.client_address, stored.sender, len(stored.recipients),
                     verdict.rule)
            return str(replies.queued(queue_id))
        received = received_header(session, envelope, settings.smtp_hostname, queue_id,
                                   stored.received_at)
        message = received + verdict.prepend + data
        try:
            await self.spool.store(queue_id, stored, message)
        except Exception:
            log.exception("%s: cannot write to the spool", queue_id)
            return str(replies.QUEUE_WRITE_ERROR)
        self.metrics.message_received(self.listener.name)
        log.info(
            "%s: client=[%s], from=<%s>, size=%d, nrcpt=%d, listener=%s, rule=%s%s",
            queue_id, stored.client_address, stored.sender, len(message),
            len(stored.recipients), self.listener.name, verdict.rule,
            ", hold" if stored.hold else "",
        )
        if not stored.hold:
            self.on_queued(queue_id, stored, message)
        return str(replies.queued(queue_id))

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd would answer "500 Error: (Exception) ...": permanent, and it leaks
        # internals. A bug of ours is a temporary failure for the client.
        log.error("internal error in SMTP session", exc_info=error)
        return str(replies.LOCAL_ERROR)

    def _count_checks(self, policy: SessionPolicy) -> None:
        if policy.checks.spf_outcome is not None:
            self.metrics.spf_result(policy.checks.spf_outcome.result)
        if policy.checks.dkim_outcome is not None:
            self.metrics.dkim_result(policy.checks.dkim_outcome.result)

    def _count_limit(self, session: RelaySession, rule_name: str) -> None:
        limit = session.runtime.policy.over_limit_of(rule_name)
        if limit is not None:
            self.metrics.ratelimit_exceeded(limit)

    def _storage_short(self, settings: Settings, declared: int) -> str | None:
        # Postfix queue_minfree: refuse at MAIL (452 4.3.1) rather than fail after DATA.
        try:
            st = os.statvfs(settings.spool_path)
        except OSError as exc:
            return f"cannot stat the spool: {exc.strerror}"
        free = st.f_bavail * st.f_frsize
        if free < settings.min_free_space + declared:
            return f"free space {free} below {settings.min_free_space} + size {declared}"
        return None

    def _refuse(
        self, session: RelaySession, stage: str, reply: Reply, detail: str, rule: str = ""
    ) -> str:
        log.info(
            "NOQUEUE: reject: %s from [%s]: %s; %s listener=%s%s",
            stage, client_address(session), reply, detail, self.listener.name,
            f" rule={rule}" if rule else "",
        )
        self.metrics.rejected(stage.lower(), reply.code)
        return str(reply)


def sasl_username(session: Session) -> str:
    return str(session.auth_data or "") if session.authenticated else ""


async def start_listener(
    listener: ListenerSettings,
    handler: InboundHandler,
    limits: ConnectionLimits,
    tls: ssl.SSLContext | None = None,
    reuse_port: bool = False,
) -> asyncio.Server:
    """Bind one listener in the running event loop (not aiosmtpd's threaded Controller);
    with `reuse_port`, several worker processes share its port (SO_REUSEPORT)."""

    def factory() -> RelaySMTP:
        return RelaySMTP(handler, limits, tls)

    loop = asyncio.get_running_loop()
    if listener.implicit_tls:
        return await loop.create_server(
            factory, host=listener.host, port=listener.port, ssl=tls,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT, reuse_port=reuse_port or None,
        )
    return await loop.create_server(factory, host=listener.host, port=listener.port,
                                    reuse_port=reuse_port or None)
