"""Strict checks of envelope addresses, stricter than aiosmtpd's lenient parser."""

from __future__ import annotations

import functools
import re

# RFC 5321 section 4.1.2 dot-atom, minus "%" and "!": a relay in front of app servers has
# no business honouring the old source-routing conventions (Postfix allow_untrusted_routing).
# Quoted local parts are refused too: '"u@victim"@relay' is a classic relay trick.
_ATEXT = r"A-Za-z0-9#$&'*+/=?^_`{|}~-"
_LOCAL = re.compile(rf"^[{_ATEXT}]+(\.[{_ATEXT}]+)*$")
# RFC 6531 section 3.3: with SMTPUTF8, atext also takes any non-ASCII UTF-8 character.
_LOCAL_UTF8 = re.compile(rf"^[\u00a0-\U0010ffff{_ATEXT}]+(\.[\u00a0-\U0010ffff{_ATEXT}]+)*$")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
# Controls, space, DEL, C1 controls and lone surrogates (from undecodable bytes).
_FORBIDDEN = re.compile("[\x00-\x20\x7f-\x9f\ud800-\udfff]")

# RFC 5321 section 4.5.3.1: local part 64, domain 255, path 256 octets (incl. brackets).
MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 254


# App servers send from and to the same few addresses over and over.
@functools.lru_cache(maxsize=4096)
def problem(address: str, utf8: bool = False) -> str | None:
    """Why `address` is not acceptable as a mailbox, or None when it is fine.

    `utf8` is true when the transaction carries the SMTPUTF8 parameter (RFC 6531); only
    then may the address hold non-ASCII characters.
    """
    if not address:
        return "empty address"
    if address.startswith("@"):
        # RFC 5321 section 4.1.1.3 / appendix C: "<@a,@b:u@c>"; aiosmtpd would strip it.
        return "source route"
    if len(address.encode("utf-8", "surrogatepass")) > MAX_PATH:
        return "address too long"
    if _FORBIDDEN.search(address):
        return "control character or space in address"
    if not address.isascii() and not utf8:
        return "non-ASCII address without SMTPUTF8"
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return "address not fully qualified"
    if len(local.encode("utf-8")) > MAX_LOCAL:
        return "local part too long"
    if not (_LOCAL_UTF8 if utf8 else _LOCAL).match(local):
        return "invalid local part"
    return domain_problem(domain)


def domain_problem(domain: str) -> str | None:
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        return "domain too long"
    if domain.startswith("["):
        return "address literals are not accepted"
    labels = domain.split(".")
    if len(labels) < 2:
        return "domain not fully qualified"
    for label in labels:
        if not label.isascii():
            # RFC 5890 U-label: acceptable when it converts to a valid A-label.
            try:
                label = label.encode("idna").decode("ascii")
            except UnicodeError:
                return "invalid domain"
        if not _LABEL.match(label):
            return "invalid domain"
    if labels[-1].isdigit():
        # RFC 1123 section 2.1: a top-level domain is alphabetic, so "u@10.0.0.1" is an
        # address literal in disguise.
        return "numeric top-level domain"
    return None


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()
