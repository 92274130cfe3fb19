"""SMTP replies as values, and the table of the ones the relay sends itself."""

from __future__ import annotations

import re
from dataclasses import dataclass

_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: code, enhanced status (RFC 3463) and text.

    Temporary or permanent is derived from the code and never stored twice; the
    constructor refuses a status whose class disagrees with the code's first digit
    (maddy once sent "451 5.x.x" because it kept the class in two places).
    """

    code: int
    status: str
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")
        if not _STATUS.match(self.status):
            raise ValueError(f"malformed enhanced status: {self.status!r}")
        if self.status[0] != str(self.code)[0]:
            raise ValueError(f"class of {self.status} disagrees with code {self.code}")
        if "\r" in self.text or "\n" in self.text:
            raise ValueError("reply text must be one line")

    @property
    def is_success(self) -> bool:
        return self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.status, text)

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    @classmethod
    def parse(cls, line: str) -> Reply:
        """Parse "NNN X.Y.Z text" (as written in config and policy files)."""
        parts = line.strip().split(" ", 2)
        if len(parts) < 2 or not parts[0].isdigit():
            raise ValueError(f'expected "NNN X.Y.Z text", got "{line}"')
        text = parts[2] if len(parts) == 3 else ""
        return cls(int(parts[0]), parts[1], text)


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def relay_denied(recipient: str) -> Reply:
    # Postfix's wording and code (554) for an unauthorised relay attempt.
    return Reply(554, "5.7.1", f"<{recipient}>: Relay access denied")


SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
DISCARDED = Reply(250, "2.0.0", "Ok")
OK = Reply(250, "2.0.0", "Ok")
BYE = Reply(221, "2.0.0", "Bye")
HELP = Reply(214, "2.0.0", "See RFC 5321")
CANNOT_VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")

BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
MALFORMED_ADDRESS = Reply(553, "5.1.3", "Error: malformed address")
# RFC 6531 section 3.4: a non-ASCII address without the SMTPUTF8 parameter.
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
BAD_LINE_ENDING = Reply(550, "5.5.2", "Message contains bare CR, bare LF or NUL; not accepted")
BAD_COMMAND_LINE = Reply(501, "5.5.2", "Syntax error: bare LF or control character in command")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")  # RFC 5321 section 4.5.3.1.10
BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Error: command not recognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
PARAMETERS_NOT_RECOGNIZED = Reply(555, "5.5.4", "Parameters not recognized or not implemented")
SEND_HELO_FIRST = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header size exceeds limit")
TOO_MANY_HOPS = Reply(554, "5.4.0", "Error: too many hops")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")

TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
TLS_HANDSHAKE_FAILED = Reply(554, "5.7.0", "Command refused due to lack of security")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure")

LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error in processing, try again later")
QUEUE_WRITE_ERROR = Reply(451, "4.3.0", "Error: queue file write error")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures, closing connection")
# RFC 3030 BDAT is not offered; its binary chunk would be read as commands, so hang up.
BDAT_NOT_SUPPORTED = Reply(421, "4.5.0", "BDAT not supported, closing connection")
NOT_SMTP = Reply(502, "5.5.1", "Error: this is an SMTP server, closing connection")

# Every reply the relay can send on its own; tests check the whole table.
TABLE: tuple[Reply, ...] = (
    SENDER_OK,
    RECIPIENT_OK,
    DISCARDED,
    OK,
    BYE,
    HELP,
    CANNOT_VRFY,
    READY_FOR_TLS,
    AUTH_OK,
    BAD_SENDER_SYNTAX,
    BAD_RECIPIENT_SYNTAX,
    MALFORMED_ADDRESS,
    NEEDS_SMTPUTF8,
    BAD_LINE_ENDING,
    BAD_COMMAND_LINE,
    LINE_TOO_LONG,
    BAD_SYNTAX,
    UNKNOWN_COMMAND,
    NOT_IMPLEMENTED,
    SYNTAX_ERROR,
    PARAMETERS_NOT_RECOGNIZED,
    SEND_HELO_FIRST,
    NEED_MAIL,
    NESTED_MAIL,
    NEED_RCPT,
    MESSAGE_TOO_BIG,
    HEADER_TOO_BIG,
    TOO_MANY_HOPS,
    TOO_MANY_RECIPIENTS,
    INSUFFICIENT_STORAGE,
    TLS_REQUIRED,
    TLS_NOT_AVAILABLE,
    TLS_ALREADY_ACTIVE,
    TLS_HANDSHAKE_FAILED,
    AUTH_REQUIRED,
    AUTH_NEEDS_TLS,
    AUTH_NOT_ENABLED,
    ALREADY_AUTHENTICATED,
    AUTH_FAILED,
    AUTH_UNAVAILABLE,
    LOCAL_ERROR,
    QUEUE_WRITE_ERROR,
    SHUTTING_DOWN,
    TIMEOUT,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_ERRORS,
    TOO_MANY_AUTH_FAILURES,
    BDAT_NOT_SUPPORTED,
    NOT_SMTP,
    queued("X"),
    relay_denied("x@example.test"),
)
