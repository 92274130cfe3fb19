"""`policy-relay test`: a session through the relay's own session model, stage by stage,
reported with what each rule did and what the client would hear."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay import replies
from relay.checks.services import CheckServices, SessionChecks
from relay.events.suppression import open_list
from relay.headers import header_fields
from relay.policy.engine import Decision, StaticChecks
from relay.policy.match import DKIM_RESULTS, DMARC_POLICIES, DMARC_RESULTS, SPF_RESULTS
from relay.policy.session import PolicySession, TransactionChecks
from relay.replies import Reply
from relay.runtime import Runtime

# Exit statuses of `policy-relay test`, by the class of what the client would hear.
EXIT_ACCEPT, EXIT_TEMPFAIL, EXIT_REJECT = 0, 4, 5
_EXIT = {"accept": 0, "hold": 0, "discard": 0, "tempfail": 4, "reject": 5}
# The relay names the queue id only once the message is stored; a dry run stores nothing.
DRY_RUN_ID = "<dry-run>"
START_DATA = "354 End data with <CR><LF>.<CR><LF>"


@dataclass(frozen=True, slots=True)
class Client:
    """One simulated SMTP session. sender "" (or "<>") is the null sender; message None
    sends an empty message (then size and header rules see nothing)."""

    client_address: str
    sender: str
    recipients: tuple[str, ...]
    helo: str = "localhost"
    listener: str = "smtp"
    auth_user: str = ""
    tls: bool = False
    smtputf8: bool = False
    message: bytes | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """One command of the session (\"\" for the greeting, "." for the message) and its reply."""

    stage: str
    command: str
    reply: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the client ends up hearing, why, and the stage-by-stage report."""

    action: str  # accept | hold | discard | reject | tempfail
    reply: Reply | None  # the refusal, None when the message was taken
    rule: str
    text: str
    steps: tuple[Step, ...]
    # What the rewrite rules changed, and the messages that would be stored: (sender,
    # recipients, route) of the message itself, then of each archive copy.
    changes: tuple[str, ...] = ()
    stored: tuple[tuple[str, tuple[str, ...], str], ...] = ()

    @property
    def code(self) -> int:
        return self.reply.code if self.reply is not None else 250

    @property
    def exit_status(self) -> int:
        return _EXIT[self.action]

    def json(self) -> str:
        return json.dumps({
            "steps": [{"stage": s.stage, "command": s.command, "reply": s.reply}
                      for s in self.steps],
            "action": self.action,
            "rule": self.rule,
            "reply": str(self.reply) if self.reply is not None else self.steps[-1].reply,
            "exit_status": self.exit_status,
            "changes": list(self.changes),
            "stored": [{"sender": sender, "recipients": list(recipients), "route": route}
                       for sender, recipients, route in self.stored],
        }, indent=1)


def _action(reply: Reply) -> str:
    return "tempfail" if reply.is_temporary else "reject"


def _refusal(decision: Decision | None, reply: Reply) -> tuple[str, Reply, str]:
    """(action, reply, rule) of a refused command: the policy's, or the server's own."""
    if decision is not None and decision.refused:
        return decision.action, reply, decision.rule
    return _action(reply), reply, ""


async def simulate(runtime: Runtime, client: Client, checks: TransactionChecks) -> Outcome:
    """Run the session model through connect, helo, mail, each rcpt and data, as the relay
    would for this client, like `exim -bh`; collect the report."""
    out: list[str] = []
    steps: list[Step] = []
    settings = runtime.settings
    hostname = settings.smtp_hostname
    listener = next((x for x in settings.listeners if x.name == client.listener), None)
    implicit_tls = listener is not None and listener.implicit_tls
    session = PolicySession(lambda: runtime, checks, client.client_address, client.listener,
                            trace=True)
    delay = runtime.policy.delay_reject

    def report(stage: str, command: str, refusal: Reply | None, normal: str) -> bool:
        """Record a command's reply and the walk behind it; True when it was refused."""
        decision: Decision | None = session.last_decision
        if decision is not None:
            out.extend(f"  {line}" for line in decision.trace)
            out.extend(f'  log: rule "{rule}" {text}' for rule, text in decision.would)
        heard = str(refusal) if refusal is not None else normal
        steps.append(Step(stage, command, heard))
        if refusal is not None:
            why = f"rule {decision.rule}" if decision is not None else "the server's own check"
            action = decision.action if decision is not None else _action(refusal)
            out.append(f"  -> {action} ({why}): {refusal}")
        elif decision is not None and decision.refused and delay:
            out.append(f"  -> {decision.action} (rule {decision.rule}), delayed to RCPT")
        else:
            action = decision.action if decision is not None else "accept"
            out.append(f"  -> {action}: {heard}")
        return refusal is not None

    def finish(action: str, reply: Reply | None, rule: str) -> Outcome:
        heard = str(reply) if reply is not None else steps[-1].reply
        if isinstance(checks, SessionChecks):  # --live-checks: what the lookups said
            spf, dkim = checks.spf_outcome, checks.dkim_outcome
            helo, dmarc = checks.spf_helo_outcome, checks.dmarc_outcome
            outbound = checks.dmarc_outbound_outcome
            out.append(f"checks: spf={spf.result if spf else '-'} "
                       f"dkim={dkim.result if dkim else '-'} (- = not needed by any rule)")
            if helo or dmarc or outbound:
                out.append(f"checks: spf_helo={helo.result if helo else '-'} "
                           f"dmarc={dmarc.result if dmarc else '-'} "
                           f"dmarc_outbound={outbound.result if outbound else '-'}")
        out.append(f"result: {action} (rule {rule or '-'}): client sees {heard}")
        return Outcome(action, reply, rule, "\n".join(out) + "\n", tuple(steps))

    def refused(reply: Reply) -> Outcome:
        return finish(*_refusal(session.last_decision, reply))

    out.append(f"connect client_address={client.client_address}")
    refusal = await session.connect(implicit_tls)
    if report("connect", "", refusal, f"220 {hostname} ESMTP"):
        assert refusal is not None
        return refused(refusal)
    tls = implicit_tls
    helos = [client.helo]
    if client.tls and not implicit_tls:
        helos.append(client.helo)  # RFC 3207 section 4.2: EHLO again after STARTTLS
    for index, helo in enumerate(helos):
        if index:
            steps.append(Step("helo", "STARTTLS", str(replies.READY_FOR_TLS)))
            out.append("starttls")
            tls = True
        out.append(f"helo {helo}")
        refusal = await session.helo(helo, tls)
        if report("helo", f"EHLO {helo}", refusal, f"250 {hostname}"):
            assert refusal is not None
            return refused(refusal)
    if client.auth_user:
        steps.append(Step("auth", "AUTH PLAIN", str(replies.AUTH_OK)))
        out.append(f"auth {client.auth_user}")

    sender = "" if client.sender == "<>" else client.sender
    message = client.message
    declared = len(message) if message is not None else None
    command = f"MAIL FROM:<{sender}>" + (f" SIZE={declared}" if declared is not None else "")
    command += " SMTPUTF8" if client.smtputf8 else ""
    auth = f" auth={client.auth_user}" if client.auth_user else ""
    out.append(f"mail from=<{sender}>{auth}" + (f" SIZE={declared}" if declared else ""))
    reply = await session.mail(sender, size=declared, smtputf8=client.smtputf8,
                               sasl_username=client.auth_user, tls=tls)
    if report("mail", command, None if reply.is_success else reply, str(reply)):
        return refused(reply)

    # The first refusal speaks for the session when no recipient is accepted.
    first_refusal: tuple[str, Reply, str] | None = None
    for recipient in client.recipients:
        out.append(f"rcpt to=<{recipient}>")
        reply = await session.rcpt(recipient)
        if report("rcpt", f"RCPT TO:<{recipient}>", None if reply.is_success else reply,
                  str(reply)) and first_refusal is None:
            first_refusal = _refusal(session.last_decision, reply)
    if not session.recipients:
        if first_refusal is None:
            out.append("no recipients")
            return Outcome("reject", None, "", "\n".join(out) + "\n", tuple(steps))
        out.append("no recipient accepted: no DATA")
        return finish(*first_refusal)

    data = message if message is not None else b""
    steps.append(Step("data", "DATA", START_DATA))
    out.append(f"data size={len(data)} headers={len(header_fields(data)) if data else 0}")
    verdict = await session.data(data, DRY_RUN_ID)
    if verdict.refused and verdict.reply is not None:
        report("data", ".", verdict.reply, "")
        return refused(verdict.reply)
    decision = session.last_decision
    for name, value in decision.add_headers if decision is not None else ():
        out.append(f"  adds header {name}: {value}")
    if verdict.route is not None:
        out.append(f"  route: {verdict.route}")
    report("data", ".", None, str(replies.queued(DRY_RUN_ID)))
    if verdict.action == "discard":
        return finish(verdict.action, None, verdict.rule)
    route = verdict.route or "default"
    stored = ((verdict.sender, verdict.recipients, route),
              *((c.sender, c.recipients, c.route or route) for c in verdict.copies))
    if verdict.changes:  # what the rewrite rules change, and the messages then stored
        out.extend(f"rewrite: {change}" for change in verdict.changes)
        out.extend(f"stores: from=<{sender}> to={','.join(f'<{r}>' for r in rcpts)} "
                   f"route={via}" for sender, rcpts, via in stored)
    outcome = finish(verdict.action, None, verdict.rule)
    return dataclasses.replace(outcome, changes=verdict.changes, stored=stored)


def run_dry(
    runtime: Runtime, client: Client, checks: StaticChecks | None = None, *, live: bool = False
) -> Outcome:
    """The outcome of `policy-relay test`: its report, its JSON and its exit status (0
    accepted, also hold and discard; 4 tempfail; 5 reject). Runs its own event loop: call
    it from sync code.

    `live` runs the relay's own checks (SPF and DKIM over the configured resolver, the
    real suppression list) instead of the fixed results of `checks`; limits then count in
    fresh in-memory buckets, so a dry run never charges the running relay's (Redis) buckets.
    """
    if not live:
        return asyncio.run(simulate(runtime, client, checks or StaticChecks()))

    async def run() -> Outcome:
        settings = dataclasses.replace(runtime.settings.checks, redis_url="")
        # The suppression list is read, never written: the real one.
        suppression = open_list(runtime.settings.suppression, runtime.settings.spool_path)
        services = CheckServices(settings, dict(runtime.policy.limits),
                                 suppression=suppression)
        try:
            return await simulate(runtime, client, SessionChecks(lambda: services))
        finally:
            await services.close()
            await suppression.close()

    return asyncio.run(run())


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
    "spf_helo": "an SPF result",
    "dmarc": "a DMARC result",
    "dmarc_policy": "none, quarantine or reject",
    "dmarc_outbound": "a DMARC result",
    "over_limit": "a list of limit names",
    "suppressed": "a list of recipients on the suppression list",
    "expect": "accept, reject, tempfail, hold or discard",
    "expect_code": "an integer",
    "expect_rule": "a rule name",
    "expect_sender": "an address (\"<>\" for the null sender)",
    "expect_recipients": "a list of addresses",
}
_EXPECT = ("accept", "reject", "tempfail", "hold", "discard")


@dataclass(frozen=True, slots=True)
class _Case:
    name: str
    client: Client
    checks: StaticChecks
    expect: str
    expect_code: int | None
    expect_rule: str | None
    # The envelope stored after rewriting (relay.policy.rewrite), when the case says.
    expect_sender: str | None = None
    expect_recipients: tuple[str, ...] | None = None


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

    def names(key: str) -> list[str]:
        """A list of strings (or one string) under `key`."""
        value = raw.get(key, [])
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            err(key, f"expected {_CASE_KEYS[key]}, got {value!r}")
            return []
        return value

    recipients = names("to")
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
    assumed: dict[str, str] = {}
    for key, choices, default in (
        ("spf_helo", SPF_RESULTS, "none"), ("dmarc", DMARC_RESULTS, "none"),
        ("dmarc_policy", DMARC_POLICIES, ""), ("dmarc_outbound", DMARC_RESULTS, "none"),
    ):
        assumed[key] = text(key, default).lower()
        if assumed[key] != default and assumed[key] not in choices:
            err(key, f"expected one of {', '.join(choices)}, got {assumed[key]!r}")
    over = names("over_limit")
    suppressed = names("suppressed")
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
    expect_sender = raw.get("expect_sender")
    if expect_sender is not None and not isinstance(expect_sender, str):
        err("expect_sender", f"expected {_CASE_KEYS['expect_sender']}, got {expect_sender!r}")
    expect_recipients = raw.get("expect_recipients")
    if expect_recipients is not None and (
        not isinstance(expect_recipients, list)
        or not all(isinstance(r, str) for r in expect_recipients)
    ):
        err("expect_recipients", f"expected a list of addresses, got {expect_recipients!r}")
    if len(errors) > before:
        return None
    client = Client(
        client_address=text("client_address"),
        sender=text("from"),
        recipients=tuple(recipients),
        helo=text("helo", "localhost"),
        listener=text("listener", "smtp"),
        auth_user=text("auth_user"),
        tls=tls,
        message=message,
    )
    checks = StaticChecks(
        spf=spf, dkim=(dkim, text("dkim_domain")), over_limits=frozenset(over),
        spf_helo=assumed["spf_helo"], dmarc=(assumed["dmarc"], assumed["dmarc_policy"]),
        dmarc_outbound=assumed["dmarc_outbound"],
        suppressed=dict.fromkeys(suppressed, "(assumed)"),
    )
    return _Case(
        text("name"), client, checks, expect, code, rule,
        None if expect_sender is None else "" if expect_sender == "<>" else expect_sender,
        None if expect_recipients is None else tuple(expect_recipients),
    )


def run_cases(runtime: Runtime, cases_file: Path) -> tuple[str, int]:
    """Run every `[[case]]` of a TOML file through the session model: exit 0 when all pass, else 1.

    A case: name, client_address, helo, listener, auth_user, tls, from ("<>" for the null
    sender), to (list), message (path relative to the cases file), spf, dkim, dkim_domain,
    over_limit (limit names to treat as over), expect, and optional expect_code,
    expect_rule, and expect_sender and expect_recipients (the envelope stored after
    rewriting).
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
        return [(c, await simulate(runtime, c.client, c.checks)) for c in cases if c]

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
        sender, recipients = outcome.stored[0][:2] if outcome.stored else (None, None)
        if case.expect_sender is not None and sender != case.expect_sender:
            problems.append(f"expected sender <{case.expect_sender}>, got "
                            + (f"<{sender}>" if sender is not None else "nothing stored"))
        if case.expect_recipients is not None and recipients != case.expect_recipients:
            got = ", ".join(f"<{r}>" for r in recipients) if recipients is not None else ""
            problems.append(f"expected recipients "
                            f"{', '.join(f'<{r}>' for r in case.expect_recipients)}, got "
                            + (got or "nothing stored"))
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
