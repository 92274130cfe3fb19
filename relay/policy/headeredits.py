"""Edits of a message's header section: From: masquerading, Reply-To, removed fields.

Pure functions over the header section as bytes (every field with its CRLF, up to the
empty line); the body is never read or touched. Every byte not named by an edit stays as
it was: a field is rewritten only where its address is, and a removed field goes with its
folded continuation lines (RFC 5322 section 2.2.3).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection

from relay.headers import split_fields
from relay.ipaddr import INTERNAL_NETWORKS, in_networks

# RFC 5322 section 2.2: a field name, then the colon (section 4.5: whitespace before it
# in the obsolete syntax).
_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
# An IP address as Received: fields name them: bare IPv4, or an address literal
# ("[10.0.0.5]", "[IPv6:fd00::5]", "[fd00::5]").
_IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")
_LITERAL = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\]", re.IGNORECASE)


def field_name(field: bytes) -> str:
    found = _NAME.match(field)
    return found.group(1).decode("ascii").lower() if found else ""


def address_spans(value: str) -> list[tuple[int, int]]:
    """Where the addresses are in an address-list field value (RFC 5322 section 3.4):
    the addr-spec of each mailbox, inside its angle brackets or bare; a group's display
    name and the display names, comments and quoted strings around them are skipped."""
    spans: list[tuple[int, int]] = []
    bare: list[int] = []  # positions of the current mailbox's text outside <>, CFWS
    angle: int | None = None  # where the current <...> started
    angled = False
    quoted = False
    depth = 0  # comment nesting
    i = 0
    while i < len(value):
        c = value[i]
        if quoted or depth:
            if c == "\\":
                bare.extend((i, i + 1))
                i += 2
                continue
            if quoted:
                bare.append(i)
                quoted = c != '"'
            else:
                depth += {"(": 1, ")": -1}.get(c, 0)
        elif angle is not None:
            if c == ">":
                spans.append(_trimmed(value, angle, i))
                angle, angled = None, True
            elif c == '"':
                quoted = True  # a quoted local part inside the brackets
        elif c == "(":
            depth = 1
        elif c == '"':
            quoted = True
            bare.append(i)
        elif c == "<":
            angle = i + 1
        elif c in ",;":
            _close(value, bare, angled, spans)
            bare, angled = [], False
        elif c == ":":
            bare = []  # what came before was a group's display name
        elif c not in " \t\r\n":
            bare.append(i)
        i += 1
    _close(value, bare, angled, spans)
    return spans


def _trimmed(value: str, start: int, end: int) -> tuple[int, int]:
    while start < end and value[start] in " \t\r\n":
        start += 1
    while end > start and value[end - 1] in " \t\r\n":
        end -= 1
    # RFC 5322 section 4.4 obs-route: "<@relay:user@example.com>" keeps only the address.
    if value.startswith("@", start) and ":" in value[start:end]:
        start = value.index(":", start, end) + 1
    return start, end


def _close(value: str, bare: list[int], angled: bool, spans: list[tuple[int, int]]) -> None:
    if angled or not bare:
        return
    start, end = bare[0], bare[-1] + 1
    if "@" in value[start:end]:
        spans.append((start, end))


Lookup = Callable[[str], str | None]


def masquerade_from(
    head: bytes, lookup: Lookup, reply_to: str | None = None
) -> tuple[bytes, list[tuple[str, str]]]:
    """`head` with each address of every From: field replaced by what `lookup` maps it to
    (display names, comments and folding kept), and the (old, new) addresses replaced.

    RFC 5322 section 3.6.2 wants one From:, but a message may carry several, or a list of
    mailboxes: every address in every From: field is mapped, so no original is left for a
    receiver to show. With `reply_to`, once some From: address was rewritten, a Reply-To
    field says it: the first Reply-To is replaced in place (any others removed), or one is
    added right after the first From:.
    """
    fields, rest = split_fields(head)  # rest: b"", or all of an empty section
    changed: list[tuple[str, str]] = []
    first_from = -1
    for index, field in enumerate(fields):
        if field_name(field) != "from":
            continue
        first_from = index if first_from < 0 else first_from
        colon = field.index(b":") + 1
        value = field[colon:].decode("utf-8", "surrogateescape")
        here: list[tuple[str, str]] = []
        for start, end in reversed(address_spans(value)):  # from the end: spans stay valid
            new = lookup(value[start:end])
            if new is not None and new != value[start:end]:
                here.insert(0, (value[start:end], new))
                value = value[:start] + new + value[end:]
        changed.extend(here)
        fields[index] = field[:colon] + value.encode("utf-8", "surrogateescape")
    if changed and reply_to is not None:
        line = f"Reply-To: {reply_to}\r\n".encode()
        places = [i for i, f in enumerate(fields) if field_name(f) == "reply-to"]
        if places:
            fields[places[0]] = line
            fields = [f for i, f in enumerate(fields) if i not in places[1:]]
        else:
            fields.insert(first_from + 1, line)
    return b"".join(fields) + rest, changed


def strip_fields(
    head: bytes, drop: Callable[[str], bool], internal_received: bool = False
) -> tuple[bytes, list[str]]:
    """`head` without the fields whose (lower-case) name `drop` says, and, with
    `internal_received`, without the Received: fields naming an internal address
    (relay.ipaddr.INTERNAL_NETWORKS); and the names of the fields removed."""
    kept: list[bytes] = []
    removed: list[str] = []
    fields, rest = split_fields(head)
    for field in fields:
        name = field_name(field)
        if name and (drop(name) or (internal_received and name == "received"
                                    and names_internal_address(field))):
            removed.append(field[: field.index(b":")].decode("ascii").rstrip(" \t"))
        else:
            kept.append(field)
    return b"".join(kept) + rest, removed


def names_internal_address(field: bytes) -> bool:
    text = field.decode("ascii", "replace")
    candidates = [*_IPV4.findall(text), *_LITERAL.findall(text)]
    return any(in_networks(c, INTERNAL_NETWORKS) for c in candidates)


def drops(names: Collection[str], patterns: Collection[re.Pattern[str]]) -> Callable[[str], bool]:
    """A test of a lower-case field name: one of `names`, or found by one of `patterns`."""
    return lambda name: name in names or any(p.search(name) for p in patterns)
