"""Rewriting: what the rewrite actions of a policy change in a message, decided by the
walk at DATA and applied once, before the message is signed and stored.

Stages (as Postfix's cleanup applies canonical maps after smtpd's checks): every rule,
limit and check sees the addresses the client sent (after [server] qualify_domain); SPF
judges the sender the client used. The rewritten envelope is what is spooled, delivered
and bounced to; the rewritten header section is what DKIM signs.

Of each kind of `rewrite_*` rule the first that matches applies (like `route`); every
matching `archive` rule adds its copy and every matching `strip` rule its fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.headers import header_and_rest
from relay.policy.headeredits import drops, masquerade_from, strip_fields
from relay.policy.maps import AddressMap


@dataclass(frozen=True, slots=True)
class MapEdit:
    """`rewrite_sender`, `rewrite_recipient` or `rewrite_header_from`: a map, and for
    From: the Reply-To to set when the From: was rewritten."""

    map: AddressMap
    reply_to: str | None = None


@dataclass(frozen=True, slots=True)
class Archive:
    """`archive`: a copy of the message to `recipients` (never named in its headers),
    stored as a message of its own from `sender` (so that its bounces go there, "" = none)
    over `route` (None: the message's own)."""

    recipients: tuple[str, ...]
    route: str | None
    sender: str


@dataclass(frozen=True, slots=True)
class Strip:
    """`strip`: header fields removed by name or `re:` pattern, and with `internal` the
    client's Received: fields naming internal addresses."""

    names: frozenset[str]  # lower case
    patterns: tuple[re.Pattern[str], ...]
    internal: bool
    spec: str  # as written, for traces


Edit = MapEdit | Archive | Strip


@dataclass(frozen=True, slots=True)
class Rewrites:
    """What one walk's matching rewrite rules ask for, each with its rule's name."""

    sender: tuple[str, MapEdit] | None = None
    recipient: tuple[str, MapEdit] | None = None
    header_from: tuple[str, MapEdit] | None = None
    archives: tuple[tuple[str, Archive], ...] = ()
    strips: tuple[tuple[str, Strip], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.sender or self.recipient or self.header_from or self.archives
                    or self.strips)


NONE = Rewrites()


@dataclass(frozen=True, slots=True)
class Copy:
    """An archive copy: stored beside the message, in the same spool transaction."""

    sender: str
    recipients: tuple[str, ...]
    route: str | None
    rule: str


@dataclass(frozen=True, slots=True)
class Rewritten:
    """The envelope and message after rewriting, and one line per change, for the log
    and the dry run's trace."""

    sender: str
    recipients: tuple[str, ...]
    message: bytes
    copies: tuple[Copy, ...] = ()
    changes: tuple[str, ...] = ()


def apply(rewrites: Rewrites, sender: str, recipients: tuple[str, ...],
          message: bytes) -> Rewritten:
    """The rewrites applied. Raises relay.policy.maps.MapError when a map's `re:` value
    makes something that is not an address (the caller answers 451: mail is never sent
    unchanged when the policy says to change it)."""
    if not rewrites:
        return Rewritten(sender, recipients, message)
    changes: list[str] = []
    if rewrites.sender is not None and sender:
        rule, edit = rewrites.sender
        new = edit.map.lookup(sender)
        if new is not None and new != sender:
            changes.append(f"rewrite_sender <{sender}> -> <{new}> (rule {rule})")
            sender = new
    if rewrites.recipient is not None:
        rule, edit = rewrites.recipient
        mapped: list[str] = []
        for rcpt in recipients:
            new = edit.map.lookup(rcpt) or rcpt
            if new != rcpt:
                changes.append(f"rewrite_recipient <{rcpt}> -> <{new}> (rule {rule})")
            if new.lower() in (m.lower() for m in mapped):
                # Two recipients that became one are delivered once.
                changes.append(f"rewrite_recipient <{new}> twice: delivered once (rule {rule})")
                continue
            mapped.append(new)
        recipients = tuple(mapped)

    head, rest = header_and_rest(message)
    if rewrites.header_from is not None:
        rule, edit = rewrites.header_from
        head, pairs = masquerade_from(head, edit.map.lookup, edit.reply_to)
        for old, new in pairs:
            changes.append(f"rewrite_header_from {old} -> {new} (rule {rule})")
        if pairs and edit.reply_to is not None:
            changes.append(f"rewrite_header_from sets Reply-To: {edit.reply_to} (rule {rule})")
    for rule, strip in rewrites.strips:
        head, removed = strip_fields(head, drops(strip.names, strip.patterns), strip.internal)
        if removed:
            changes.append(f"strip {', '.join(removed)} (rule {rule})")

    copies: list[Copy] = []
    archived = {r.lower() for r in recipients}
    for rule, archive in rewrites.archives:
        to = tuple(a for a in archive.recipients if a.lower() not in archived)
        archived.update(a.lower() for a in to)
        if to:
            copies.append(Copy(archive.sender, to, archive.route, rule))
            route = f" route {archive.route}" if archive.route else ""
            changes.append(f"archive copy to {', '.join(f'<{a}>' for a in to)} from "
                           f"<{archive.sender}>{route} (rule {rule})")
    return Rewritten(sender, recipients, head + rest, tuple(copies), tuple(changes))
