"""One SMTP transaction with an upstream: MAIL, RCPT..., DATA, with per-recipient results."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

from relay.outbound.connector import Connection
from relay.outbound.smarthosts import UpstreamSettings
from relay.queue.content import Content
from relay.replies import UpstreamReply

# What can go wrong while talking to an upstream, short of a reply: the pool throws the
# connection away and the caller tries the next host (ssl.SSLError is an OSError).
CONNECTION_ERRORS = (TimeoutError, aiosmtplib.SMTPException, OSError)


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What the upstream said about one recipient.

    `again` marks a recipient the upstream did not take in this transaction only
    because it had too many (452 after others were accepted): send it in a new one.
    `own` marks a reply about this recipient alone (to its RCPT), which says nothing
    about the host or how fast we send to it (a greylisting "451 4.7.1" is no throttle).
    """

    reply: UpstreamReply
    again: bool = False
    own: bool = False

    @property
    def accepted(self) -> bool:
        return self.reply.is_success

    @property
    def permanent(self) -> bool:
        return self.reply.is_permanent

    @property
    def final(self) -> bool:
        return self.accepted or self.permanent


@dataclass(frozen=True, slots=True)
class Transaction:
    """The results of one transaction, one per recipient in order, and what they say
    about the host.

    host_trouble: a reply that says the host itself is unwell (421 anywhere, a 4xx to
    MAIL or DATA); it counts against the host's health and the recipients it left
    undecided may try the next host. unsuitable: the host cannot take this message at
    all (it lacks SMTPUTF8 or 8BITMIME); the next host may.
    """

    results: list[RecipientResult]
    host_trouble: UpstreamReply | None = None
    unsuitable: bool = False
    round_trips: int = 0  # times we waited for the server: 4 for one recipient, 2 pipelined


class StaleConnection(Exception):
    """A reused connection died before the transaction began; retry on a fresh one."""


def _all(reply: UpstreamReply, count: int) -> list[RecipientResult]:
    return [RecipientResult(reply)] * count


def _reply(response: aiosmtplib.SMTPResponse) -> UpstreamReply:
    return UpstreamReply.of(response.code, response.message)


async def transmit(
    conn: Connection,
    sender: str,
    recipients: Sequence[str],
    content: Content,
    settings: UpstreamSettings,
    smtputf8: bool = False,
) -> Transaction:
    """Run MAIL, RCPT... and DATA on `conn`; one result per recipient, in order.

    Replies (2xx/4xx/5xx) become results. Anything else (timeouts, a dropped
    connection, a protocol error) raises, and the pool then discards the connection.
    `sender` is "" for the null reverse-path.

    The commands go out through aiosmtplib's execute_command with the addresses as
    they were accepted (its mail()/rcpt() re-parse them with email.utils), and the
    content read from the spool in pieces, each with one bytes.replace for the
    transparency dots (aiosmtplib's data() wants the whole message in memory, runs two
    regexes over it and copies it to append the final dot).
    """
    client = conn.client
    timeout = settings.command_timeout
    mail = b"MAIL FROM:<%s>" % sender.encode("utf-8")
    if smtputf8:
        if not client.supports_extension("smtputf8"):
            # RFC 6531 section 3.2: never downgrade; another host may take it, else the
            # sender gets a non-delivery notice.
            missing = UpstreamReply.of(553, "5.6.7 upstream does not support SMTPUTF8")
            return Transaction(_all(missing, len(recipients)), unsuitable=True)
        mail += b" SMTPUTF8"
    eight_bit = await content.eight_bit()
    if client.supports_extension("8bitmime"):
        # RFC 6152 section 2: say what the body is.
        mail += b" BODY=8BITMIME" if eight_bit else b" BODY=7BIT"
    elif eight_bit:
        # RFC 6152 section 3: 8-bit data only to a server that offers 8BITMIME. We do
        # not convert (it would break the signatures the message carries); another host
        # may take it, else the recipients fail with 554 5.6.3 and the sender is told.
        missing = UpstreamReply.of(554, "5.6.3 upstream does not support 8BITMIME")
        return Transaction(_all(missing, len(recipients)), unsuitable=True)
    if client.supports_extension("size"):
        # RFC 1870 section 6: the size as the message is, before the transparency dots.
        mail += b" SIZE=%d" % content.size
    addresses = [b"RCPT TO:<%s>" % rcpt.encode("utf-8") for rcpt in recipients]
    exchange: _Pipelined | _Stepwise
    if client.supports_extension("pipelining"):
        exchange = _Pipelined(conn, mail, addresses, timeout)
    else:
        exchange = _Stepwise(conn, mail, addresses, timeout)
    try:
        response = await exchange.mail()
    except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
        # An upstream may drop an idle connection just as we reuse it (a race with its
        # idle timeout): that is a stale connection, not a failed delivery.
        if conn.messages > 0:
            raise StaleConnection(str(exc)) from exc
        raise
    reply = _reply(response)
    if reply.code != 250:
        await exchange.abandon()
        if reply.code == 421:
            conn.broken = True
        else:
            await _reset(conn, timeout)
        trouble = reply if reply.is_temporary else None
        return Transaction(_all(reply, len(recipients)), host_trouble=trouble,
                           round_trips=exchange.round_trips)

    results: list[RecipientResult | None] = []
    for index in range(len(recipients)):
        response = await exchange.rcpt()
        if response.code in (250, 251):
            results.append(None)  # accepted for now; the final-dot reply decides
            continue
        reply = _reply(response)
        if reply.code == 421:
            # RFC 5321 section 3.8: the server is closing the channel.
            conn.broken = True
            await exchange.abandon()
            rest = [RecipientResult(reply)] * (len(recipients) - index)
            return Transaction([r or RecipientResult(reply) for r in results] + rest,
                               host_trouble=reply, round_trips=exchange.round_trips)
        if reply.code == 452 and None in results:
            # RFC 5321 section 4.5.3.1.10: "too many recipients" is no failure; the
            # client sends the rest in a new transaction after this one. Without
            # pipelining the rest are not even asked for; with it, each recipient
            # keeps its own answer (a later one may have been accepted).
            if not exchange.pipelined:
                results += [RecipientResult(reply, again=True)] * (len(recipients) - index)
                break
            results.append(RecipientResult(reply, again=True, own=True))
            continue
        results.append(RecipientResult(reply, own=True))

    response = await exchange.data(accepted=None in results)
    if None not in results:
        await _reset(conn, timeout)
        return Transaction([r for r in results if r is not None],
                           round_trips=exchange.round_trips)
    if response.code == 354:
        protocol = client.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost")
        try:
            async with asyncio.timeout(settings.data_timeout):
                await _send_content(protocol, content)
            response = await protocol.read_response(timeout=settings.data_timeout)
            exchange.round_trips += 1
        except TimeoutError as exc:
            client.close()
            raise aiosmtplib.SMTPTimeoutError("timed out sending the message") from exc
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError,
                ConnectionError):
            client.close()  # what aiosmtplib's data() does: never reuse a desynced session
            raise
    final = _reply(response)
    if final.code == 421:
        conn.broken = True
    elif final.code != 250:
        await _reset(conn, timeout)
    trouble = final if final.is_temporary else None
    return Transaction([RecipientResult(final) if r is None else r for r in results],
                       host_trouble=trouble, round_trips=exchange.round_trips)


class _Stepwise:
    """MAIL, each RCPT and DATA one at a time, each waiting for its reply."""

    pipelined = False

    def __init__(self, conn: Connection, mail: bytes, rcpts: list[bytes], timeout: float):
        self.client = conn.client
        self.mail_command = mail
        self.rcpts = iter(rcpts)
        self.timeout = timeout
        self.round_trips = 0

    async def _command(self, command: bytes) -> aiosmtplib.SMTPResponse:
        self.round_trips += 1
        return await self.client.execute_command(command, timeout=self.timeout)

    async def mail(self) -> aiosmtplib.SMTPResponse:
        return await self._command(self.mail_command)

    async def rcpt(self) -> aiosmtplib.SMTPResponse:
        return await self._command(next(self.rcpts))

    async def data(self, accepted: bool) -> aiosmtplib.SMTPResponse:
        if not accepted:  # no DATA without a recipient
            return aiosmtplib.SMTPResponse(503, "no valid recipients")
        return await self._command(b"DATA")

    async def abandon(self) -> None:
        """The transaction ends before DATA: nothing was sent ahead."""


class _Pipelined:
    """RFC 2920: MAIL, every RCPT and DATA in one write, the replies read back in order
    (one round trip instead of one per command)."""

    pipelined = True

    def __init__(self, conn: Connection, mail: bytes, rcpts: list[bytes], timeout: float):
        self.conn = conn
        self.timeout = timeout
        self.batch = b"".join(c + b"\r\n" for c in (mail, *rcpts, b"DATA"))
        self.count = len(rcpts) + 2
        self.replies: list[aiosmtplib.SMTPResponse] | None = None
        self.taken = 0
        self.round_trips = 0

    async def _next(self) -> aiosmtplib.SMTPResponse:
        if self.replies is None:
            self.round_trips += 1
            self.replies = await read_pipelined(self.conn, self.batch, self.count,
                                                self.timeout)
        reply = self.replies[self.taken]
        self.taken += 1
        return reply

    async def mail(self) -> aiosmtplib.SMTPResponse:
        return await self._next()

    async def rcpt(self) -> aiosmtplib.SMTPResponse:
        return await self._next()

    async def data(self, accepted: bool) -> aiosmtplib.SMTPResponse:
        reply = await self._next()
        if reply.code == 354 and not accepted:
            # RFC 2920 section 3.1: a server that starts DATA with no valid recipient
            # gets an empty message, which it must refuse; nothing is delivered.
            await self._finish_empty_data()
            return aiosmtplib.SMTPResponse(503, "no valid recipients")
        return reply

    async def abandon(self) -> None:
        """MAIL or a RCPT ended the transaction: the rest of the replies are read (the
        server answered them), and a DATA it accepted gets an empty message."""
        if self.replies is None:
            return
        data = self.replies[-1]
        self.taken = len(self.replies)
        if data.code == 354:
            await self._finish_empty_data()

    async def _finish_empty_data(self) -> None:
        client = self.conn.client
        protocol = client.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost")
        protocol.write(b".\r\n")
        self.round_trips += 1
        await protocol.read_response(timeout=self.timeout)
        self.conn.broken = True  # a server that misread the batch is not to be trusted


async def read_pipelined(
    conn: Connection, batch: bytes, count: int, timeout: float
) -> list[aiosmtplib.SMTPResponse]:
    """Write `batch` (several commands) and read `count` replies.

    aiosmtplib's protocol keeps one reply at a time and drops what arrives while one
    waits to be picked up, so for the batch the transport reads into a reader of our
    own (asyncio's set_protocol), handed back to aiosmtplib afterwards.
    """
    protocol = conn.client.protocol
    transport = protocol.transport if protocol is not None else None
    if protocol is None or transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("connection lost")
    reader = _ReplyReader(count, protocol)
    transport.set_protocol(reader)
    # A timer that fails the reader rather than wait_for: no task per transaction.
    timer = asyncio.get_running_loop().call_later(timeout, reader.time_out)
    try:
        transport.write(batch)  # type: ignore[attr-defined]
        return await reader.done
    except TimeoutError as exc:
        conn.broken = True
        raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") \
            from exc
    finally:
        timer.cancel()
        if not transport.is_closing():
            transport.set_protocol(protocol)
        if reader.buffer:
            conn.broken = True  # more than we asked for: the session is out of step


class _ReplyReader(asyncio.Protocol):
    """Collects `count` SMTP replies (RFC 5321 section 4.2: "NNN-" lines continue a
    reply, "NNN " ends it) from the transport."""

    def __init__(self, count: int, original: asyncio.BaseProtocol) -> None:
        self.count = count
        self.original = original
        self.buffer = bytearray()
        self.lines: list[str] = []
        self.replies: list[aiosmtplib.SMTPResponse] = []
        self.done: asyncio.Future[list[aiosmtplib.SMTPResponse]] = \
            asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.done.done():
            end = self.buffer.find(b"\n")
            if end < 0:
                return
            line = bytes(self.buffer[:end + 1]).decode("utf-8", "surrogateescape").rstrip()
            del self.buffer[:end + 1]
            code = line[:3]
            if len(code) < 3 or not code.isdigit():
                self.done.set_exception(aiosmtplib.SMTPResponseException(
                    -1, f"malformed reply line {line[:80]!r}"))
                return
            self.lines.append(line[4:])
            if line[3:4] != "-":
                self.replies.append(aiosmtplib.SMTPResponse(int(code), "\n".join(self.lines)))
                self.lines = []
                if len(self.replies) == self.count:
                    self.done.set_result(self.replies)

    def time_out(self) -> None:
        if not self.done.done():
            self.done.set_exception(TimeoutError())

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(aiosmtplib.SMTPServerDisconnected("connection lost"))
            self.done.exception()  # retrieved here; the caller awaits it
        self.original.connection_lost(exc)


_BARE_LINE_ENDING = re.compile(rb"\r\n|\n|\r(?!\n)")


async def _send_content(protocol: SMTPProtocol, content: Content) -> None:
    """The message and its final dot, a piece at a time, each written once the
    connection took the previous one (a 10 MB message is never buffered whole)."""
    # aiosmtplib keeps what the server says only while it expects a reply: one that
    # comes early (a 5xx before the end) must not be dropped while we are writing.
    protocol._response_pending = True
    checked = content.checked
    as_is = checked is not None and not checked.dot_lines  # nothing to stuff or mend
    stuffed = b""
    async for piece in content.pieces(lines=not as_is):
        if stuffed:
            protocol.write(stuffed)
            await protocol._drain_helper()  # flow control: wait while the socket is full
        stuffed = piece if as_is else dot_stuffed(piece, end=False, paired=checked is not None)
    # The last piece goes with the final dot: one write (and one system call) for the
    # whole of a small message.
    protocol.write(stuffed + (b".\r\n" if not stuffed or stuffed.endswith(b"\n")
                              else b"\r\n.\r\n"))


def dot_stuffed(data: bytes, end: bool = True, paired: bool = False) -> bytes:
    """The message as DATA sends it: CRLF line ends, ending in CRLF, and a dot added to
    every line that starts with one (RFC 5321 section 4.5.2). A piece of a message
    (`end` False, starting at a line start) gets no CRLF added. `paired`: the listener
    found CR and LF only as CRLF pairs in these bytes (relay.queue.content.Checked)."""
    if not paired and (data.count(b"\n") != data.count(b"\r\n")
                       or data.count(b"\r") != data.count(b"\n")):
        # Never for mail from our listener (it refuses bare CR and LF), but a message
        # read back from the spool is not taken on trust: three passes over each piece.
        data = _BARE_LINE_ENDING.sub(b"\r\n", data)
    if end and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b".") or b"\r\n." in data:
        data = (b"\r\n" + data).replace(b"\r\n.", b"\r\n..")[2:]
    return data


async def _reset(conn: Connection, timeout: float) -> None:
    # After a refused transaction the connection is clean only once RSET succeeded;
    # otherwise the pool throws it away after this message.
    try:
        response = await conn.client.rset(timeout=timeout)
    except (aiosmtplib.SMTPException, OSError):
        conn.broken = True
        return
    if response.code != 250:
        conn.broken = True
