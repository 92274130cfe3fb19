"""DMARC (RFC 7489): the From: domain's published policy and its alignment with SPF and DKIM."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Literal

from publicsuffixlist import PublicSuffixList

from relay.checks.dns import DnsTempError, Resolver
from relay.headers import header_fields

DmarcResult = Literal["pass", "fail", "none", "temperror", "permerror"]
DmarcPolicy = Literal["none", "quarantine", "reject"]
Alignment = Literal["r", "s"]
_POLICIES = ("none", "quarantine", "reject")


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """The tags of a DMARC record that decide a verdict (RFC 7489 section 6.3)."""

    policy: DmarcPolicy
    subdomain_policy: DmarcPolicy | None = None
    adkim: Alignment = "r"
    aspf: Alignment = "r"


@dataclass(frozen=True, slots=True)
class DmarcOutcome:
    """The verdict for one message: ``policy`` is what the domain owner asks for
    (p=, or sp= for a subdomain covered by its organisational domain's record), ""
    when no record applies."""

    result: DmarcResult
    from_domain: str = ""
    policy: DmarcPolicy | Literal[""] = ""
    reason: str = ""


@functools.cache
def _suffixes() -> PublicSuffixList:
    # The list bundled with the package: no network fetch, ever.
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """RFC 7489 section 3.2: the public suffix plus one label (the domain itself when it
    is a public suffix or shorter)."""
    domain = domain.lower().rstrip(".")
    return _suffixes().privatesuffix(domain) or domain


def aligned(identifier: str, from_domain: str, mode: Alignment) -> bool:
    """RFC 7489 section 3.1: strict is the same name, relaxed the same organisational
    domain."""
    a, b = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


def author_domain(message: bytes) -> str | None:
    """The RFC5322.From domain, or None when there is not exactly one From: field with
    exactly one address (RFC 7489 section 6.6.1: such a message cannot be evaluated)."""
    froms = [value for name, value in header_fields(message) if name.lower() == "from"]
    if len(froms) != 1:
        return None
    addresses = [addr for _, addr in getaddresses(froms) if addr]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    domain = addresses[0].rpartition("@")[2].strip().rstrip(".").lower()
    return domain or None


def parse_record(text: bytes) -> DmarcRecord | str | None:
    """A record, None when ``text`` is not a DMARC record at all (it is skipped), or
    why a DMARC record is unusable."""
    tags: dict[str, str] = {}
    for part in text.decode("ascii", "replace").split(";"):
        key, eq, value = part.partition("=")
        if eq:
            tags.setdefault(key.strip().lower(), value.strip())
    first = text.decode("ascii", "replace").split(";", 1)[0].replace(" ", "")
    if first != "v=DMARC1":
        return None  # RFC 7489 section 6.6.3: records not starting so are discarded
    policy = tags.get("p", "").lower()
    if policy not in _POLICIES:
        if "rua" in tags:
            # RFC 7489 section 6.6.3: with a usable rua=, act as if p=none.
            policy = "none"
        else:
            return f"invalid p={tags.get('p', '')!s}"
    sub = tags.get("sp", "").lower()
    adkim, aspf = tags.get("adkim", "r").lower(), tags.get("aspf", "r").lower()
    if adkim not in ("r", "s") or aspf not in ("r", "s"):
        return "invalid adkim= or aspf="
    return DmarcRecord(
        policy,  # type: ignore[arg-type]
        sub if sub in _POLICIES else None,  # type: ignore[arg-type]
        adkim,  # type: ignore[arg-type]
        aspf,  # type: ignore[arg-type]
    )


async def _record_at(
    resolver: Resolver, domain: str, lifetime: float
) -> DmarcRecord | str | None:
    records = [
        r for r in (parse_record(t) for t in await resolver.txt(f"_dmarc.{domain}",
                                                                 lifetime=lifetime))
        if r is not None
    ]
    if len(records) != 1:
        # RFC 7489 section 6.6.3: none, or more than one, means no policy here.
        return None
    return records[0]


async def evaluate_dmarc(
    resolver: Resolver,
    from_domain: str | None,
    spf: tuple[str, str],
    dkim_passes: Iterable[str],
    *,
    timeout: float,
) -> DmarcOutcome:
    """The DMARC verdict for a message from ``from_domain``, given the SPF (result,
    domain checked) and the d= domains of the DKIM signatures that passed.

    Never raises: a DNS failure is temperror.
    """
    if from_domain is None:
        return DmarcOutcome("permerror", reason="not exactly one author address in From:")
    org = organizational_domain(from_domain)
    try:
        async with asyncio.timeout(timeout):
            # RFC 7489 section 6.6.3: the From domain, then its organisational domain.
            record = await _record_at(resolver, from_domain, timeout)
            inherited = False
            if record is None and org != from_domain:
                record = await _record_at(resolver, org, timeout)
                inherited = True
    except (DnsTempError, TimeoutError):
        return DmarcOutcome("temperror", from_domain, reason="DMARC record lookup failed")
    if record is None:
        return DmarcOutcome("none", from_domain)
    if isinstance(record, str):
        return DmarcOutcome("permerror", from_domain, reason=record)
    policy = record.policy
    if inherited and record.subdomain_policy is not None:
        policy = record.subdomain_policy
    spf_result, spf_domain = spf
    # RFC 7489 section 4.2: one aligned pass, by SPF or by DKIM, is a DMARC pass.
    passes = (spf_result == "pass" and aligned(spf_domain, from_domain, record.aspf)) or any(
        aligned(d, from_domain, record.adkim) for d in dkim_passes
    )
    return DmarcOutcome("pass" if passes else "fail", from_domain, policy)
