"""SPF (RFC 7208) outcome for one transaction."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import re
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Literal, get_args

import dns.rdata
import spf

from relay.checks.dns import DnsTempError, Resolver
from relay.headers import field_text, fold

SpfResult = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
SpfIdentity = Literal["mailfrom", "helo"]
_RESULTS: frozenset[str] = frozenset(get_args(SpfResult))


@dataclass(frozen=True, slots=True)
class SpfOutcome:
    """What the check found. ``identity`` is the RFC 7208 section 9.1 identity key
    (``mailfrom`` or ``helo``); ``envelope_from`` is the mailbox whose domain was checked,
    ``postmaster@<helo>`` for the null sender (RFC 7208 section 2.4)."""

    result: SpfResult
    explanation: str
    identity: SpfIdentity
    envelope_from: str = ""

    @property
    def domain(self) -> str:
        return self.envelope_from.rpartition("@")[2]


# pyspf 2.0.14 looks up DNS through the module-level function ``spf.DNSLookup(name,
# qtype, strict, timeout)``, which by default calls dnspython's deprecated
# ``dns.resolver.query`` with the system resolver and search domains. It is the only hook,
# and it is global, so it is replaced once by a dispatcher that serves each check from
# the resolver bound to that check's context: concurrent checks never share a resolver
# through module state, and a call outside a check fails instead of leaking to
# /etc/resolv.conf.
_Lookup = Callable[[str, str, Any, float], list[tuple[tuple[str, str], Any]]]
_BOUND_LOOKUP: contextvars.ContextVar[_Lookup | None] = contextvars.ContextVar(
    "relay_spf_lookup", default=None
)


def _dispatch_lookup(
    name: str, qtype: str, strict: Any = True, timeout: float = 20.0
) -> list[tuple[tuple[str, str], Any]]:
    lookup = _BOUND_LOOKUP.get()
    if lookup is None:
        raise spf.TempError("DNS: no resolver bound to this SPF check")
    return lookup(name, qtype, strict, timeout)


spf.DNSLookup = _dispatch_lookup


def _pyspf_lookup(resolver: Resolver) -> _Lookup:
    """A DNSLookup for pyspf answering from ``resolver`` in pyspf's own shapes."""

    def lookup(
        name: str, qtype: str, strict: Any, timeout: float
    ) -> list[tuple[tuple[str, str], Any]]:
        try:
            records = resolver.query_sync(name, qtype, lifetime=timeout)
        except DnsTempError as exc:
            # RFC 7208 section 2.6.6: a transient DNS error is temperror.
            raise spf.TempError(f"DNS {exc}") from exc
        return [((name, qtype), _pyspf_value(qtype, r)) for r in records]

    return lookup


def _pyspf_value(qtype: str, rdata: dns.rdata.Rdata) -> Any:
    r: Any = rdata
    if qtype in ("A", "AAAA"):
        return r.address
    if qtype == "MX":
        return (r.preference, r.exchange.to_text(omit_final_dot=True))
    if qtype == "PTR":
        return r.target.to_text(omit_final_dot=True)
    return r.strings  # TXT (and type 99 SPF): the character-strings, joined by pyspf


async def check_spf(
    resolver: Resolver,
    ip: str,
    sender: str,
    helo: str,
    *,
    timeout: float,
    executor: Executor | None = None,
) -> SpfOutcome:
    """Evaluate SPF for a client ``ip``, envelope ``sender`` ('' for ``<>``) and ``helo``.

    Never raises: every failure to reach a verdict is ``temperror``. pyspf is
    synchronous, so it runs in ``executor`` (default: asyncio's thread pool).
    """
    null_sender = sender in ("", "<>")
    identity: SpfIdentity = "helo" if null_sender else "mailfrom"
    checked = f"postmaster@{helo}" if null_sender else sender
    if not _is_domain_name(checked.rpartition("@")[2]):
        # RFC 7208 section 4.3: a malformed or single-label domain (an address literal
        # too) gives "none" without any lookup.
        return SpfOutcome("none", "no valid domain to check", identity, checked)
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    work = functools.partial(
        _evaluate, _pyspf_lookup(resolver), ip, "" if null_sender else sender, helo, deadline
    )
    try:
        async with asyncio.timeout(timeout):
            result, explanation = await loop.run_in_executor(executor, work)
    except TimeoutError:
        return SpfOutcome("temperror", f"SPF check exceeded {timeout:g}s", identity, checked)
    except Exception as exc:
        # pyspf 2.0.14 lets YXDOMAIN, NoRootSOA, LabelTooLong, OSError, ... escape
        # query.check(); none of them says anything about the sender's policy.
        return SpfOutcome("temperror", f"internal error ({type(exc).__name__})", identity, checked)
    if result not in _RESULTS:
        return SpfOutcome("temperror", _clean(f"unexpected result {result}"), identity, checked)
    spf_result: SpfResult = result  # type: ignore[assignment]
    return SpfOutcome(spf_result, _clean(explanation), identity, checked)


def _is_domain_name(domain: str) -> bool:
    labels = domain.rstrip(".").split(".")
    return (
        len(labels) >= 2
        and len(domain) <= 253
        and all(0 < len(label) <= 63 for label in labels)
        and not _NOT_IN_NAME.search(domain)
    )


def _evaluate(
    lookup: _Lookup, ip: str, sender: str, helo: str, deadline: float
) -> tuple[str, str]:
    """Run pyspf in this (worker) thread with ``lookup`` bound for its DNS, within what
    is left until ``deadline`` (time spent queued for a thread counts)."""
    querytime = deadline - time.monotonic()
    if querytime <= 0:
        return "temperror", "no time left for the SPF check"
    token = _BOUND_LOOKUP.set(lookup)
    try:
        # strict=True: past 10 DNS-querying terms (RFC 7208 section 4.6.4) or 2 void
        # lookups the answer is permerror, not lax continuation. querytime bounds the
        # whole evaluation (RFC 7208 section 4.6.4 recommends at least 20 s; our caller
        # owns the budget), and each lookup gets what remains of it.
        query = spf.query(i=ip, s=sender, h=helo, strict=True, querytime=querytime)
        result, _code, explanation = query.check()
    finally:
        _BOUND_LOOKUP.reset(token)
    return str(result), str(explanation)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NOT_IN_NAME = re.compile(r"[\x00-\x20\x7f\[\]@()<>,;:\\\"]")
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")

_COMMENTS: dict[str, str] = {
    "pass": "domain of {who} designates {ip} as permitted sender",
    "fail": "domain of {who} does not designate {ip} as permitted sender",
    "softfail": "domain of transitioning {who} does not designate {ip} as permitted sender",
    "neutral": "{ip} is neither permitted nor denied by domain of {who}",
    "none": "domain of {who} does not designate permitted sender hosts",
    "temperror": "error in processing during lookup of {who}: {why}",
    "permerror": "permanent error in processing domain of {who}: {why}",
}


def received_spf_header(
    outcome: SpfOutcome, client_ip: str, helo: str, authserv_id: str, *, utf8: bool = False
) -> str:
    """The RFC 7208 section 9.1 ``Received-SPF:`` field for ``outcome``, folded at 78
    (RFC 5322 section 2.1.1), ending in CRLF, ready to prepend to the message bytes.

    Empty values are left out (no ``helo=""``, no ``envelope-from="postmaster@"``);
    ``utf8``: the message is SMTPUTF8 and values may stay UTF-8 (RFC 6532 section 3.2).
    """
    envelope_from = "" if outcome.envelope_from.endswith("@") else outcome.envelope_from
    who = field_text(envelope_from, utf8) or field_text(helo, utf8) or "the sender"
    comment = _COMMENTS[outcome.result].format(
        who=who, ip=field_text(client_ip), why=field_text(outcome.explanation, utf8)
    )
    pairs = [
        ("receiver", authserv_id),
        ("client-ip", client_ip),
        ("envelope-from", envelope_from),
        ("helo", helo),
        ("identity", outcome.identity),
    ]
    if outcome.result in ("temperror", "permerror") and outcome.explanation:
        pairs.append(("problem", outcome.explanation))
    head = _comment(f"{field_text(authserv_id, utf8)}: {comment}")
    lines = [f"Received-SPF: {outcome.result} ({head})"]
    lines += [
        f"\t{key}={_value(value, utf8)};" for key, value in pairs if field_text(value, utf8)
    ]
    return fold("\r\n".join(lines))


def _clean(text: str) -> str:
    """Drop control characters: no interpolated value may break a header line."""
    return _CONTROL.sub("", text)


def _comment(text: str) -> str:
    # RFC 5322 section 3.2.2: inside a comment, parentheses and backslash are quoted.
    return re.sub(r"([()\\])", r"\\\1", text)


def _value(text: str, utf8: bool) -> str:
    # RFC 7208 section 9.1: a value is a dot-atom or a quoted-string.
    text = field_text(text, utf8)
    if _DOT_ATOM.fullmatch(text):
        return text
    return '"' + re.sub(r'(["\\])', r"\\\1", text) + '"'
