"""The Authentication-Results header field (RFC 8601) for the checks that ran."""

from __future__ import annotations

import re
from collections.abc import Sequence

from relay.checks.dkim import DkimOutcome
from relay.checks.dmarc import DmarcOutcome
from relay.checks.spf import SpfOutcome
from relay.headers import field_text, fold

# RFC 8601 section 2.2: a pvalue is a token (RFC 2045), or [local-part "@"] domain.
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+")
_ADDRESS = re.compile(
    r"(?:[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*)?@[A-Za-z0-9.-]+"
)


def authentication_results_header(
    authserv_id: str,
    spf: SpfOutcome | None,
    dkim_outcome: DkimOutcome | None,
    *,
    spf_helo: SpfOutcome | None = None,
    dmarc: DmarcOutcome | None = None,
    utf8: bool = False,
) -> str:
    """The field, one resinfo per line and folded at 78 (RFC 5322 section 2.1.1),
    ending in CRLF; with no check at all it says ``none``.

    SPF of MAIL FROM and of the HELO name are separate resinfos, each naming its
    identity (smtp.mailfrom, smtp.helo: RFC 8601 section 2.7.2); for the null sender the
    two are one check. ``utf8``: the message is SMTPUTF8, so values may stay UTF-8 (RFC
    6532 section 3.2); otherwise every character written is ASCII.
    """
    resinfos: list[str] = []
    for outcome in _spf_outcomes(spf, spf_helo):
        if outcome.identity == "helo":
            prop = _prop("smtp.helo", outcome.domain, utf8)
        else:
            prop = _prop("smtp.mailfrom", outcome.envelope_from, utf8)
        resinfos.append(f"spf={outcome.result}{_reason(_spf_reason(outcome), utf8)}{prop}")
    if dkim_outcome is not None:
        if not dkim_outcome.signatures:
            resinfos.append(f"dkim={dkim_outcome.result}{_reason(dkim_outcome.reason, utf8)}")
        for sig in dkim_outcome.signatures:
            props = _prop("header.d", sig.domain, utf8) + _prop("header.s", sig.selector, utf8)
            props += _prop("header.a", sig.algorithm, utf8)
            resinfos.append(f"dkim={sig.result}{_reason(sig.reason, utf8)}{props}")
    if dmarc is not None:
        # RFC 7489 section 11.2 registers the method dmarc with the one property
        # header.from; the policy found goes in a comment, as receivers commonly write it.
        policy = f" (p={dmarc.policy})" if dmarc.policy else ""
        resinfos.append(
            f"dmarc={dmarc.result}{policy}{_reason(dmarc.reason, utf8)}"
            f"{_prop('header.from', dmarc.from_domain, utf8)}"
        )
    head = f"Authentication-Results: {_pvalue(authserv_id, utf8)}"
    if not resinfos:
        return fold(f"{head}; none")
    return fold(";\r\n\t".join([head, *resinfos]))


def _spf_outcomes(spf: SpfOutcome | None, helo: SpfOutcome | None) -> Sequence[SpfOutcome]:
    outcomes = [o for o in (spf, helo) if o is not None]
    if len(outcomes) == 2 and outcomes[0] == outcomes[1]:
        return outcomes[:1]
    return outcomes


def _spf_reason(spf: SpfOutcome) -> str:
    return spf.explanation if spf.result in ("temperror", "permerror") else ""


def _reason(text: str, utf8: bool) -> str:
    return f" reason={_quoted(text, utf8)}" if text else ""


def _prop(name: str, value: str, utf8: bool) -> str:
    # A property without a value (no HELO name, no domain) is left out, never written
    # as name="" (RFC 8601 section 2.2: a pvalue names something).
    value = field_text(value, utf8)
    if not value or value.endswith("@"):
        return ""
    return f" {name}={_pvalue(value, utf8)}"


def _pvalue(text: str, utf8: bool) -> str:
    text = field_text(text, utf8)
    if _TOKEN.fullmatch(text) or _ADDRESS.fullmatch(text):
        return text
    return _quoted(text, utf8)


def _quoted(text: str, utf8: bool) -> str:
    text = field_text(text, utf8)
    return '"' + re.sub(r'(["\\])', r"\\\1", text) + '"'
