"""The SMTP listener: sessions from app servers, checked against policy, answered and spooled."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
from collections.abc import Sequence
from email.utils import formatdate

from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import Envelope, Session

from relay import replies
from relay.checks.services import SessionChecks
from relay.events import outcomes
from relay.headers import fold, header_safe, header_section
from relay.inbound.context import ListenerContext
from relay.inbound.protocol import RelaySMTP, client_address, declared_size
from relay.message import Tail, has_bare_line_ending
from relay.ops.logs import refusal_line
from relay.policy.rewrite import Copy
from relay.policy.session import PolicySession, Refusal, trace_lines
from relay.queue.content import Checked
from relay.queue.spool import Envelope as StoredEnvelope
from relay.queue.spool import SpoolError, new_queue_id
from relay.replies import Reply

log = logging.getLogger("relay.inbound")

# An implicit-TLS client that never finishes its handshake is dropped after this long.
TLS_HANDSHAKE_TIMEOUT = 30.0


def received_header(
    session: Session, envelope: Envelope, hostname: str, queue_id: str, when: float,
    recipients: Sequence[str] | None = None,
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
    # The recipients as stored (rewritten); archive copies are never named.
    recipients = envelope.rcpt_tos if recipients is None else recipients
    if len(recipients) == 1:
        line += f"\r\n\tfor <{header_safe(recipients[0])}>"
    # Folded at 78 (RFC 5322 section 2.1.1): a long HELO name or recipient moves to a
    # continuation line of its own.
    return fold(f"{line}; {_date(int(when))}").encode("ascii")


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    # RFC 5322 date-time; to the second, so a few cached values serve every message.
    return formatdate(second, localtime=True)


class InboundHandler:
    """aiosmtpd handler for one listener; each handle_<VERB> returns the reply line.

    What a command gets for an answer is decided by the session model
    (relay.policy.session), the same one `policy-relay test` runs; this handler feeds it
    the commands, logs refusals, and stores what it accepts.
    """

    def __init__(self, context: ListenerContext) -> None:
        self.context = context
        self.listener = context.listener

    def start_session(self, client: str, tls: bool) -> PolicySession:
        """A session's policy state, created once the client is known (after PROXY)."""
        context = self.context
        return PolicySession(
            context.current, SessionChecks(context.services), client, self.listener.name,
            on_decision=lambda stage, d: context.metrics.decision(stage, d.rule, d.action),
            on_refusal=lambda refusal: self._refused(client, refusal),
            on_unsigned=lambda why: context.metrics.dkim_unsigned(),
        )

    async def handle_PROXY(
        self, server: RelaySMTP, session: Session, envelope: Envelope, proxy: ProxyData
    ) -> bool:
        return await server.accept_proxy(proxy)

    async def helo(self, server: RelaySMTP, name: str) -> Reply | None:
        """EHLO or HELO: None to answer as usual, or the policy's refusal."""
        return await server.policy().helo(name, server.tls_active)

    async def handle_HELO(
        self, server: RelaySMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        refusal = await self.helo(server, hostname)
        if refusal is not None:
            return str(refusal)
        session.host_name = hostname  # aiosmtpd sets it only when there is no hook
        return f"250 {server.hostname}"

    async def handle_MAIL(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:
        sender = "" if address == "<>" else address
        size = declared_size(options)
        reply = await server.policy().mail(
            sender, size=size or None, smtputf8=bool(envelope.smtp_utf8),
            sasl_username=sasl_username(session), tls=server.tls_active,
        )
        if reply.code == replies.SENDER_OK.code:
            # Keep aiosmtpd's "<>": it checks mail_from for truth before accepting RCPT.
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return str(reply)

    async def handle_RCPT(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:
        reply = await server.policy().rcpt(address)
        if reply.code == replies.RECIPIENT_OK.code:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return str(reply)

    async def handle_DATA(
        self, server: RelaySMTP, session: Session, envelope: Envelope
    ) -> str:
        policy = server.policy()
        queue_id = new_queue_id()
        verdict = await policy.data(envelope.original_content or b"", queue_id, server.tail)
        self._count_checks(policy)
        if verdict.refused and verdict.reply is not None:
            return str(verdict.reply)
        context = self.context
        stored = StoredEnvelope(
            sender=verdict.sender,
            recipients=verdict.recipients,
            client_address=policy.facts.client_address,
            helo=policy.facts.helo_name,
            listener=self.listener.name,
            sasl_username=policy.facts.sasl_username,
            received_at=context.clock(),
            route=verdict.route or "default",
            hold=verdict.action == "hold",
            smtputf8=bool(envelope.smtp_utf8),
        )
        msgid = message_id(verdict.message)
        if verdict.action == "discard":
            # Accepted and dropped, as the rule says; the client cannot tell.
            log.info("%s: client=[%s], from=<%s>, nrcpt=%d, rule=%s, discard",
                     queue_id, stored.client_address, stored.sender, len(stored.recipients),
                     verdict.rule)
            context.spool.post([outcomes.discarded(queue_id, stored, msgid, verdict.rule)])
            return str(replies.queued(queue_id))
        received = received_header(session, envelope, policy.runtime.settings.smtp_hostname,
                                   queue_id, stored.received_at, stored.recipients)
        # The headers to prepend and the message are written one after the other, never
        # joined: a copy of a large message would double what it holds in memory.
        parts = (received + verdict.prepend, verdict.message)
        size = sum(len(part) for part in parts) + (verdict.tail.size if verdict.tail else 0)
        events = outcomes.received(queue_id, stored, msgid, size, verdict.rule,
                                   trace_lines(policy.walks))
        copies = archive_copies(stored, verdict.copies)
        copy_events = [
            outcomes.received(copy_id, copy, msgid, size, archive.rule,
                              [f"archive copy of {queue_id}"])
            for (copy_id, copy), archive in zip(copies, verdict.copies, strict=True)
        ]
        try:
            contents = await context.spool.store(queue_id, stored, parts,
                                      verdict.tail.path if verdict.tail else None,
                                      events=events,
                                      copies=list(zip(copies, copy_events, strict=True)))
        except SpoolError:
            # The spool logs the condition when it starts and ends; one line per message.
            log.info("NOQUEUE: reject: DATA from [%s]: %s; spool write failed listener=%s",
                     stored.client_address, replies.QUEUE_WRITE_ERROR, self.listener.name)
            return str(replies.QUEUE_WRITE_ERROR)
        context.metrics.message_received(self.listener.name)
        user = f", sasl_username={header_safe(stored.sasl_username)}" \
            if stored.sasl_username else ""
        log.info(
            "%s: client=[%s], from=<%s>, size=%d, nrcpt=%d, listener=%s%s, "
            "message_id=<%s>, rule=%s%s",
            queue_id, stored.client_address, stored.sender, size,
            len(stored.recipients), self.listener.name, user, msgid,
            verdict.rule, ", hold" if stored.hold else "",
        )
        for (copy_id, copy), archive in zip(copies, verdict.copies, strict=True):
            log.info("%s: archive copy of %s, from=<%s>, nrcpt=%d, route=%s, rule=%s",
                     copy_id, queue_id, copy.sender, len(copy.recipients), copy.route,
                     archive.rule)
        if not stored.hold:
            checked = _checked(*parts, verdict.tail)
            for copy_id, copy in ((queue_id, stored), *copies):
                content = contents[copy_id]
                if checked is not None:
                    content = dataclasses.replace(content, checked=checked)
                context.on_queued(copy_id, copy, content)
        return str(replies.queued(queue_id))

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd would answer "500 Error: (Exception) ...": permanent, and it leaks
        # internals. A bug of ours is a temporary failure for the client.
        log.error("internal error in SMTP session", exc_info=error)
        return str(replies.LOCAL_ERROR)

    def _count_checks(self, policy: PolicySession) -> None:
        checks = policy.checks
        assert isinstance(checks, SessionChecks)
        if checks.spf_outcome is not None:
            self.context.metrics.spf_result(checks.spf_outcome.result)
        if checks.dkim_outcome is not None:
            self.context.metrics.dkim_result(checks.dkim_outcome.result)

    def _refused(self, client: str, refusal: Refusal) -> None:
        rule = refusal.rule or server_rule(refusal.reply)
        log.info(refusal_line(
            refusal.stage, client, refusal.reply, sender=refusal.sender, helo=refusal.helo,
            listener=self.listener.name, rule=rule,
            recipient=refusal.recipient, detail=refusal.detail,
        ))
        self.context.spool.post([outcomes.refused(
            refusal.stage, str(refusal.reply), rule, client, self.listener.name,
            refusal.sender, refusal.recipient, refusal.sasl_username)])
        metrics = self.context.metrics
        metrics.rejected(refusal.stage.lower(), refusal.reply.code)
        if refusal.limit is not None:
            metrics.ratelimit_exceeded(refusal.limit)


# The server setting or check behind a refusal no policy rule made, for rule= in the log.
SERVER_RULES = {
    replies.MESSAGE_TOO_BIG: "max_message_size",
    replies.TOO_MANY_RECIPIENTS: "max_recipients",
    replies.NEEDS_SMTPUTF8: "smtputf8",
    replies.BAD_SENDER_SYNTAX: "address_syntax",
    replies.BAD_RECIPIENT_SYNTAX: "address_syntax",
    replies.INSUFFICIENT_STORAGE: "min_free_space",
    replies.BAD_LINE_ENDING: "smuggling",
    replies.LINE_TOO_LONG: "max_line_length",
    replies.HEADER_TOO_BIG: "max_header_size",
    replies.TOO_MANY_HOPS: "max_hops",
    replies.TOO_MANY_CONNECTIONS: "max_connections",
    replies.TLS_REQUIRED: "require_tls",
    replies.AUTH_REQUIRED: "auth_required",
    replies.AUTH_NEEDS_TLS: "auth_needs_tls",
    replies.AUTH_FAILED: "auth_failed",
}


def _checked(ours: bytes, message: bytes, tail: Tail | None) -> Checked | None:
    """What delivery may take on trust about a message just stored: our header lines,
    then the message as the policy left it (its start in memory, the rest on disk).

    The session refused the message unless its CR and LF came in pairs, and rewriting or
    removing forged Authentication-Results changed only its header section: that and our
    lines are looked at again here, the rest not. None (delivery looks at everything)
    if a bare CR or LF is found all the same."""
    if has_bare_line_ending(ours) or has_bare_line_ending(header_section(message)):
        return None
    return Checked(
        eight_bit=not (ours.isascii() and message.isascii())
        or (tail is not None and tail.eight_bit),
        # Each of the three starts a line.
        dot_lines=any(part.startswith(b".") or b"\r\n." in part for part in (ours, message))
        or (tail is not None and tail.dot_lines),
    )


def server_rule(reply: Reply) -> str:
    return SERVER_RULES.get(reply, "server")


# The field with its folded continuation lines (RFC 5322 section 2.2.3).
_MESSAGE_ID = re.compile(
    rb"^Message-ID:[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.IGNORECASE | re.MULTILINE
)


def message_id(message: bytes) -> str:
    """The Message-ID (RFC 5322 section 3.6.4) without its angle brackets, "" if none."""
    end = message.find(b"\r\n\r\n")
    found = _MESSAGE_ID.search(message, 0, len(message) if end < 0 else end + 2)
    if found is None:
        return ""
    value = b" ".join(found.group(1).split()).decode("utf-8", "replace")
    return header_safe(value.strip("<>"))[:200]


def archive_copies(
    stored: StoredEnvelope, copies: Sequence[Copy]
) -> list[tuple[str, StoredEnvelope]]:
    """The envelopes of a message's archive copies: the message's own but for sender,
    recipients and route, each under a queue id of its own."""
    return [
        (new_queue_id(), dataclasses.replace(
            stored, sender=copy.sender, recipients=copy.recipients,
            route=copy.route or stored.route))
        for copy in copies
    ]


def sasl_username(session: Session) -> str:
    return str(session.auth_data or "") if session.authenticated else ""


async def start_listener(context: ListenerContext, reuse_port: bool = False) -> asyncio.Server:
    """Bind one listener in the running event loop (not aiosmtpd's threaded Controller);
    with `reuse_port`, several worker processes share its port (SO_REUSEPORT)."""
    handler = InboundHandler(context)
    listener = context.listener

    def factory() -> RelaySMTP:
        return RelaySMTP(context, handler)

    loop = asyncio.get_running_loop()
    if listener.implicit_tls:
        return await loop.create_server(
            factory, host=listener.host, port=listener.port, ssl=context.tls,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT, reuse_port=reuse_port or None,
        )
    return await loop.create_server(factory, host=listener.host, port=listener.port,
                                    reuse_port=reuse_port or None)
