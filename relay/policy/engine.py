"""Evaluation of a Policy at one SMTP stage: which rule decides, and what the client hears.

How a stage is evaluated
------------------------
The rules form ONE ordered list. At every stage (connect, helo, mail, rcpt, data) the
engine walks that list from the top. For each rule:

* every field known by now (see FIELDS in rules.py): the rule is tested; the first
  matching *terminal* rule (accept, reject, tempfail/defer, hold, discard) decides. Matching
  non-terminal rules on the way contribute headers (tag), an upstream group (route: the
  first matching route rule wins), rewrites (rewrite_sender, rewrite_recipient,
  rewrite_header_from: the first of each kind wins; archive and strip: each adds its own;
  see relay.policy.rewrite) and "would ..." records (log), and the walk goes on.
* some field not known yet (the rule is *pending*): its known conditions are tested first;
  if one already fails (or a known `unless` condition already matches) the rule can never
  match in this transaction and is passed over. Otherwise:
    - a pending rule that would *take* the message (accept, hold, discard) stops the walk:
      the result is "continue" (undecided so far), because refusing now could refuse mail
      that the full walk would take;
    - a pending reject/tempfail, tag, route, rewrite or log rule is passed over for now: it
      is tested in the walk at DATA, which may still refuse the message. Refusing early
      because a rule *below* a pending refusal matched is safe: the message is refused
      either way (the reply then comes from the rule that decided at this stage).
* the walk reaching the end: at connect/helo/mail the result is "continue"; at rcpt and
  data the policy's final_action applies (shipped: reject with
  "554 5.7.1 <{recipient}>: Relay access denied"). That is what keeps the relay closed by
  default: a client that matches no accepting rule is refused at its first RCPT.

The engine keeps no state between stages: each call walks again with the facts known by
then, so a rule that decided at MAIL (say "accept" for an app-server network) is found
again, and decides again, at every later stage. Consequences:

* rcpt: the walk runs once per recipient with `facts.recipient` set; `recipient_count`
  counts the recipients accepted so far (`facts.recipients`) plus this one.
* data: the final walk, with everything known, decides for the whole message and carries
  the complete add_headers, route and rewrites. A recipient condition (recipient,
  recipient_domain) matches at DATA when ANY accepted recipient matches;
  `recipient_count` is the number of accepted recipients. `{recipient}` in a reply at
  DATA is the first recipient.
* delay_reject (Policy.delay_reject, default true): evaluate returns the real decision at
  every stage; a caller that sees reject/tempfail at connect/helo/mail answers that command
  normally and lets the walk at RCPT, which finds the same rule again, give the refusal,
  so the log line names the recipient (Postfix smtpd_delay_reject).
* size: a size rule is known at MAIL only if the client declared SIZE=; otherwise it is
  pending until DATA, where the real size counts.

Checks (SPF, DKIM, limits) are awaited only when a rule needing them is reached and its
cheap conditions already match. The caller's Checks object caches each per transaction
(the data walk asks again). A limit is asked again at every later stage too: answer from
the per-transaction cache, and do not charge the bucket twice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from relay.headers import header_fields
from relay.message import Tail
from relay.policy.fields import DATA, FIELDS, RCPT, Field
from relay.policy.match import parse_ip
from relay.policy.rewrite import NONE, Archive, MapEdit, Rewrites, Strip
from relay.policy.rules import STAGES, Condition, Policy, Rule, Stage
from relay.replies import Reply

_STAGE_INDEX = {name: index for index, name in enumerate(STAGES)}


@dataclass(frozen=True, slots=True)
class Facts:
    """What is known about the session and transaction when a stage is evaluated.

    sender: None = not known yet, "" = the null sender. recipient: the recipient being
    decided at rcpt. recipients: at rcpt those accepted before this one; at data all
    accepted ones. size: the SIZE= declared at MAIL (None if not declared), the real size at
    data. message: the message as received, at data.
    """

    client_address: str
    listener: str = ""
    helo_name: str = ""
    sasl_username: str = ""
    sender: str | None = None
    recipient: str | None = None
    recipients: tuple[str, ...] = ()
    size: int | None = None
    message: bytes | None = None
    # The rest of a large message, on disk (relay.message.Tail); `message` then holds
    # its header section and the start of its body.
    tail: Tail | None = None
    tls: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one walk.

    action: accept, reject, tempfail, hold, discard, or continue (nothing terminal decided at
    this stage). reply: what the client should hear for reject/tempfail; for accept/hold/
    discard only a rule's custom 2xx `message` (meant for the end-of-DATA reply), else None.
    rule: the deciding rule's name, "final_action", or "" for continue. passed: the
    non-terminal rules (tag, route, log) that matched on the way, in order.
    """

    action: str
    reply: Reply | None
    rule: str
    add_headers: tuple[tuple[str, str], ...] = ()
    route: str | None = None
    would: tuple[tuple[str, str], ...] = ()
    trace: tuple[str, ...] = ()
    rewrites: Rewrites = NONE
    passed: tuple[str, ...] = ()

    @property
    def refused(self) -> bool:
        return self.action in ("reject", "tempfail")


class Checks(Protocol):
    """The lazy checks a walk may need, given the facts they need as arguments; the
    caller runs each at most once per transaction (per recipient, for recipient limits)."""

    async def spf(self, facts: Facts) -> str: ...

    async def spf_helo(self, facts: Facts) -> str: ...

    async def dkim(self, facts: Facts) -> tuple[str, str]: ...

    async def dmarc(self, facts: Facts) -> tuple[str, str]: ...

    async def dmarc_outbound(self, facts: Facts) -> str: ...

    async def over_limit(self, name: str, stage: Stage, facts: Facts) -> tuple[bool, float]: ...

    async def suppressed(self, address: str) -> str:
        """The date `address` was put on the suppression list, "" when it is not on it."""
        ...


class StaticChecks:
    """Fixed check results, for dry runs and tests. `calls` records what was asked."""

    __slots__ = (
        "_dkim", "_dmarc", "_dmarc_outbound", "_over_limits", "_retry_after", "_spf",
        "_spf_helo", "_suppressed", "calls",
    )

    def __init__(
        self,
        spf: str = "none",
        dkim: tuple[str, str] = ("none", ""),
        over_limits: frozenset[str] = frozenset(),
        retry_after: float = 60.0,
        *,
        spf_helo: str = "none",
        dmarc: tuple[str, str] = ("none", ""),
        dmarc_outbound: str = "none",
        suppressed: Mapping[str, str] | None = None,
    ) -> None:
        self._spf = spf
        self._suppressed = {k.lower(): v for k, v in (suppressed or {}).items()}
        self._spf_helo = spf_helo
        self._dmarc = dmarc
        self._dmarc_outbound = dmarc_outbound
        self._dkim = dkim
        self._over_limits = over_limits
        self._retry_after = retry_after
        self.calls: list[str] = []

    def new_transaction(self) -> None:
        """Nothing to reset: the results are fixed."""

    def backend_failed(self, limit: str) -> bool:
        return False

    async def spf(self, facts: Facts) -> str:
        self.calls.append("spf")
        return self._spf

    async def spf_helo(self, facts: Facts) -> str:
        self.calls.append("spf_helo")
        return self._spf_helo

    async def dkim(self, facts: Facts) -> tuple[str, str]:
        self.calls.append("dkim")
        return self._dkim

    async def dmarc(self, facts: Facts) -> tuple[str, str]:
        self.calls.append("dmarc")
        return self._dmarc

    async def dmarc_outbound(self, facts: Facts) -> str:
        self.calls.append("dmarc_outbound")
        return self._dmarc_outbound

    async def over_limit(self, name: str, stage: Stage, facts: Facts) -> tuple[bool, float]:
        self.calls.append(f"over_limit:{name}")
        over = name in self._over_limits
        return over, self._retry_after if over else 0.0

    async def suppressed(self, address: str) -> str:
        self.calls.append("suppressed")
        return self._suppressed.get(address.lower(), "")


class _Context:
    """One walk's view of the facts (relay.policy.fields.View), with the values derived
    from them computed once."""

    __slots__ = (
        "_dkim",
        "_dmarc",
        "_dmarc_outbound",
        "_headers",
        "_ip",
        "_limits",
        "_spf",
        "_spf_helo",
        "_suppressed",
        "checks",
        "facts",
        "recipients",
        "stage",
        "stage_name",
    )

    def __init__(self, facts: Facts, stage: Stage, checks: Checks) -> None:
        self.facts = facts
        self.stage_name = stage
        self.stage = _STAGE_INDEX[stage]
        self.checks = checks
        if self.stage == RCPT:
            self.recipients: tuple[str, ...] = (
                (facts.recipient,) if facts.recipient is not None else ()
            )
        else:
            self.recipients = facts.recipients if self.stage > RCPT else ()
        self._ip: tuple[int, int] | bool | None = False  # False = not parsed yet
        self._spf: str | None = None
        self._spf_helo: str | None = None
        self._dkim: tuple[str, str] | None = None
        self._dmarc: tuple[str, str] | None = None
        self._dmarc_outbound: str | None = None
        self._limits: dict[str, tuple[bool, float]] | None = None
        self._suppressed: dict[str, str] | None = None
        self._headers: dict[str, list[str]] | None = None

    @property
    def client_address(self) -> str:
        return self.facts.client_address

    @property
    def ip(self) -> tuple[int, int] | None:
        if self._ip is False:
            self._ip = parse_ip(self.facts.client_address.strip())  # "unix:" -> None
        return self._ip if not isinstance(self._ip, bool) else None

    @property
    def listener(self) -> str:
        return self.facts.listener

    @property
    def tls(self) -> bool:
        return self.facts.tls

    @property
    def helo_name(self) -> str:
        return self.facts.helo_name

    @property
    def sasl_username(self) -> str:
        return self.facts.sasl_username

    @property
    def sender(self) -> str:
        return self.facts.sender or ""

    @property
    def recipient_count(self) -> int:
        return len(self.facts.recipients) + (1 if self.stage == RCPT else 0)

    @property
    def size(self) -> int:
        return self.facts.size or 0

    def headers(self, name: str) -> list[str]:
        if self._headers is None:
            table: dict[str, list[str]] = {}
            if self.facts.message is not None:
                for header, value in header_fields(self.facts.message):
                    table.setdefault(header.lower(), []).append(value)
            self._headers = table
        return self._headers.get(name, [])

    def known(self, cond: Condition) -> bool:
        if cond.stage > self.stage:
            return False
        # A size before DATA is only known when the client declared SIZE= at MAIL FROM.
        return cond.field != "size" or self.stage >= DATA or self.facts.size is not None

    async def spf(self) -> str:
        if self._spf is None:
            self._spf = (await self.checks.spf(self.facts)).lower()
        return self._spf

    async def spf_helo(self) -> str:
        if self._spf_helo is None:
            self._spf_helo = (await self.checks.spf_helo(self.facts)).lower()
        return self._spf_helo

    async def dkim(self) -> tuple[str, str]:
        if self._dkim is None:
            result, domain = await self.checks.dkim(self.facts)
            self._dkim = (result.lower(), domain.lower())
        return self._dkim

    async def dmarc(self) -> tuple[str, str]:
        if self._dmarc is None:
            result, policy = await self.checks.dmarc(self.facts)
            self._dmarc = (result.lower(), policy.lower())
        return self._dmarc

    async def dmarc_outbound(self) -> str:
        if self._dmarc_outbound is None:
            self._dmarc_outbound = (await self.checks.dmarc_outbound(self.facts)).lower()
        return self._dmarc_outbound

    async def over_limit(self, name: str) -> tuple[bool, float]:
        if self._limits is None:
            self._limits = {}
        if name not in self._limits:
            self._limits[name] = await self.checks.over_limit(name, self.stage_name, self.facts)
        return self._limits[name]

    async def suppressed(self, address: str) -> str:
        if self._suppressed is None:
            self._suppressed = {}
        if address not in self._suppressed:
            self._suppressed[address] = await self.checks.suppressed(address)
        return self._suppressed[address]


async def _test(cond: Condition, ctx: _Context) -> bool:
    values = await FIELDS[cond.field].read(ctx, cond.arg)
    return any(cond.matcher.matches(v) for v in values)


async def _judge(rule: Rule, ctx: _Context, known_only: bool) -> Condition | None:
    """The condition that stops `rule` from matching, or None.

    With known_only, conditions on fields not known yet are left out (they might match).
    A returned `unless` condition is one that matched.
    """
    for cond in rule.match:
        if known_only and not ctx.known(cond):
            continue
        if not await _test(cond, ctx):
            return cond
    for cond in rule.unless:
        if known_only and not ctx.known(cond):
            continue
        if await _test(cond, ctx):
            return cond
    return None


def _pending(rule: Rule, ctx: _Context) -> Condition | None:
    """The first condition of `rule` not known at this stage, or None."""
    if rule.stage <= ctx.stage and (
        not rule.sized or ctx.stage >= DATA or ctx.facts.size is not None
    ):
        return None
    for cond in (*rule.match, *rule.unless):
        if not ctx.known(cond):
            return cond
    return None


def _clean(value: str) -> str:
    # Interpolated values come from the client; a CR or LF must not split a reply or header.
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else "?" for c in value)


async def _values(fields: frozenset[str], ctx: _Context, rule: Rule | None) -> dict[str, str]:
    values: dict[str, str] = {}
    for name in fields:
        if name == "retry_after":
            limit = rule.over_limit if rule is not None else None
            seconds = (await ctx.over_limit(limit))[1] if limit else 0.0
            value = str(math.ceil(seconds)) if math.isfinite(seconds) else "later"
        elif name == "rule":
            value = rule.name if rule is not None else "final_action"
        else:
            text = FIELDS[name].text
            assert text is not None  # the loader allows only fields that have a text
            value = await text(ctx)
        values[name] = _clean(value)
    return values


async def _subject(cond: Condition, ctx: _Context) -> str:
    """The value a condition was tested against, for traces (checks are cached by now)."""
    field: Field = FIELDS[cond.field]
    return field.show(ctx, await field.read(ctx, cond.arg))


async def _why(cond: Condition, ctx: _Context) -> str:
    if cond.field == "over_limit":
        return f"over_limit {cond.spec}: not over"
    if cond.key.startswith("unless."):
        return f"{cond.key}: {await _subject(cond, ctx)} matches {cond.spec}"
    return f"{cond.key}: {await _subject(cond, ctx)} does not match {cond.spec}"


def _rewrite(rewrites: Rewrites, rule: Rule) -> tuple[Rewrites, str]:
    """`rewrites` with what `rule` (a matching rewrite rule) adds, and what to trace."""
    edit = rule.edit
    if isinstance(edit, Archive):
        route = f" via {edit.route}" if edit.route else ""
        to = ", ".join(f"<{a}>" for a in edit.recipients)
        return (dataclasses.replace(rewrites, archives=(*rewrites.archives, (rule.name, edit))),
                f"archive copy to {to}{route}")
    if isinstance(edit, Strip):
        return (dataclasses.replace(rewrites, strips=(*rewrites.strips, (rule.name, edit))),
                f"strips {edit.spec}")
    assert isinstance(edit, MapEdit)
    kind = rule.action.removeprefix("rewrite_")  # sender, recipient, header_from
    chosen: tuple[str, MapEdit] | None = getattr(rewrites, kind)
    if chosen is not None:
        return rewrites, f"map {edit.map.name} (ignored: rule {chosen[0]!r} already rewrites)"
    chosen = (rule.name, edit)
    changed = (dataclasses.replace(rewrites, sender=chosen) if kind == "sender"
               else dataclasses.replace(rewrites, recipient=chosen) if kind == "recipient"
               else dataclasses.replace(rewrites, header_from=chosen))
    return changed, f"map {edit.map.name} ({len(edit.map)} entries)"


async def evaluate(
    policy: Policy, stage: Stage, facts: Facts, checks: Checks, *, trace: bool = False
) -> Decision:
    """Walk `policy` at `stage` (see the module docstring). With trace, say why per rule."""
    ctx = _Context(facts, stage, checks)
    lines: list[str] | None = [] if trace else None
    headers: list[tuple[str, str]] | None = None
    would: list[tuple[str, str]] | None = None
    route: str | None = None
    rewrites = NONE
    passed: list[str] = []

    def decision(action: str, reply: Reply | None, rule: str) -> Decision:
        return Decision(
            action,
            reply,
            rule,
            tuple(headers) if headers else (),
            route,
            tuple(would) if would else (),
            tuple(lines) if lines else (),
            rewrites,
            tuple(passed),
        )

    for rule in policy.rules:
        label = f'rule "{rule.name}" [{rule.action}]' if lines is not None else ""
        waiting = _pending(rule, ctx)
        if waiting is not None:
            if not rule.accepting:
                if lines is not None:
                    lines.append(f"{label}: not yet known: {waiting.key} (tested at data)")
                continue
            blocker = await _judge(rule, ctx, known_only=True)
            if blocker is not None:
                if lines is not None:
                    lines.append(f"{label}: cannot match: {await _why(blocker, ctx)}")
                continue
            if lines is not None:
                lines.append(
                    f"{label}: might still match, needs {waiting.key}: "
                    f"decision waits for {STAGES[waiting.stage]}"
                )
            return decision("continue", None, "")

        blocker = await _judge(rule, ctx, known_only=False)
        if blocker is not None:
            if lines is not None:
                lines.append(f"{label}: no match: {await _why(blocker, ctx)}")
            continue

        if rule.terminal:
            reply = None
            if rule.reply is not None:
                values = await _values(rule.reply.text.fields, ctx, rule)
                reply = rule.reply.render(values)
            if lines is not None:
                lines.append(f"{label}: matched" + (f": {reply}" if reply else ""))
            return decision(rule.action, reply, rule.name)

        passed.append(rule.name)
        if rule.action == "tag":
            headers = headers if headers is not None else []
            for name, template in rule.add_headers:
                headers.append((name, template.render(await _values(template.fields, ctx, rule))))
            if lines is not None:
                added = ", ".join(f"{n}: {v}" for n, v in headers[-len(rule.add_headers) :])
                lines.append(f"{label}: matched, adds {added}")
        elif rule.action == "route":
            if lines is not None:
                note = "" if route is None else f" (ignored: route {route!r} already chosen)"
                lines.append(f"{label}: matched, route {rule.route}{note}")
            route = route if route is not None else rule.route
        elif rule.edit is not None:
            rewrites, note = _rewrite(rewrites, rule)
            if lines is not None:
                lines.append(f"{label}: matched, {note}")
        else:  # log: the rollout mode, record what the rule would have done and go on
            text = f"would {rule.log_action}"
            if rule.reply is not None:
                text += f": {rule.reply.render(await _values(rule.reply.text.fields, ctx, rule))}"
            would = would if would is not None else []
            would.append((rule.name, text))
            if lines is not None:
                lines.append(f"{label}: matched, {text} (log only)")

    if ctx.stage < RCPT:
        if lines is not None:
            lines.append("no terminal rule matched: continue")
        return decision("continue", None, "")
    reply = None
    if policy.final_reply is not None:
        values = await _values(policy.final_reply.text.fields, ctx, None)
        reply = policy.final_reply.render(values)
    if lines is not None:
        lines.append(
            f"no terminal rule matched: final_action {policy.final_action}"
            + (f": {reply}" if reply else "")
        )
    return decision(policy.final_action, reply, "final_action")
