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

BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_LINE_ENDING = Reply(550, "5.5.2", "Message contains bare CR, bare LF or NUL; not accepted")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")

LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error in processing, try again later")
QUEUE_WRITE_ERROR = Reply(451, "4.3.0", "Error: queue file write error")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")

# Every reply the relay can send on its own; tests check the whole table.
TABLE: tuple[Reply, ...] = (
    SENDER_OK,
    RECIPIENT_OK,
    DISCARDED,
    BAD_SENDER_SYNTAX,
    BAD_RECIPIENT_SYNTAX,
    BAD_LINE_ENDING,
    TOO_MANY_RECIPIENTS,
    LOCAL_ERROR,
    QUEUE_WRITE_ERROR,
    SHUTTING_DOWN,
    queued("X"),
    relay_denied("x@example.test"),
)
