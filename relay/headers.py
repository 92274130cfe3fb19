"""Header fields the relay writes or removes, handled on raw message bytes."""

from __future__ import annotations

import email.parser
import email.policy
import re

_AUTH_RESULTS = re.compile(rb"^authentication-results[ \t]*:", re.IGNORECASE)
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE)
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# RFC 5322 section 2.1.1: lines SHOULD be at most 78 characters and MUST be at most 998.
FOLD_AT = 78
MAX_LINE = 998
# The longest value (address, HELO name, problem text) a header we write interpolates:
# a mailbox is at most 64 + 1 + 255 octets (RFC 5321 section 4.5.3.1); anything longer
# is cut, so no unbreakable word can push a line past MAX_LINE.
MAX_VALUE = 320


def header_safe(text: str) -> str:
    """Text fit for a header we write: printable ASCII only, so a client-supplied value
    (HELO name, address, AUTH identity) can never end a line and start a new header."""
    if text.isascii() and text.isprintable():  # nearly always: nothing to replace
        return text
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def field_text(text: str, utf8: bool = False) -> str:
    """A value for a header we write: no control characters (so nothing a client sent
    can end a line), ASCII unless the message is SMTPUTF8 (RFC 6532 section 3.2 lets
    such a message carry UTF-8 in its header fields), at most MAX_VALUE characters."""
    text = _CONTROL.sub("", text)
    if not utf8:
        text = "".join(c if c.isascii() else "?" for c in text)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 3] + "..."


def fold(field: str) -> str:
    """``field`` (its lines joined by CRLF) with every line longer than FOLD_AT folded
    before a space, ending in CRLF.

    RFC 5322 section 2.2.3: folding inserts CRLF before existing whitespace, and
    unfolding removes that CRLF, so the value reads exactly as before. Every space in
    the fields we write stands between tokens, in a comment or in a quoted-string, all
    places where FWS is allowed. A word longer than the line stays whole: the values we
    interpolate are bounded (field_text), which keeps every line under MAX_LINE.
    """
    out: list[str] = []
    for line in field.split("\r\n"):
        while len(line) > FOLD_AT:
            lead = len(line) - len(line.lstrip(" \t"))
            cut = line.rfind(" ", lead + 1, FOLD_AT + 1)
            if cut <= lead:
                cut = line.find(" ", FOLD_AT + 1)
            if cut <= lead:
                break
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return "\r\n".join(out) + "\r\n"


# RFC 5322 section 3.6.8: a field name is printable ASCII but ":", then the colon (the
# obsolete syntax of section 4.5 allows whitespace before it).
_FIELD_START = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")


def header_section(message: bytes) -> bytes:
    """The header section: up to and with the CRLF of its last field, without the empty
    line after it (RFC 5322 section 2.1); without an empty line the whole message."""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


def header_and_rest(message: bytes) -> tuple[bytes, bytes]:
    """The header section (header_section) and what follows it: the empty line and the
    body."""
    head = header_section(message)
    return head, message[len(head):]


def header_problem(message: bytes) -> str | None:
    """Why the header section of ``message`` is not RFC 5322 syntax, or None.

    Every line before the empty line must start a field (name, colon) or continue one
    (RFC 5322 section 2.2.3). A message whose first line is body text fails: it cannot be
    DKIM-signed or parsed by a receiver, however often it is retried.
    """
    head = header_section(message)
    if head.startswith(b"\r\n"):
        return None  # an empty header section
    for number, line in enumerate(head.split(b"\r\n"), start=1):
        if not line:
            continue  # the end of the section (or an empty message)
        if line[:1] in (b" ", b"\t"):
            if number == 1:
                return "line 1 continues a field that does not exist"
            continue
        if not _FIELD_START.match(line):
            return f"line {number} is not a header field"
    return None


def split_fields(message: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (each with its folded continuation lines and CRLFs) and the rest.

    RFC 5322 section 2.2.3: a line starting with SP or HTAB continues the field before it.
    """
    head, rest = header_and_rest(message)
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
    """The authserv-id of an Authentication-Results field (RFC 8601 section 2.2),
    normalised for comparison: comments (nested ones too) dropped, unquoted, lower case,
    without a trailing dot (a domain name with and without it is the same name)."""
    value = field.split(b":", 1)[1].decode("utf-8", "replace")
    value = " ".join(value.split())
    while True:
        stripped = _COMMENT.sub(" ", value)
        if stripped == value:
            break
        value = stripped
    token = re.split(r"[\s;]", value.strip(), maxsplit=1)[0]
    return normal_id(token.strip('"'))


def normal_id(authserv: str) -> str:
    return authserv.strip().lower().rstrip(".")


def strip_forged_authentication_results(message: bytes, our_id: str) -> tuple[bytes, int]:
    """Remove Authentication-Results fields that claim to come from `our_id`.

    RFC 8601 section 5: a border MTA must remove such fields before adding its own, or a
    client could forge our verdict. Returns the message and the number removed.
    """
    fields, rest = split_fields(message)
    ours = normal_id(our_id)
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
    block = header_section(message)
    parsed = email.parser.BytesHeaderParser(policy=email.policy.SMTP).parsebytes(block)
    return tuple((name, str(value)) for name, value in parsed.items())
