"""`policy-relay test`: walk an envelope through every stage and show what each rule did."""

from __future__ import annotations

import asyncio
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from relay.headers import header_fields
from relay.policy.engine import Decision, Facts, StaticChecks, evaluate
from relay.policy.match import DKIM_RESULTS, SPF_RESULTS
from relay.policy.rules import Policy, Stage
from relay.replies import Reply

# Exit statuses of `policy-relay test`, by the class of what the client would hear.
EXIT_ACCEPT, EXIT_TEMPFAIL, EXIT_REJECT = 0, 4, 5
_EXIT = {"accept": 0, "hold": 0, "discard": 0, "tempfail": 4, "reject": 5}
# What an accepting stage answers; the real session sends these from relay.replies too.
_ACCEPTED = {
    "connect": "220 ready",
    "helo": "250 Ok",
    "mail": "250 2.1.0 Ok",
    "rcpt": "250 2.1.5 Ok",
    "data": "250 2.0.0 Ok: queued",
}


@dataclass(frozen=True, slots=True)
class Envelope:
    """One simulated SMTP transaction. sender "" (or "<>") is the null sender."""

    client_address: str
    sender: str
    recipients: tuple[str, ...]
    helo: str = ""
    listener: str = ""
    auth_user: str = ""
    tls: bool = False
    message: bytes | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the client ends up hearing, why, and the stage-by-stage report."""

    action: str  # accept | hold | discard | reject | tempfail
    reply: Reply | None
    rule: str
    text: str

    @property
    def code(self) -> int:
        return self.reply.code if self.reply is not None else 250

    @property
    def exit_status(self) -> int:
        return _EXIT[self.action]


async def simulate(policy: Policy, envelope: Envelope, checks: StaticChecks) -> Outcome:
    """Run connect, helo, mail, each rcpt and data like `exim -bh`, collecting the report."""
    out: list[str] = []
    sender = "" if envelope.sender == "<>" else envelope.sender
    message = envelope.message
    base = Facts(envelope.client_address, listener=envelope.listener, tls=envelope.tls)

    async def stage(name: Stage, title: str, facts: Facts) -> Decision:
        out.append(title)
        decision = await evaluate(policy, name, facts, checks, trace=True)
        out.extend(f"  {line}" for line in decision.trace)
        for rule, text in decision.would:
            out.append(f'  log: rule "{rule}" {text}')
        return decision

    def finish(decision: Decision) -> Outcome:
        action = decision.action if decision.action != "continue" else "accept"
        reply = decision.reply if decision.refused else None
        heard = str(reply) if reply is not None else _ACCEPTED["data"]
        out.append(f"result: {action} (rule {decision.rule or '-'}): client sees {heard}")
        return Outcome(action, reply, decision.rule, "\n".join(out) + "\n")

    def answer(name: Stage, decision: Decision) -> bool:
        """Report a stage's answer; True when the session ends here."""
        if not decision.refused:
            out.append(f"  -> {decision.action}: {_ACCEPTED[name]}")
            return False
        if policy.delay_reject and name in ("connect", "helo", "mail"):
            out.append(f"  -> {decision.action} (rule {decision.rule}), delayed to RCPT")
            return False
        out.append(f"  -> {decision.action} (rule {decision.rule}): {decision.reply}")
        return True

    # Each stage knows what the one before knew, and more (as in a real session).
    facts = base
    decision = await stage("connect", f"connect client_address={base.client_address}", facts)
    if answer("connect", decision):
        return finish(decision)
    facts = replace(facts, helo_name=envelope.helo)
    decision = await stage("helo", f"helo {envelope.helo or '(none)'}", facts)
    if answer("helo", decision):
        return finish(decision)
    declared = len(message) if message is not None else None
    facts = replace(facts, sasl_username=envelope.auth_user, sender=sender, size=declared)
    auth = f" auth={envelope.auth_user}" if envelope.auth_user else ""
    size = f" SIZE={declared}" if declared is not None else ""
    decision = await stage("mail", f"mail from=<{sender}>{auth}{size}", facts)
    if answer("mail", decision):
        return finish(decision)

    accepted: list[str] = []
    first_refusal: Decision | None = None
    for recipient in envelope.recipients:
        rcpt = replace(facts, recipient=recipient, recipients=tuple(accepted))
        decision = await stage("rcpt", f"rcpt to=<{recipient}>", rcpt)
        answer("rcpt", decision)
        if decision.refused:
            first_refusal = first_refusal or decision
        else:
            accepted.append(recipient)
    if not accepted:
        if first_refusal is None:
            out.append("no recipients")
            return Outcome("reject", None, "", "\n".join(out) + "\n")
        out.append("no recipient accepted: no DATA")
        return finish(first_refusal)

    headers = header_fields(message) if message is not None else ()
    facts = replace(facts, recipients=tuple(accepted), size=declared or 0, headers=headers)
    decision = await stage("data", f"data size={facts.size} headers={len(headers)}", facts)
    for name, value in decision.add_headers:
        out.append(f"  adds header {name}: {value}")
    if decision.route is not None:
        out.append(f"  route: {decision.route}")
    return finish(decision)


def run_dry(
    policy: Policy,
    *,
    client_address: str,
    sender: str,
    recipients: tuple[str, ...] | list[str],
    helo: str = "",
    listener: str = "",
    auth_user: str = "",
    tls: bool = False,
    message: bytes | None = None,
    checks: StaticChecks | None = None,
) -> tuple[str, int]:
    """The report of `policy-relay test` and its exit status: 0 accepted (also hold and
    discard), 4 tempfail, 5 reject. Runs its own event loop: call it from sync code."""
    envelope = Envelope(
        client_address, sender, tuple(recipients), helo, listener, auth_user, tls, message
    )
    outcome = asyncio.run(simulate(policy, envelope, checks or StaticChecks()))
    return outcome.text, outcome.exit_status


# --- test cases ----------------------------------------------------------------------------

_CASE_KEYS = {
    "name": "a string",
    "client_address": "a string",
    "helo": "a string",
    "listener": "a string",
    "auth_user": "a string",
    "tls": "true or false",
    "from": "a string",
    "to": "a list of strings",
    "message": "a file path",
    "spf": "an SPF result",
    "dkim": "a DKIM result",
    "dkim_domain": "a string",
    "over_limit": "a list of limit names",
    "expect": "accept, reject, tempfail, hold or discard",
    "expect_code": "an integer",
    "expect_rule": "a rule name",
}
_EXPECT = ("accept", "reject", "tempfail", "hold", "discard")


@dataclass(frozen=True, slots=True)
class _Case:
    name: str
    envelope: Envelope
    checks: StaticChecks
    expect: str
    expect_code: int | None
    expect_rule: str | None


def _read_case(index: int, raw: Any, base: Path, source: str, errors: list[str]) -> _Case | None:
    name = raw.get("name") if isinstance(raw, dict) else None
    where = f'{source}: case "{name}"' if isinstance(name, str) else f"{source}: case #{index}"
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a table")
        return None
    before = len(errors)

    def err(key: str, message: str) -> None:
        errors.append(f"{where}: {key}: {message}")

    for key in raw:
        if key not in _CASE_KEYS:
            err(key, f"unknown key (expected {', '.join(_CASE_KEYS)})")
    for key in ("name", "client_address", "from", "to", "expect"):
        if key not in raw:
            err(key, "required")

    def text(key: str, default: str = "") -> str:
        value = raw.get(key, default)
        if not isinstance(value, str):
            err(key, f"expected {_CASE_KEYS[key]}, got {value!r}")
            return default
        return value

    recipients = raw.get("to", [])
    if isinstance(recipients, str):
        recipients = [recipients]
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        err("to", f"expected a list of strings, got {recipients!r}")
        recipients = []
    tls = raw.get("tls", False)
    if not isinstance(tls, bool):
        err("tls", f"expected true or false, got {tls!r}")
    message: bytes | None = None
    if "message" in raw:
        path = base / text("message")
        try:
            message = path.read_bytes()
        except OSError as exc:
            err("message", f'cannot read "{path}": {exc.strerror}')
    spf = text("spf", "none").lower()
    if spf not in SPF_RESULTS:
        err("spf", f"expected one of {', '.join(SPF_RESULTS)}, got {spf!r}")
    dkim = text("dkim", "none").lower()
    if dkim not in DKIM_RESULTS:
        err("dkim", f"expected one of {', '.join(DKIM_RESULTS)}, got {dkim!r}")
    over = raw.get("over_limit", [])
    if isinstance(over, str):
        over = [over]
    if not isinstance(over, list) or not all(isinstance(o, str) for o in over):
        err("over_limit", f"expected a list of limit names, got {over!r}")
        over = []
    expect = text("expect", "accept")
    if expect not in _EXPECT:
        err("expect", f"expected one of {', '.join(_EXPECT)}, got {expect!r}")
    code = raw.get("expect_code")
    if code is not None and (isinstance(code, bool) or not isinstance(code, int)):
        err("expect_code", f"expected an integer, got {code!r}")
        code = None
    rule = raw.get("expect_rule")
    if rule is not None and not isinstance(rule, str):
        err("expect_rule", f"expected a rule name, got {rule!r}")
        rule = None
    if len(errors) > before:
        return None
    envelope = Envelope(
        client_address=text("client_address"),
        sender=text("from"),
        recipients=tuple(recipients),
        helo=text("helo"),
        listener=text("listener"),
        auth_user=text("auth_user"),
        tls=tls,
        message=message,
    )
    checks = StaticChecks(spf=spf, dkim=(dkim, text("dkim_domain")), over_limits=frozenset(over))
    return _Case(text("name"), envelope, checks, expect, code, rule)


def run_cases(policy: Policy, cases_file: Path) -> tuple[str, int]:
    """Run every `[[case]]` of a TOML file against `policy`: exit 0 when all pass, else 1.

    A case: name, client_address, helo, listener, auth_user, tls, from ("<>" for the null
    sender), to (list), message (path relative to the cases file), spf, dkim, dkim_domain,
    over_limit (limit names to treat as over), expect, and optional expect_code and
    expect_rule.
    """
    source = str(cases_file)
    try:
        data = tomllib.loads(cases_file.read_text(encoding="utf-8"))
    except OSError as exc:
        return f"{source}: cannot read: {exc.strerror}\n", 1
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        return f"{source}: {exc}\n", 1
    errors: list[str] = []
    for key in data:
        if key != "case":
            errors.append(f"{source}: {key}: unknown key (expected [[case]] tables)")
    raw_cases = data.get("case", [])
    if not isinstance(raw_cases, list) or not raw_cases:
        errors.append(f"{source}: case: expected one or more [[case]] tables")
        raw_cases = []
    cases = [
        _read_case(i, raw, cases_file.parent, source, errors) for i, raw in enumerate(raw_cases, 1)
    ]
    if errors:
        return "\n".join(errors) + "\n", 1

    async def run_all() -> list[tuple[_Case, Outcome]]:
        return [(c, await simulate(policy, c.envelope, c.checks)) for c in cases if c]

    out: list[str] = []
    failed = 0
    results = asyncio.run(run_all())
    for case, outcome in results:
        problems = []
        if outcome.action != case.expect:
            problems.append(f"expected {case.expect}, got {outcome.action}")
        if case.expect_code is not None and outcome.code != case.expect_code:
            problems.append(f"expected code {case.expect_code}, got {outcome.code}")
        if case.expect_rule is not None and outcome.rule != case.expect_rule:
            problems.append(f"expected rule {case.expect_rule}, got {outcome.rule or '-'}")
        heard = str(outcome.reply) if outcome.reply is not None else "250"
        summary = f"{outcome.action} (rule {outcome.rule or '-'}): {heard}"
        if problems:
            failed += 1
            out.append(f"FAIL {case.name}: {'; '.join(problems)}; {summary}")
            out.extend(f"     {line}" for line in outcome.text.splitlines())
        else:
            out.append(f"ok   {case.name}: {summary}")
    out.append(f"{len(results)} cases, {len(results) - failed} passed, {failed} failed")
    return "\n".join(out) + "\n", 0 if failed == 0 else 1
