"""The SMTP protocol for our listeners: aiosmtpd's SMTP with our limits, TLS, AUTH, PROXY, DATA.

This is the one adapter over aiosmtpd: every use of its private API (its reader and
writer, session state, command loop and handler hooks) lives here, and the module refuses
to load with an aiosmtpd it was not tested with. Everything else uses aiosmtpd's
documented handler interface only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import math
import os
import re
import secrets
from pathlib import Path
from typing import Any, AnyStr, Protocol, cast

import aiosmtpd
from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    LoginPassword,
    Session,
    TLSSetupException,
)

from relay import replies
from relay.events import outcomes
from relay.headers import header_safe
from relay.inbound.budget import DataBudget
from relay.inbound.context import ListenerContext
from relay.ipaddr import LOOPBACK_NETWORKS, in_networks
from relay.message import Tail, has_bare_line_ending, has_long_line, longest_line, write_all
from relay.ops.logs import flush_waiting, refusal_line
from relay.policy.session import PolicySession
from relay.replies import Reply

log = logging.getLogger("relay.inbound")

# The aiosmtpd releases whose internals this module was read against and tested with.
TESTED_AIOSMTPD = ("1.4.6",)


def check_aiosmtpd_version(version: str) -> None:
    """Refuse an aiosmtpd this adapter was not tested with, saying what to install."""
    if version not in TESTED_AIOSMTPD:
        raise ImportError(
            f"policy-relay's SMTP adapter (relay/inbound/protocol.py) relies on aiosmtpd "
            f"internals and was tested with aiosmtpd {', '.join(TESTED_AIOSMTPD)}, but "
            f"aiosmtpd {version} is installed; install the version pyproject.toml pins "
            f"(pip install aiosmtpd=={TESTED_AIOSMTPD[-1]})"
        )


check_aiosmtpd_version(aiosmtpd.__version__)

# RFC 5321 section 4.5.3.1.4: a command line is at most 512 octets with its CRLF; RFC 1870
# section 3 (SIZE) lets MAIL grow by 26 and RFC 6531 section 3.4 (SMTPUTF8) by 10 more.
COMMAND_LINE = 510
MAIL_LINE = COMMAND_LINE + 26 + 10

# Verbs a client has little reason to repeat (Postfix smtpd_junk_command_limit is 100).
# MAIL, RCPT and DATA are not capped: a pooled client sends many messages per connection.
CALL_LIMITS = {"NOOP": 100, "RSET": 1000, "VRFY": 10, "EXPN": 10, "HELP": 10,
               "HELO": 10, "EHLO": 10, "STARTTLS": 2, "*": 10**9}

# DATA is read in chunks of whatever has arrived, up to this much at a time.
DATA_CHUNK = 256 * 1024
# RFC 5321 section 4.1.1.4: the message ends with CRLF "." CRLF, and only so; "\n.\n",
# "\r.\r" and friends are content, which then fails the bare CR/LF check (smuggling).
END_OF_DATA = b"\r\n.\r\n"
# A message's first octets stay in memory (its header section, the start of its body);
# the rest goes to disk as it arrives (see _Spill).
SPILL_AT = 256 * 1024

_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")

# aiosmtpd's own replies (by prefix) and the ones we send instead: all with an enhanced
# status code (RFC 2034), in our table. Greeting, EHLO/HELO lines, 334 and 354 stay as is.
AIOSMTPD_REPLIES: tuple[tuple[str, Reply], ...] = (
    ("500 Command line too long", replies.LINE_TOO_LONG),
    ("500 Line too long", replies.LINE_TOO_LONG),
    ("500 Error: bad syntax", replies.BAD_SYNTAX),
    ("500 Error: strict ASCII mode", replies.BAD_SYNTAX),
    ("500 Error: command", replies.UNKNOWN_COMMAND),
    ("501 ", replies.SYNTAX_ERROR),
    ("502 ", replies.NOT_IMPLEMENTED),
    ("503 Error: send", replies.SEND_HELO_FIRST),
    ("503 Error: need MAIL", replies.NEED_MAIL),
    ("503 Error: nested MAIL", replies.NESTED_MAIL),
    ("503 Error: need RCPT", replies.NEED_RCPT),
    ("503 Already authenticated", replies.ALREADY_AUTHENTICATED),
    ("530 Must issue a STARTTLS", replies.TLS_REQUIRED),
    ("552 ", replies.MESSAGE_TOO_BIG),
    ("554 Command refused due to lack of security", replies.TLS_HANDSHAKE_FAILED),
    ("555 ", replies.PARAMETERS_NOT_RECOGNIZED),
    ("454 TLS not available", replies.TLS_NOT_AVAILABLE),
    ("250 OK", replies.OK),
    ("221 Bye", replies.BYE),
    ("220 Ready to start TLS", replies.READY_FOR_TLS),
    ("252 ", replies.CANNOT_VRFY),
)


def with_enhanced_code(line: str) -> str:
    """Our reply for a line aiosmtpd sends itself, or the line when it needs none."""
    if _ENHANCED.match(line):
        return line
    for prefix, reply in AIOSMTPD_REPLIES:
        if line.startswith(prefix):
            return str(reply)
    if line[:1] in ("4", "5"):
        log.warning("aiosmtpd reply without an enhanced status code: %r", line)
    return line


# RFC 2920 section 3.1: the commands that may stand anywhere in a pipelined group; the
# replies to the others (EHLO, DATA, AUTH, STARTTLS, QUIT, ...) are always sent at once.
_GROUPABLE = frozenset({"MAIL", "RCPT", "RSET"})

_SERVER_REFUSALS = {
    str(replies.TLS_REQUIRED): (replies.TLS_REQUIRED, "require_tls"),
    str(replies.AUTH_REQUIRED): (replies.AUTH_REQUIRED, "auth_required"),
    str(replies.AUTH_NEEDS_TLS): (replies.AUTH_NEEDS_TLS, "auth_needs_tls"),
}


class BadCommandLine(Exception):
    """A command line ended by a bare LF, or holding a control character or invalid UTF-8."""


def command_line_problem(line: bytes) -> str | None:
    # RFC 5321 section 2.3.8: CR and LF only as a CRLF pair; aiosmtpd itself would take a
    # bare LF as the end of a command, and keep a CR or NUL inside the argument (command
    # injection through addresses).
    if not line.endswith(b"\n"):
        return None  # end of stream, or an over-long line: aiosmtpd answers those
    if not line.endswith(b"\r\n"):
        return "bare LF"
    if _CONTROL.search(line, 0, len(line) - 2):
        return "control character"
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid UTF-8"
    return None


class _LineReader(asyncio.StreamReader):
    """aiosmtpd's stream reader, watched: command lines are checked before aiosmtpd parses
    them. DATA bypasses it (RelaySMTP.smtp_DATA reads chunks)."""

    protocol: RelaySMTP
    waiting_for_command = False
    overrun = False

    def unread(self, data: bytes | bytearray) -> None:
        """Put back what DATA read past its end: pipelined commands (RFC 2920)."""
        self._buffer[:0] = data  # type: ignore[attr-defined]

    def has_command(self) -> bool:
        """Whether a whole command line has arrived and waits to be read (pipelined)."""
        return b"\n" in self._buffer  # type: ignore[attr-defined]

    async def readuntil(self, separator: Any = b"\n") -> bytes:
        self.protocol.before_command()
        self.protocol.waiting_since = self.protocol.loop.time()
        self.waiting_for_command = True
        try:
            line = await super().readuntil(separator)
        except asyncio.LimitOverrunError:
            # aiosmtpd skips the over-long line and reads on to its end; that tail (maybe
            # just the LF of the CRLF) is no command of its own.
            self.overrun = True
            raise
        except asyncio.IncompleteReadError as exc:
            # EOF inside a command line: aiosmtpd would take it for a bug of ours. The
            # client is gone; there is no one to answer.
            self.protocol.hung_up(len(exc.partial))
            raise ConnectionResetError("client hung up in the middle of a command") from None
        finally:
            self.waiting_for_command = False
        if self.overrun:
            self.overrun = False
        elif why := command_line_problem(line):
            raise BadCommandLine(why)
        verb = line.split(maxsplit=1)[:1]
        self.protocol.last_command = verb[0].decode("ascii", "replace").upper() if verb else ""
        return line


class _Spill:
    """Where a message goes past the first `at` octets: a file in the spool's incoming
    directory, written as whole lines arrive, each piece checked (line lengths, bare
    CR or LF) before its transparency dots are removed. The first part stays in the
    reader's buffer; the file is named by relay.message.Tail."""

    def __init__(self, directory: Path, at: int, max_line_length: int) -> None:
        self.directory = directory
        self.at = at
        # The session's limit, from the settings its transaction runs on (a reload may
        # have changed them since the connection, and with them the reader, opened).
        self.max_line_length = max_line_length
        self.head_end = 0  # where the first part ends in the reader's buffer (0: not yet)
        self.path: Path | None = None
        self._fd = -1
        self.size = 0
        self.bare_line_ending = False
        self.longest_line = 0
        self.eight_bit = False
        self.dot_lines = False
        self.too_long = False  # a line over the reader's limit went to the file

    def take(self, buf: bytearray, upto: int, line_limit: int) -> int:
        """Move the whole lines of `buf` between the first part and `upto` to the file;
        how many octets left `buf`."""
        if not self.head_end:
            # buf starts with the CRLF that ended the DATA command.
            first = buf.find(b"\r\n", 2 + self.at, upto)
            if first < 0:
                return 0
            self.head_end = first + 2
        last = buf.rfind(b"\r\n", self.head_end, upto)
        if last < 0:
            return 0
        piece = bytes(buf[self.head_end:last + 2])
        bare = has_bare_line_ending(piece)
        # Lines over two limits matter: the reader's as they came (with their
        # transparency dot), as aiosmtpd counts; the session's once unstuffed, with the
        # longest one's length for the log. One window scan over the lower of the two
        # finds that there are none, nearly always.
        long_lines = has_long_line(piece, min(line_limit, self.max_line_length), exact=bare)
        self.too_long = self.too_long or (
            long_lines and has_long_line(piece, line_limit, exact=bare))
        # RFC 5321 section 4.5.2: each piece starts a line, so a leading dot is one too.
        if piece.startswith(b".") or b"\r\n." in piece:
            piece = (b"\r\n" + piece).replace(b"\r\n.", b"\r\n")[2:]
            self.dot_lines = True
        self.bare_line_ending = self.bare_line_ending or bare
        self.eight_bit = self.eight_bit or not piece.isascii()
        if long_lines:
            self.longest_line = max(self.longest_line, longest_line(piece))
        self._write(piece)
        del buf[self.head_end:last + 2]
        return last + 2 - self.head_end

    def _write(self, piece: bytes) -> None:
        if self.path is None:
            path = self.directory / secrets.token_hex(12)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            self.path = path
        # Into the page cache: the spool copies and fsyncs it when it stores the message.
        write_all(self._fd, piece)
        self.size += len(piece)

    def tail(self) -> Tail | None:
        if self.path is None:
            return None
        os.close(self._fd)
        self._fd = -1
        return Tail(self.path, self.size, self.bare_line_ending, self.longest_line,
                    self.eight_bit, self.dot_lines)

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.path is not None:
            with contextlib.suppress(OSError):  # gone with its directory: nothing to undo
                self.path.unlink(missing_ok=True)
            self.path = None


class RelaySession(Session):
    """aiosmtpd's session, without the deprecation warning its AUTH logs every time."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class SessionHandler(Protocol):
    """What the protocol asks of its handler besides aiosmtpd's handle_<VERB> hooks."""

    def start_session(self, client: str, tls: bool) -> PolicySession: ...

    async def helo(self, server: RelaySMTP, name: str) -> Reply | None: ...


def client_address(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else "unknown"


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with our limits, TLS, AUTH and PROXY handling.

    Only what aiosmtpd gets wrong or leaves open is overridden: replies get enhanced
    status codes (push), command lines are checked (the reader), timeouts say 421, AUTH
    is checked against the users file off the event loop, addresses are taken verbatim
    for our own strict check, and BDAT hangs up.
    """

    def __init__(self, context: ListenerContext, handler: SessionHandler) -> None:
        settings = context.current().settings
        listener = context.listener
        tls = context.tls
        self.context = context
        self.handler = handler
        self.settings = settings
        self.listener = listener
        self.limits = context.limits
        # The policy's view of this session, from the moment the client is known.
        self._policy: PolicySession | None = None
        # The reader's limit bounds every line: RFC 5321 section 4.5.3.1.6 allows 1000
        # octets with CRLF, plus one for the transparency dot of section 4.5.2.
        self.line_length_limit = settings.inbound.max_line_length + 3
        super().__init__(
            handler,
            hostname=settings.smtp_hostname,
            ident="ESMTP",
            data_size_limit=settings.inbound.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=tls if listener.tls == "starttls" else None,
            require_starttls=listener.require_tls,
            timeout=settings.inbound.idle_timeout,
            auth_required=listener.auth == "required",
            command_call_limit=CALL_LIMITS,
            proxy_protocol_timeout=listener.proxy_timeout if listener.proxy_protocol else None,
        )
        # aiosmtpd keeps these in one class-level dict for all sessions and grows MAIL's
        # entry on every EHLO; ours are per session and fixed.
        self.command_size_limit = COMMAND_LINE
        self.command_size_limits = collections.defaultdict(
            lambda: COMMAND_LINE, {"MAIL": MAIL_LINE}
        )
        # The client address the connection limits counted (None before admission).
        self.client: str | None = None
        self.last_command = ""  # the verb of the command being answered, for the log
        self._closing = False
        self._errors = 0
        self._deadline: asyncio.TimerHandle | None = None
        # loop.time() of the last complete DATA line (see _timeout_cb).
        self._progress_at = -math.inf
        # loop.time() when the client last got the turn (a reply sent, DATA begun).
        self.waiting_since = -math.inf
        self._in_data = False
        self._held = 0  # bytes of the message being read, counted in the DataBudget
        # The part of the message being handled that went to disk (the DATA hook reads it).
        self.tail: Tail | None = None
        self._replies = bytearray()  # replies to pipelined commands not sent yet (_send)

    # -- connection life ----------------------------------------------------------------

    def _create_session(self) -> Session:
        return RelaySession(self.loop)

    def policy(self) -> PolicySession:
        """The session model; it lives as long as the connection (across STARTTLS).

        A method, not a property: aiosmtpd's constructor reads every attribute."""
        assert self._policy is not None, "no command is read before the connect stage"
        return self._policy

    async def _connect_stage(self) -> bool:
        """Run the policy's connect stage for the admitted client; False if it refused
        (the client has been told and the connection closed)."""
        assert self.session is not None
        self._policy = self.handler.start_session(client_address(self.session),
                                                  self.listener.implicit_tls)
        refusal = await self._policy.connect(self.listener.implicit_tls)
        if refusal is not None:
            self.close_with(refusal)
            return False
        return True

    def _cb_client_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # aiosmtpd builds a plain StreamReader in SMTP.__init__; this is the one place to
        # put our checks in front of its command loop without copying that loop.
        reader.__class__ = _LineReader
        cast(_LineReader, reader).protocol = self
        super()._cb_client_connected(reader, writer)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        after_starttls = self._original_transport is not None
        previous_peer = self.session.peer if self.session is not None else None
        super().connection_made(transport)
        session = self.session
        assert session is not None
        if after_starttls:
            # RFC 3207 section 4.2 starts a new session, but the client is the same one,
            # possibly as named by a PROXY header.
            session.peer = previous_peer
            return
        real_peer = client_address(session)
        if self.listener.implicit_tls:
            session.ssl = {
                "cipher": transport.get_extra_info("cipher"),
                "ssl_object": transport.get_extra_info("ssl_object"),
            }
        # RFC 4954 section 4: no AUTH in plaintext, unless this listener allows it for
        # loopback (judged by the real socket peer: that is the wire that could be sniffed).
        self._auth_require_tls = not (
            self.listener.implicit_tls
            or (self.listener.auth_plaintext_loopback and in_networks(real_peer, LOOPBACK_NETWORKS))
        )
        self._deadline = self.loop.call_later(self.settings.inbound.session_timeout, self._expired)
        self.limits.register(self)

    def connection_lost(self, error: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._give_back()
        self.limits.unregister(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        assert self.session is not None
        peer = client_address(self.session)
        if self.listener.proxy_protocol:
            # Only a trusted load balancer may say who the client is (a spoofed PROXY
            # header would let anyone claim an allowed address).
            if not in_networks(peer, self.listener.proxy_networks):
                log.warning("listener %s: PROXY header not accepted from [%s]; closed",
                            self.listener.name, peer)
                self.close_with(None)
                return
            # Admission waits for the PROXY header: the limits count the real client.
        elif not await self._admit() or not await self._connect_stage():
            return
        try:
            await super()._handle_client()
        except ConnectionResetError:
            pass  # aiosmtpd has closed the connection
        except asyncio.CancelledError:
            # EOF while aiosmtpd waits for the PROXY header cancels it without closing
            # the (half-open) connection; it would linger until the timeout.
            self.close_with(None)
            raise

    async def accept_proxy(self, proxy: ProxyData) -> bool:
        """The PROXY header arrived: from now on the client is the address it names."""
        assert self.session is not None
        if isinstance(proxy.src_addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
            log.info("listener %s: [%s] is a proxy for [%s]:%s", self.listener.name,
                     client_address(self.session), proxy.src_addr, proxy.src_port)
            self.session.peer = cast(Any, (str(proxy.src_addr), proxy.src_port or 0))
        # else: PROXY v2 LOCAL or v1 UNKNOWN (health checks): the proxy is the client.
        return await self._admit() and await self._connect_stage()

    async def _admit(self) -> bool:
        assert self.session is not None
        address = client_address(self.session)
        settings = self.settings
        why = await self.limits.enter(address, settings.inbound)
        if why is not None:
            log.info(refusal_line("CONNECT", address, replies.TOO_MANY_CONNECTIONS,
                                  sender=None, helo="", listener=self.listener.name,
                                  rule="max_connections", detail=why))
            self.close_with(replies.TOO_MANY_CONNECTIONS)
            return False
        if self.transport is None or self._closing:
            # The client left while the hub was asked: give its place back.
            self.limits.release(address)
            return False
        self.client = address
        self.context.metrics.connection_opened(self.listener.name)
        return True

    def _give_back(self) -> None:
        if self.client is not None:
            self.limits.release(self.client)
            self.client = None
            self.context.metrics.connection_closed(self.listener.name)

    def stalled_for(self) -> float:
        """Seconds this session has waited for its client: since the later of its last
        complete command or DATA line and the moment it got the turn. 0 while the
        server has the turn (a policy check, the spool) or the session is closing."""
        reader = cast(_LineReader, self._reader)
        if self._closing or not (reader.waiting_for_command or self._in_data):
            return 0.0
        return self.loop.time() - max(self._progress_at, self.waiting_since)

    def silent(self) -> bool:
        return self._progress_at == -math.inf

    def evict(self, why: str) -> None:
        """Pressure (relay/inbound/connlimits.py): close with 421 4.7.0, and give the
        place back now, so that the client that needed it is admitted at once."""
        assert self.session is not None
        log.info("closed [%s] listener=%s: %s", client_address(self.session),
                 self.listener.name, why)
        self.close_with(replies.TOO_MANY_CONNECTIONS)
        self._give_back()

    def close_with(self, reply: Reply | None) -> None:
        """Say `reply` (if any) and hang up; everything after it is dropped."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        if reply is not None:
            self._replies += f"{reply}\r\n".encode("ascii")
        flush_waiting()
        self._writer.write(bytes(self._replies))
        self._replies.clear()
        self.transport.close()

    def drain(self, force: bool) -> None:
        """SIGTERM: a session waiting for a command gets 421 now, a busy one after its
        current command (before_command), or now as well when `force`d."""
        waiting = cast(_LineReader, self._reader).waiting_for_command
        if force or waiting or self.client is None:  # None: still before the PROXY header
            self.close_with(replies.SHUTTING_DOWN)

    def hung_up(self, partial: int) -> None:
        assert self.session is not None
        if partial:
            log.info("[%s] hung up in the middle of a command (%d octets) listener=%s",
                     client_address(self.session), partial, self.listener.name)
        self.close_with(None)

    def before_command(self) -> None:
        if self.limits.draining:
            self.close_with(replies.SHUTTING_DOWN)

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd re-creates its idle timer for every command; noting the time is
        # enough while a timer is armed (it re-arms itself in _timeout_cb).
        handle = self._timeout_handle
        if duration is None and handle is not None and not handle.cancelled():
            self._progress_at = self.loop.time()
            return
        super()._reset_timeout(duration)

    def _timeout_cb(self) -> None:
        # aiosmtpd resets its idle timer only on commands, so a long DATA would be cut
        # off; a complete DATA line is progress. Commands and DATA only note the time
        # (re-arming a timer each time costs), and the timer checks it when it fires. A
        # trickle of partial lines is no progress, and the session deadline bounds
        # everything (a slowloris client cannot hold a session forever).
        assert self.session is not None
        left = self._progress_at + self.settings.inbound.idle_timeout - self.loop.time()
        if left > 0 and not self._closing:
            self._timeout_handle = self.loop.call_later(left, self._timeout_cb)
            return
        log.info("timeout: idle for %gs, [%s] listener=%s", self.settings.inbound.idle_timeout,
                 client_address(self.session), self.listener.name)
        self.close_with(replies.TIMEOUT)

    def _expired(self) -> None:
        assert self.session is not None
        log.info("timeout: session longer than %gs, [%s] listener=%s",
                 self.settings.inbound.session_timeout, client_address(self.session),
                 self.listener.name)
        self.close_with(replies.TIMEOUT)

    # -- replies --------------------------------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        if self._closing:
            return
        if isinstance(status, bytes):  # AUTH challenges ("334 ...")
            await self._send(status)
            return
        line = with_enhanced_code(status)
        if line in _SERVER_REFUSALS and self.session is not None:
            # 530 and 538 come from aiosmtpd's own checks: log them like the others.
            self.log_refusal(self.last_command, _SERVER_REFUSALS[line][0],
                             _SERVER_REFUSALS[line][1])
        await self._send(line.encode("utf-8" if self.enable_SMTPUTF8 else "ascii"))
        self._count_error(line)

    async def _send(self, reply: bytes) -> None:
        """Send `reply`; but after MAIL, RCPT or RSET (which RFC 2920 section 3.1 lets
        a client pipeline), while the client's next command has already arrived, keep
        it: as with Postfix, the replies of a pipelined group leave in one write, with
        the reply to the command that ends the group."""
        self._replies += reply + b"\r\n"
        if self.last_command in _GROUPABLE and cast(_LineReader, self._reader).has_command():
            return
        flush_waiting()
        self._writer.write(bytes(self._replies))
        self._replies.clear()
        await self._writer.drain()

    def _count_error(self, line: str) -> None:
        # Postfix smtpd_hard_error_limit: every 4xx/5xx counts, except "too many
        # recipients", which RFC 5321 section 4.5.3.1.10 makes part of normal flow.
        if line[:1] not in ("4", "5") or line == str(replies.TOO_MANY_RECIPIENTS):
            return
        self._errors += 1
        if self._errors >= self.settings.inbound.max_errors:
            assert self.session is not None
            log.info("too many errors (%d) from [%s] listener=%s", self._errors,
                     client_address(self.session), self.listener.name)
            self.close_with(replies.TOO_MANY_ERRORS)

    async def handle_exception(self, error: Exception) -> str:
        assert self.session is not None
        if isinstance(error, BadCommandLine):
            log.info("rejected command line from [%s]: %s", client_address(self.session), error)
            return str(replies.BAD_COMMAND_LINE)
        if isinstance(error, TLSSetupException):
            # aiosmtpd closes the connection itself; nothing is sent.
            log.info("TLS handshake failed with [%s]: %s", client_address(self.session),
                     error.__cause__)
            return str(replies.TLS_HANDSHAKE_FAILED)
        return await super().handle_exception(error)

    # -- commands -------------------------------------------------------------------------

    @property
    def tls_active(self) -> bool:
        return self._tls_protocol is not None or self.listener.implicit_tls

    @property
    def auth_offered(self) -> bool:
        return self.listener.auth != "off" and (self.tls_active or not self._auth_require_tls)

    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push(str(replies.SYNTAX_ERROR))
            return
        assert self.session is not None
        self._set_rset_state()  # type: ignore[no-untyped-call]
        refusal = await self.handler.helo(self, hostname)
        if refusal is not None:
            await self.push(str(refusal))
            return
        self.session.extended_smtp = True
        self.session.host_name = hostname
        lines = [self.hostname, f"SIZE {self.data_size_limit}", "8BITMIME", "PIPELINING",
                 "ENHANCEDSTATUSCODES", "SMTPUTF8"]
        if self.tls_context and not self.tls_active:
            lines.append("STARTTLS")
        if self.auth_offered:
            lines.append("AUTH PLAIN LOGIN")
        for line in lines[:-1]:
            await self.push(f"250-{line}")
        await self.push(f"250 {lines[-1]}")

    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd reads DATA line by line (a readuntil, a bytearray and a timer reset
        # per line, three copies of the message); this reads whatever has arrived and
        # checks the message at once, with aiosmtpd's replies, limits and their order.
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        budget = self.context.budget
        if await budget.full():
            self._over_budget(budget)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(str(replies.INSUFFICIENT_STORAGE))
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        status: Any = MISSING
        spill = _Spill(self.context.spool.incoming, self._spill_at(),
                       self.policy().runtime.settings.inbound.max_line_length)
        try:
            self.waiting_since, self._in_data = self.loop.time(), True
            try:
                data, refusal = await self._read_data(budget, spill)
            finally:
                self._in_data = False
            if refusal is None and data is not None:
                self.envelope.content = self.envelope.original_content = data
                self.tail = spill.tail()
                status = await self._call_handler_hook("DATA")
        finally:
            self.tail = None
            spill.discard()  # stored by now (copied into the spool), or not to be
            budget.release(self._held)
            self._held = 0
        if data is None:  # the connection is gone
            return
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        if refusal is not None:
            await self.push(str(refusal))
            return
        await self.push("250 OK" if status is MISSING else status)

    def _spill_at(self) -> int:
        """Octets of a message kept in memory; the rest goes to disk as it arrives. At
        least twice max_header_size, so the header section is always in memory."""
        return max(SPILL_AT, 2 * self.settings.inbound.max_header_size)

    async def _read_data(
        self, budget: DataBudget, spill: _Spill
    ) -> tuple[bytes | None, Reply | None]:
        """The message (dot-unstuffed) or the refusal due once its end was read; None
        for the message when the connection closed first. Past `spill`'s threshold the
        message goes to its file as whole lines arrive (checked, then unstuffed), and
        the bytes returned are only its first part (relay.message.Tail).

        Like aiosmtpd, a message over the size limit or with a line over the reader's
        limit is read to its end before the reply (RFC 5321 section 4.2.5), keeping
        none of it; which limit was passed first decides the reply.
        """
        reader = cast(_LineReader, self._reader)
        size_limit = self.data_size_limit or math.inf
        # aiosmtpd's limit: a line of more than line_length_limit octets with its CRLF.
        line_limit = self.line_length_limit - 2
        # The CRLF that ended the DATA command: a message can end before its first line.
        buf = bytearray(b"\r\n")
        refusal: Reply | None = None
        # RFC 1870 section 3: the size excludes the dots doubled for transparency
        # (RFC 5321 section 4.5.2); they are counted up to `counted` in buf.
        dots, counted = 0, 0
        while True:
            try:
                chunk = await reader.read(DATA_CHUNK)
            except asyncio.CancelledError:
                if self.session is not None:
                    log.info("connection lost during DATA from [%s]",
                             client_address(self.session))
                self._writer.close()
                raise
            if not chunk:
                self._writer.close()
                return None, None
            if b"\n" in chunk:
                self._progress_at = self.loop.time()
            start = max(0, len(buf) - 4)
            buf += chunk
            # Both the end of data and the doubled dots counted below start with CRLF
            # "."; nearly every chunk of a message has none, and one scan says so.
            dotted = buf.find(b"\r\n.", min(start, counted)) >= 0
            end = buf.find(END_OF_DATA, start) if dotted else -1
            if end >= 0:
                if len(buf) > end + 5:
                    reader.unread(buf[end + 5 :])
                del buf[end + 2 :]
            if refusal is None:
                # Until its end is seen, the message is at least len(buf) - 4 octets. A
                # "\r\n." is a doubled dot unless it starts the end of data, which is
                # found before it can be counted (the last 4 octets wait for the next
                # chunk).
                scan_to = len(buf) if end >= 0 else max(counted, len(buf) - 4)
                if dotted:
                    dots += buf.count(b"\r\n.", counted, scan_to)
                counted = max(counted, scan_to - 2)
                if (len(buf) - 2 if end >= 0 else len(buf) - 4) - dots > size_limit:
                    # RFC 1870 section 6: the message goes over the size limit.
                    refusal = (replies.LINE_TOO_LONG if has_long_line(buf, line_limit)
                               else replies.MESSAGE_TOO_BIG)
                elif not await budget.reserve(len(chunk)):
                    self._over_budget(budget)
                    refusal = replies.INSUFFICIENT_STORAGE
                else:
                    self._held += len(chunk)
                if refusal is not None:  # read on to the end, keeping nothing
                    budget.release(self._held)
                    self._held = 0
                    spill.discard()
                elif end < 0:
                    # Whole lines already counted for dots (and not the last 4 octets,
                    # which may start the end of data) go to disk past the threshold.
                    try:
                        moved = spill.take(buf, min(counted, len(buf) - 4), line_limit)
                    except OSError as exc:
                        refusal = self._spill_failed(spill, exc)
                        budget.release(self._held)
                        self._held = moved = 0
                    counted -= moved
                    budget.release(moved)
                    self._held -= moved
            if end >= 0:
                break
            if refusal is not None:
                del buf[:-4]
        if refusal is not None:
            return b"", refusal
        if spill.head_end:
            try:
                spill.take(buf, len(buf), line_limit)
            except OSError as exc:
                return b"", self._spill_failed(spill, exc)
        del buf[:2]
        if spill.too_long or has_long_line(buf, line_limit, exact=has_bare_line_ending(buf)):
            return b"", replies.LINE_TOO_LONG
        # RFC 5321 section 4.5.2: remove the transparency dot of lines starting with one.
        if buf.startswith(b".") or b"\r\n." in buf:
            buf[:0] = b"\r\n"
            buf = buf.replace(b"\r\n.", b"\r\n")
            del buf[:2]
        return bytes(buf), None

    def _spill_failed(self, spill: _Spill, exc: OSError) -> Reply:
        """The spool's disk refused the part of a message that goes there: 451, the
        spool's condition (a full disk) noted, and the message read to its end."""
        spill.discard()
        why = f"cannot write to {spill.directory}: {exc.strerror or exc}"
        self.context.spool.write_failed(why)
        self.log_refusal("DATA", replies.QUEUE_WRITE_ERROR, "spool", why)
        return replies.QUEUE_WRITE_ERROR

    def _over_budget(self, budget: DataBudget) -> None:
        self.log_refusal("DATA", replies.INSUFFICIENT_STORAGE, "max_data_memory",
                         f"message data in memory over {budget.limit} bytes")
        self.context.metrics.rejected("data", replies.INSUFFICIENT_STORAGE.code)

    def log_refusal(self, stage: str, reply: Reply, rule: str, detail: str = "") -> None:
        """A refusal of the server's own (no policy rule), in the shape of every other."""
        assert self.session is not None
        facts = self._policy.facts if self._policy is not None else None
        log.info(refusal_line(
            stage, client_address(self.session), reply,
            sender=facts.sender if facts else None,
            helo=(facts.helo_name or "") if facts else "",
            listener=self.listener.name, rule=rule, detail=detail,
        ))
        self.context.spool.post([outcomes.refused(
            stage, str(reply), rule, client_address(self.session), self.listener.name,
            facts.sender if facts else None, None, facts.sasl_username if facts else "")])

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.tls_active:
            # aiosmtpd would start a second TLS layer inside the first.
            await self.push(str(replies.TLS_ALREADY_ACTIVE))
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        assert self.session is not None
        if self.listener.auth == "off":
            await self.push(str(replies.AUTH_NOT_ENABLED))
            return
        if self.limits.auth_blocked(client_address(self.session),
                                    self.settings.inbound.max_auth_failures):
            self.close_with(replies.TOO_MANY_AUTH_FAILURES)
            return
        await super().smtp_AUTH(arg)

    async def auth_PLAIN(self, _: SMTP, args: list[str]) -> AuthResult:
        return await self._verify("PLAIN", await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: SMTP, args: list[str]) -> AuthResult:
        return await self._verify("LOGIN", await super().auth_LOGIN(_, args))

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        # aiosmtpd calls this synchronously; we only keep the credentials here and check
        # them in _verify, where the slow hash can run off the event loop.
        return AuthResult(success=False, handled=False, auth_data=auth_data)

    async def _verify(self, mechanism: str, result: AuthResult) -> AuthResult:
        credentials = result.auth_data
        if not isinstance(credentials, LoginPassword):
            return result  # aborted, or bad base64: aiosmtpd has answered already
        assert self.session is not None
        client = client_address(self.session)
        name = credentials.login.decode("utf-8", "replace")
        try:
            ok = await self.context.passwords.check(
                self.listener.users_file, credentials.login, credentials.password
            )
        except OSError as exc:
            log.error("cannot read users file %s: %s", self.listener.users_file, exc.strerror)
            return AuthResult(success=False, handled=False, message=str(replies.AUTH_UNAVAILABLE))
        if ok:
            self.limits.auth_succeeded(client)
            log.info("AUTH %s ok: user=%s client=[%s] listener=%s", mechanism,
                     header_safe(name), client, self.listener.name)
            return AuthResult(success=True, auth_data=name)
        self.log_refusal("AUTH", replies.AUTH_FAILED, "auth_failed",
                         f"sasl_method={mechanism} sasl_username={header_safe(name)}")
        if self.limits.auth_failed(client, self.settings.inbound.max_auth_failures):
            self.close_with(replies.TOO_MANY_AUTH_FAILURES)
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=str(replies.AUTH_FAILED))

    async def smtp_HELP(self, arg: str) -> None:
        await self.push(str(replies.HELP))

    async def smtp_VRFY(self, arg: str) -> None:
        # RFC 5321 section 3.5.3: 252 when we will not verify.
        await self.push(str(replies.CANNOT_VRFY if arg else replies.SYNTAX_ERROR))

    async def smtp_BDAT(self, arg: str) -> None:
        # RFC 3030: CHUNKING is not offered; the chunk that follows would be read as commands.
        self.close_with(replies.BDAT_NOT_SUPPORTED)

    async def smtp_GET(self, arg: str) -> None:
        # A cross-protocol request (HTTP sent to the SMTP port, as a browser tricked by
        # a web page would): hang up at once.
        self.close_with(replies.NOT_SMTP)

    smtp_POST = smtp_HEAD = smtp_PUT = smtp_CONNECT = smtp_GET

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # RFC 5321 section 4.1.2: Path = "<" [ A-d-l ":" ] Mailbox ">". We take what is
        # inside the brackets verbatim and relay.address judges it; aiosmtpd's parser would
        # strip source routes and rewrite comments and quotes first (relay tricks such as
        # '<@victim:u@relay>' and '"u@victim"@relay').
        if not arg:
            return "", ""
        arg = arg.lstrip()
        end = arg.find(">")
        if not arg.startswith("<") or end < 0:
            return None, None
        address, rest = arg[1:end], arg[end + 1 :]
        if rest and not rest.startswith(" "):
            return None, None
        return address or "<>", rest



def declared_size(options: list[str]) -> int:
    """The RFC 1870 SIZE= value of MAIL, 0 when absent (aiosmtpd has checked the syntax)."""
    for option in options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0
