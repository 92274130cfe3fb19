"""Header fields the relay writes or removes, handled on raw message bytes."""

from __future__ import annotations

import email.parser
import email.policy
import re

_AUTH_RESULTS = re.compile(rb"^authentication-results[ \t]*:", re.IGNORECASE)
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE)
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")


def header_safe(text: str) -> str:
    """Text fit for a header we write: printable ASCII only, so a client-supplied value
    (HELO name, address, AUTH identity) can never end a line and start a new header."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def split_fields(message: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (each with its folded continuation lines and CRLFs) and the rest.

    RFC 5322 section 2.2.3: a line starting with SP or HTAB continues the field before it.
    """
    end = message.find(b"\r\n\r\n")
    head, rest = (message, b"") if end < 0 else (message[: end + 2], message[end + 2 :])
    if head.startswith(b"\r\n"):  # no header at all
        return [], message
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields, rest


def authserv_id(field: bytes) -> str:
    """The authserv-id of an Authentication-Results field (RFC 8601 section 2.2)."""
    value = field.split(b":", 1)[1].decode("utf-8", "replace")
    value = _COMMENT.sub(" ", " ".join(value.split()))
    token = re.split(r"[\s;]", value.strip(), maxsplit=1)[0]
    return token.strip('"').lower()


def strip_forged_authentication_results(message: bytes, our_id: str) -> tuple[bytes, int]:
    """Remove Authentication-Results fields that claim to come from `our_id`.

    RFC 8601 section 5: a border MTA must remove such fields before adding its own, or a
    client could forge our verdict. Returns the message and the number removed.
    """
    fields, rest = split_fields(message)
    ours = our_id.lower()
    kept = [f for f in fields if not (_AUTH_RESULTS.match(f) and authserv_id(f) == ours)]
    removed = len(fields) - len(kept)
    if not removed:
        return message, 0
    return b"".join(kept) + rest, removed


def header_stats(message: bytes) -> tuple[int, int]:
    """(size of the header section in bytes, number of Received: fields)."""
    fields, _ = split_fields(message)
    return sum(len(f) for f in fields), sum(1 for f in fields if _RECEIVED.match(f))


def header_fields(message: bytes) -> tuple[tuple[str, str], ...]:
    """(name, decoded value) of each header field, for matching only: never re-serialised.

    Only the header section is parsed, however long the body."""
    end = message.find(b"\r\n\r\n")
    block = message if end < 0 else message[: end + 2]
    parsed = email.parser.BytesHeaderParser(policy=email.policy.SMTP).parsebytes(block)
    return tuple((name, str(value)) for name, value in parsed.items())
