"""Strict checks of envelope addresses, stricter than aiosmtpd's lenient parser."""

from __future__ import annotations

import re

# RFC 5321 section 4.1.2 dot-atom, minus "%" and "!": a relay in front of app servers has
# no business honouring the old source-routing conventions (Postfix allow_untrusted_routing).
_LOCAL = re.compile(r"^[A-Za-z0-9#$&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9#$&'*+/=?^_`{|}~-]+)*$")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

# RFC 5321 section 4.5.3.1: local part 64, domain 255, path 256 octets (incl. brackets).
MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 254


def problem(address: str) -> str | None:
    """Why `address` is not acceptable as a mailbox, or None when it is fine."""
    if not address:
        return "empty address"
    if len(address) > MAX_PATH:
        return "address too long"
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in address):
        return "control character or space in address"
    if not address.isascii():
        return "non-ASCII address"
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return "address not fully qualified"
    if len(local) > MAX_LOCAL:
        return "local part too long"
    if not _LOCAL.match(local):
        return "invalid local part"
    return domain_problem(domain)


def domain_problem(domain: str) -> str | None:
    if len(domain) > MAX_DOMAIN:
        return "domain too long"
    if domain.startswith("["):
        return "address literals are not accepted"
    labels = domain.split(".")
    if len(labels) < 2:
        return "domain not fully qualified"
    if not all(_LABEL.match(label) for label in labels):
        return "invalid domain"
    return None


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()
