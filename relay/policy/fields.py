"""The policy fields, each defined once: when it is known, how it matches, where it is read.

A rule's `match.<field>` and `unless.<field>` name one of these; reply and header
templates interpolate them as `{field}`. Adding a field is one entry in FIELDS (and its
tests, and a line in the README and in the shipped policy's comments).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from relay.address import domain_of
from relay.policy import match

CONNECT, HELO, MAIL, RCPT, DATA = range(5)


class View(Protocol):
    """What a field reads: the facts of one walk, with the values derived from them."""

    @property
    def client_address(self) -> str: ...
    @property
    def ip(self) -> tuple[int, int] | None: ...
    @property
    def listener(self) -> str: ...
    @property
    def tls(self) -> bool: ...
    @property
    def helo_name(self) -> str: ...
    @property
    def sasl_username(self) -> str: ...
    @property
    def sender(self) -> str: ...
    @property
    def recipients(self) -> tuple[str, ...]: ...
    @property
    def recipient_count(self) -> int: ...
    @property
    def size(self) -> int: ...
    def headers(self, name: str) -> list[str]: ...
    async def spf(self) -> str: ...
    async def spf_helo(self) -> str: ...
    async def dkim(self) -> tuple[str, str]: ...
    async def dmarc(self) -> tuple[str, str]: ...
    async def dmarc_outbound(self) -> str: ...
    async def over_limit(self, name: str) -> tuple[bool, float]: ...
    async def suppressed(self, address: str) -> str: ...


Values = Sequence[object]


@dataclass(frozen=True, slots=True)
class Field:
    """One policy field.

    stage: the first stage at which it is known. build: a fresh matcher builder for its
    values. read: the values a condition is tested against (any may match); `arg` is the
    header name of `header."Name"` or the limit name of `over_limit`. text: the field as
    a `{placeholder}` (None: cannot be interpolated). lazy: read runs a check (SPF, DKIM,
    a limit), so it is tested after the cheap conditions and only when they match.
    """

    name: str
    stage: int
    doc: str
    build: Callable[[], match.Builder]
    read: Callable[[View, str], Awaitable[Values]]
    text: Callable[[View], Awaitable[str]] | None
    lazy: bool = False
    # How the values tested show in a dry-run trace.
    show: Callable[[View, Values], str] = lambda view, values: _any_of(values)


def _any_of(values: Values) -> str:
    texts = [str(v) if v != "" else '""' for v in values]
    if not texts:
        return '""'
    return texts[0] if len(texts) == 1 else "any of " + ", ".join(texts)


def _cheap(get: Callable[[View], object]) -> Callable[[View, str], Awaitable[Values]]:
    async def read(view: View, arg: str) -> Values:
        return (get(view),)

    return read


def _as_text(get: Callable[[View], object]) -> Callable[[View], Awaitable[str]]:
    async def text(view: View) -> str:
        return str(get(view))

    return text


async def _recipients(view: View, arg: str) -> Values:
    return view.recipients


async def _recipient_domains(view: View, arg: str) -> Values:
    return tuple(domain_of(r) for r in view.recipients)


async def _first_recipient(view: View) -> str:
    return view.recipients[0] if view.recipients else ""


async def _first_recipient_domain(view: View) -> str:
    return domain_of(view.recipients[0]) if view.recipients else ""


async def _header(view: View, arg: str) -> Values:
    return tuple(view.headers(arg))


def _show_header(view: View, values: Values) -> str:
    return " | ".join(str(v) for v in values) if values else "(no such header)"


async def _spf(view: View, arg: str) -> Values:
    return (await view.spf(),)


async def _spf_text(view: View) -> str:
    return await view.spf()


async def _dkim(view: View, arg: str) -> Values:
    return ((await view.dkim())[0],)


async def _dkim_text(view: View) -> str:
    return (await view.dkim())[0]


async def _dkim_domain(view: View, arg: str) -> Values:
    domain = (await view.dkim())[1]
    return (domain,) if domain else ()


async def _dkim_domain_text(view: View) -> str:
    return (await view.dkim())[1]


def _lazy(get: Callable[[View], Awaitable[str]]) -> Callable[[View, str], Awaitable[Values]]:
    async def read(view: View, arg: str) -> Values:
        value = await get(view)
        return (value,) if value else ()

    return read


async def _spf_helo_text(view: View) -> str:
    return await view.spf_helo()


async def _dmarc_text(view: View) -> str:
    return (await view.dmarc())[0]


async def _dmarc_policy_text(view: View) -> str:
    return (await view.dmarc())[1]


async def _dmarc_outbound_text(view: View) -> str:
    return await view.dmarc_outbound()


async def _over_limit(view: View, arg: str) -> Values:
    return ((await view.over_limit(arg))[0],)


async def _suppressed(view: View, arg: str) -> Values:
    return tuple([bool(await view.suppressed(r)) for r in view.recipients])


async def _suppressed_text(view: View) -> str:
    return await view.suppressed(view.recipients[0]) if view.recipients else ""


def _show_over(view: View, values: Values) -> str:
    return "over" if values and values[0] is True else "not over"


def _address_builder(null_allowed: bool) -> Callable[[], match.Builder]:
    return lambda: match.AddressBuilder(null_allowed=null_allowed)


def _text_builder(name: str) -> Callable[[], match.Builder]:
    return lambda: match.TextBuilder(name)


def _sender_domain(view: View) -> str:
    return domain_of(view.sender) if "@" in view.sender else ""


_FIELDS = (
    Field("client_address", CONNECT, "the client's IP address (the one a PROXY header names)",
          match.NetworkBuilder, _cheap(lambda v: v.ip), _as_text(lambda v: v.client_address),
          show=lambda view, values: view.client_address or '""'),
    Field("listener", CONNECT, "the name of the [listener.NAME] the client connected to",
          _text_builder("listener"), _cheap(lambda v: v.listener),
          _as_text(lambda v: v.listener)),
    Field("helo_name", HELO, "the name the client gave in EHLO or HELO",
          _text_builder("helo_name"), _cheap(lambda v: v.helo_name),
          _as_text(lambda v: v.helo_name)),
    # STARTTLS comes after EHLO, so only at MAIL FROM is the session's TLS state final.
    Field("tls", MAIL, "true when the session is encrypted (STARTTLS or implicit TLS)",
          match.BoolBuilder, _cheap(lambda v: v.tls),
          _as_text(lambda v: "yes" if v.tls else "no"),
          show=lambda view, values: "true" if view.tls else "false"),
    Field("sasl_username", MAIL, 'the AUTH user name ("" when not authenticated)',
          _text_builder("sasl_username"), _cheap(lambda v: v.sasl_username),
          _as_text(lambda v: v.sasl_username)),
    Field("sender", MAIL, 'the envelope sender, MAIL FROM ("<>" matches the null sender)',
          _address_builder(True), _cheap(lambda v: v.sender), _as_text(lambda v: v.sender),
          show=lambda view, values: view.sender or "<>"),
    Field("sender_domain", MAIL, "the domain of the envelope sender",
          match.DomainBuilder, _cheap(_sender_domain), _as_text(_sender_domain)),
    Field("spf", MAIL, "the RFC 7208 SPF result for the client and the sender (or HELO)",
          lambda: match.ChoiceBuilder(match.SPF_RESULTS), _spf, _spf_text, lazy=True),
    Field("spf_helo", HELO, "the RFC 7208 SPF result for the client and the HELO name",
          lambda: match.ChoiceBuilder(match.SPF_RESULTS), _lazy(_spf_helo_text),
          _spf_helo_text, lazy=True),
    # The SIZE= declared at MAIL FROM; when absent, the real size, known at DATA.
    Field("size", MAIL, "the message size in bytes (SIZE= at MAIL, else the real size)",
          lambda: match.NumberBuilder(sizes=True), _cheap(lambda v: v.size),
          _as_text(lambda v: v.size)),
    Field("recipient", RCPT, "the recipient being decided (at DATA: any accepted one)",
          _address_builder(False), _recipients, _first_recipient),
    Field("recipient_domain", RCPT, "the domain of the recipient (at DATA: of any one)",
          match.DomainBuilder, _recipient_domains, _first_recipient_domain),
    Field("recipient_count", RCPT, "recipients accepted so far, this one included",
          lambda: match.NumberBuilder(sizes=False), _cheap(lambda v: v.recipient_count),
          _as_text(lambda v: v.recipient_count)),
    Field("suppressed", RCPT, "true when the recipient is on the suppression list; "
          "{suppressed} is the date it was put there",
          match.BoolBuilder, _suppressed, _suppressed_text, lazy=True,
          show=lambda view, values: "true" if any(values) else "false"),
    Field("header", DATA, 'a header field\'s decoded values: match.header."Subject"',
          _text_builder("header"), _header, None, show=_show_header),
    Field("dkim", DATA, "the RFC 8601 DKIM result of the message's signatures",
          lambda: match.ChoiceBuilder(match.DKIM_RESULTS), _dkim, _dkim_text, lazy=True),
    Field("dkim_domain", DATA, "the d= domain of the signature that decided the result",
          match.DomainBuilder, _dkim_domain, _dkim_domain_text, lazy=True),
    Field("dmarc", DATA, "the RFC 7489 DMARC result for the From: domain",
          lambda: match.ChoiceBuilder(match.DMARC_RESULTS), _lazy(_dmarc_text), _dmarc_text,
          lazy=True),
    Field("dmarc_policy", DATA, "the From: domain's DMARC policy (no value without one)",
          lambda: match.ChoiceBuilder(match.DMARC_POLICIES), _lazy(_dmarc_policy_text),
          _dmarc_policy_text, lazy=True),
    Field("dmarc_outbound", DATA, "the DMARC result receivers will compute once we sign",
          lambda: match.ChoiceBuilder(match.DMARC_RESULTS), _lazy(_dmarc_outbound_text),
          _dmarc_outbound_text, lazy=True),
    # A rule's `over_limit = "NAME"`: known at the stage where the thing it counts is.
    Field("over_limit", RCPT, "whether the rule's [limit.NAME] bucket is over its rate",
          match.BoolBuilder, _over_limit, None, lazy=True, show=_show_over),
)

FIELDS: dict[str, Field] = {f.name: f for f in _FIELDS}
# The fields a rule may name under match. and unless. (over_limit is a rule key of its own).
CONDITION_FIELDS = tuple(name for name in FIELDS if name != "over_limit")
