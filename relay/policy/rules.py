"""Policy rules as values, and the loader that reads and validates `policies/*.toml`."""

from __future__ import annotations

import re
import string
import tomllib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from relay.checks.ratelimit import LimitSpec, read_limit
from relay.policy import match
from relay.policy.fields import CONDITION_FIELDS, CONNECT, DATA, FIELDS, MAIL, RCPT
from relay.policy.maps import AddressMap
from relay.policy.rewrite import Edit
from relay.policy.rewrite_rules import (
    EDIT_KEYS,
    REWRITE_ACTIONS,
    MapSource,
    content_lines,
    read_edit,
)
from relay.replies import Reply
from relay.schema import ConfigError, Errors, Table

Stage = Literal["connect", "helo", "mail", "rcpt", "data"]
STAGES: tuple[Stage, ...] = ("connect", "helo", "mail", "rcpt", "data")
# A limit is consulted at the stage where the thing it counts is known.
LIMIT_STAGES = {"connection": CONNECT, "message": MAIL, "recipient": RCPT, "byte": DATA}

PLACEHOLDERS = frozenset(
    {
        *(name for name, f in FIELDS.items() if f.text is not None),
        "retry_after",  # seconds until the rule's over_limit bucket has room again
        "rule",
    }
)

ACTIONS = (
    "accept", "reject", "tempfail", "defer", "hold", "discard", "tag", "route", "log",
    *REWRITE_ACTIONS,
)
TERMINAL = frozenset({"accept", "reject", "tempfail", "hold", "discard"})
# Terminal actions under which the message is taken (and so must not be refused early).
ACCEPTING = frozenset({"accept", "hold", "discard"})
FINAL_ACTIONS = ("reject", "tempfail", "accept")
LOG_ACTIONS = ("reject", "tempfail", "hold", "discard", "accept")

DEFAULT_REPLIES = {
    "reject": Reply(550, "5.7.1", "Message rejected by policy"),
    "tempfail": Reply(451, "4.7.1", "Try again later"),
}
DEFAULT_FINAL = {
    "reject": "554 5.7.1 <{recipient}>: Relay access denied",
    "tempfail": "451 4.7.1 <{recipient}>: Relay access temporarily denied",
}
_REPLY_CLASS = {"reject": 5, "tempfail": 4, "accept": 2, "hold": 2, "discard": 2}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 section 2.2 ftext
_RULE_KEYS = frozenset(
    {"name", "match", "unless", "over_limit", "action", "message", "add_headers", "route"}
    | {"log_action"} | EDIT_KEYS
)
_TOP_KEYS = ("defaults", "lists", "maps", "limit", "rule")


@dataclass(frozen=True, slots=True)
class Template:
    """Text with `{field}` placeholders, checked at load so rendering cannot fail."""

    text: str
    fields: frozenset[str]

    def render(self, values: Mapping[str, str]) -> str:
        return self.text.format_map(values) if self.fields else self.text


@dataclass(frozen=True, slots=True)
class ReplyTemplate:
    """A reply whose text may interpolate fields; code and status are fixed at load."""

    reply: Reply
    text: Template

    def render(self, values: Mapping[str, str]) -> Reply:
        if not self.text.fields:
            return self.reply
        return self.reply.with_text(self.text.render(values))


@dataclass(frozen=True, slots=True)
class Condition:
    """One `match.<field>` or `unless.<field>` entry (or a rule's `over_limit`)."""

    field: str  # a key of relay.policy.fields.FIELDS
    arg: str  # lower-case header name for "header", limit name for "over_limit"
    key: str  # as written in the file, for messages: 'match.header."X-Foo"'
    spec: str  # the values as written, for traces
    matcher: match.Matcher
    stage: int
    lazy: bool


@dataclass(frozen=True, slots=True)
class Rule:
    """One `[[rule]]` table, compiled."""

    name: str
    source: str
    action: str  # "defer" is stored as "tempfail"
    match: tuple[Condition, ...]  # cheap conditions first, then the lazy ones
    unless: tuple[Condition, ...]
    reply: ReplyTemplate | None  # reject/tempfail (default filled in), accept/hold/discard
    # (custom only), log (the reply the logged action would have given)
    log_action: str
    add_headers: tuple[tuple[str, Template], ...]
    route: str | None
    edit: Edit | None  # what a rewrite action (relay.policy.rewrite) changes
    over_limit: str | None
    stage: int  # the earliest stage at which every condition is known
    sized: bool  # has a size condition: known before DATA only if SIZE= was declared
    terminal: bool
    accepting: bool
    catch_all: bool  # no condition can fail: nothing below it is reachable


@dataclass(frozen=True, slots=True, eq=False)
class Policy:
    """Every rule, list and limit of one policies directory: an immutable snapshot."""

    rules: tuple[Rule, ...]
    lists: Mapping[str, tuple[str, ...]]
    maps: Mapping[str, AddressMap]
    limits: Mapping[str, LimitSpec]
    final_action: str
    final_reply: ReplyTemplate | None  # None when final_action is "accept"
    delay_reject: bool
    warnings: tuple[str, ...]
    files: tuple[str, ...]

    def over_limit_of(self, rule_name: str) -> str | None:
        """The limit a rule consults (`over_limit`), if any; for refusal bookkeeping."""
        return next((r.over_limit for r in self.rules if r.name == rule_name), None)


# --- loading --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    value: str
    origin: str  # where it was written, for messages: "policies/lists/x.txt:3"


def load_policy(
    directory: Path,
    upstream_groups: Collection[str] = (),
    builtin_lists: Mapping[str, Sequence[str]] | None = None,
) -> Policy:
    """Read every `*.toml` in `directory` in file-name order into one Policy.

    `builtin_lists` are lists defined by config.toml rather than by a policy file (the
    relay_networks of `[server]` and `--allow`); rules may use them as `@name`.
    Raises ConfigError with every error found, each prefixed with the file (named relative
    to the directory's parent, e.g. "policies/10-relay.toml"), the rule and the key.
    """
    loader = _Loader(directory, frozenset(upstream_groups))
    for name, values in (builtin_lists or {}).items():
        loader.lists[name] = (tuple(_Entry(v, "config.toml") for v in values), "config.toml")
        loader.used_lists.add(name)  # never warn that config's own list is unused
    return loader.load()


class _Loader:
    def __init__(self, directory: Path, upstream_groups: frozenset[str]) -> None:
        self.directory = directory
        self.upstream_groups = upstream_groups
        self.errors = Errors()
        self.warnings: list[str] = []
        self.defaults: dict[str, tuple[object, str]] = {}  # key -> (value, file that set it)
        self.lists: dict[str, tuple[tuple[_Entry, ...], str]] = {}
        self.limit_tables: dict[str, tuple[dict[str, Any], str]] = {}
        self.raw_rules: list[tuple[dict[str, Any], str, int]] = []
        self.used_lists: set[str] = set()
        self.used_limits: set[str] = set()
        self.maps = MapSource(directory, self.name_of, self.errors)

    def name_of(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.directory.parent))
        except ValueError:
            return str(path)

    def load(self) -> Policy:
        try:
            paths = sorted(p for p in self.directory.glob("*.toml") if p.is_file())
        except OSError as exc:
            raise ConfigError([f"{self.directory}: cannot read: {exc.strerror}"]) from exc
        if not self.directory.is_dir():
            raise ConfigError([f"{self.directory}: not a directory"])
        files = []
        for path in paths:
            source = self.name_of(path)
            files.append(source)
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except OSError as exc:
                self.errors.add(f"{source}: cannot read: {exc.strerror}")
                continue
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                self.errors.add(f"{source}: {exc}")
                continue
            self.read_file(data, source)

        limits = self.read_limits()
        self.maps.compile_named()
        rules = self.compile_rules(limits)
        final_action, final_reply, delay_reject = self.read_defaults()
        for name, (_, source) in self.lists.items():
            if name not in self.used_lists:
                self.warnings.append(f"{source}: lists.{name}: not used by any rule")
        for name, (_, source) in self.limit_tables.items():
            if name not in self.used_limits:
                self.warnings.append(f"{source}: limit.{name}: not used by any rule")
        self.warnings.extend(self.maps.unused())
        self.warn_unreachable(rules)
        if self.errors:
            # In file order (limits, lists and defaults are checked after all files are read).
            order = {source: index for index, source in enumerate(files)}
            messages = self.errors.messages
            raise ConfigError(
                sorted(messages, key=lambda m: order.get(m.split(": ", 1)[0], len(order)))
            )
        return Policy(
            rules=tuple(rules),
            lists={
                name: tuple(e.value for e in entries) for name, (entries, _) in self.lists.items()
            },
            maps=self.maps.named,
            limits=limits,
            final_action=final_action,
            final_reply=final_reply,
            delay_reject=delay_reject,
            warnings=tuple(self.warnings),
            files=tuple(files),
        )

    # --- one file: collect tables; rules are compiled once every list and limit is known ---

    def read_file(self, data: dict[str, Any], source: str) -> None:
        for key in data:
            if key not in _TOP_KEYS:
                self.errors.add(f"{source}: {key}: unknown key (expected {', '.join(_TOP_KEYS)})")
        defaults = data.get("defaults", {})
        if not isinstance(defaults, dict):
            self.errors.add(f"{source}: defaults: expected a table")
        else:
            for key, value in defaults.items():
                if key in self.defaults:
                    first = self.defaults[key][1]
                    self.errors.add(f"{source}: defaults.{key}: already set in {first}")
                else:
                    self.defaults[key] = (value, source)
        lists = data.get("lists", {})
        if not isinstance(lists, dict):
            self.errors.add(f"{source}: lists: expected a table")
        else:
            for name, values in lists.items():
                self.read_list(name, values, source)
        maps = data.get("maps", {})
        if not isinstance(maps, dict):
            self.errors.add(f"{source}: maps: expected a table")
        else:
            for name, value in maps.items():
                self.maps.add(name, value, source)
        limits = data.get("limit", {})
        if not isinstance(limits, dict):
            self.errors.add(f"{source}: limit: expected tables [limit.NAME]")
        else:
            for name, table in limits.items():
                if not isinstance(table, dict):
                    self.errors.add(f"{source}: limit.{name}: expected a table")
                elif name in self.limit_tables:
                    first = self.limit_tables[name][1]
                    self.errors.add(f"{source}: limit.{name}: already defined in {first}")
                else:
                    self.limit_tables[name] = (table, source)
        rules = data.get("rule", [])
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            self.errors.add(f"{source}: rule: expected [[rule]] tables")
        else:
            for index, rule in enumerate(rules, 1):
                self.raw_rules.append((rule, source, index))

    def read_list(self, name: str, values: object, source: str) -> None:
        key = f"{source}: lists.{name}"
        if name in self.lists:
            self.errors.add(f"{key}: already defined in {self.lists[name][1]}")
            return
        if not _NAME.match(name):
            self.errors.add(f"{key}: list names use letters, digits, '_', '-', '.' and ':'")
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            self.errors.add(f"{key}: expected a list of strings, got {values!r}")
            return
        entries: list[_Entry] = []
        for value in values:
            if not value.startswith("file:"):
                entries.append(_Entry(value, source))
                continue
            # Relative to the policies directory; re-read on every load, so a reload
            # picks up an edited list file.
            path = self.directory / value[5:]
            try:
                lines = content_lines(path)
            except ValueError as exc:
                self.errors.add(f'{key}: cannot read "{value[5:]}": {exc}')
                continue
            origin = self.name_of(path)
            entries.extend(_Entry(line, f"{origin}:{number}") for number, line in lines)
        self.lists[name] = (tuple(entries), source)

    def read_limits(self) -> dict[str, LimitSpec]:
        limits = {}
        for name, (table, source) in self.limit_tables.items():
            spec = read_limit(name, Table(table, f"limit.{name}", source, self.errors))
            if spec is not None:
                limits[name] = spec
        return limits

    def read_defaults(self) -> tuple[str, ReplyTemplate | None, bool]:
        values = {key: value for key, (value, _) in self.defaults.items()}
        sources = {key: source for key, (_, source) in self.defaults.items()}
        final_action, delay_reject = "reject", True
        final_reply: ReplyTemplate | None = None

        def table(key: str) -> Table:
            return Table({key: values[key]}, "defaults", sources[key], self.errors)

        if "final_action" in values:
            final_action = table("final_action").string("final_action", "reject", FINAL_ACTIONS)
        if "delay_reject" in values:
            delay_reject = table("delay_reject").boolean("delay_reject", True)
        message = DEFAULT_FINAL.get(final_action)
        message_source = sources.get("final_message", "<built-in default>")
        if "final_message" in values:
            message = table("final_message").string("final_message", message or "")
        if message:
            final_reply = self.reply(
                message,
                final_action,
                PLACEHOLDERS - {"retry_after"},
                lambda m: self.errors.add(f"{message_source}: defaults.final_message: {m}"),
            )
        for key, source in sources.items():
            if key not in ("final_action", "final_message", "delay_reject"):
                self.errors.add(f"{source}: defaults.{key}: unknown key")
        return final_action, final_reply, delay_reject

    # --- rules ----------------------------------------------------------------------------

    def compile_rules(self, limits: Mapping[str, LimitSpec]) -> list[Rule]:
        rules: list[Rule] = []
        seen: dict[str, str] = {}
        for data, source, index in self.raw_rules:
            name = data.get("name")
            label = f'rule "{name}"' if isinstance(name, str) and name else f"rule #{index}"
            t = Table(data, "", f"{source}: {label}", self.errors)
            if not isinstance(name, str) or not name:
                t.error("name", "required (a unique name, used in logs and metrics)")
                name = f"#{index}"
            elif not _NAME.match(name) or name == "final_action":
                t.error("name", "use letters, digits, '_', '-', '.' and ':' (not final_action)")
            elif name in seen:
                t.error("name", f'"{name}" is already used by a rule in {seen[name]}')
            else:
                seen[name] = source
            rule = self.compile_rule(t, name, source, limits)
            if rule is not None:
                rules.append(rule)
        return rules

    def compile_rule(
        self, t: Table, name: str, source: str, limits: Mapping[str, LimitSpec]
    ) -> Rule | None:
        before = len(self.errors.messages)
        for key in t.data:
            if key not in _RULE_KEYS:
                t.error(key, f"unknown key (expected {', '.join(sorted(_RULE_KEYS))})")
        if "action" not in t.data:
            t.error("action", f"required (one of {', '.join(ACTIONS)})")
        action = t.string("action", "reject", ACTIONS)
        if action == "defer":
            action = "tempfail"  # Postfix DEFER and Exim defer both mean 4xx

        conditions = self.conditions(t, "match")
        unless = self.conditions(t, "unless")
        over_limit: str | None = None
        if "over_limit" in t.data:
            over_limit = t.string("over_limit", "")
            if over_limit not in self.limit_tables:
                t.error("over_limit", f'unknown limit "{over_limit}"')
            else:
                self.used_limits.add(over_limit)
                spec = limits.get(over_limit)
                stage = LIMIT_STAGES[spec.count] if spec is not None else RCPT
                over = match.BoolBuilder()
                over.add(True)
                conditions.append(
                    Condition("over_limit", over_limit, "over_limit", f'"{over_limit}"',
                              over.build(), stage, True)
                )
        # Cheap tests first: a lazy check (SPF, DKIM, a limit) runs only when the rest match.
        conditions.sort(key=lambda c: c.lazy)
        unless.sort(key=lambda c: c.lazy)

        placeholders = set(PLACEHOLDERS)
        if over_limit is None:
            placeholders.discard("retry_after")

        def fail(key: str) -> Any:
            return lambda message: t.error(key, message)

        reply: ReplyTemplate | None = None
        log_action = ""
        if action == "log":
            if "log_action" not in t.data:
                t.error("log_action", f'required with action = "log" ({", ".join(LOG_ACTIONS)})')
            log_action = t.string("log_action", "reject", LOG_ACTIONS)
        elif "log_action" in t.data:
            t.error("log_action", 'only used with action = "log"')
        reply_action = log_action if action == "log" else action
        if "message" in t.data:
            if action in ("tag", "route", *REWRITE_ACTIONS):
                t.error("message", f'not used with action = "{action}"')
            text = t.string("message", "")
            if text:
                reply = self.reply(text, reply_action, placeholders, fail("message"))
        if reply is None and reply_action in DEFAULT_REPLIES:
            default = DEFAULT_REPLIES[reply_action]
            reply = ReplyTemplate(default, Template(default.text, frozenset()))

        add_headers: list[tuple[str, Template]] = []
        if "add_headers" in t.data:
            if action != "tag":
                t.error("add_headers", 'only used with action = "tag"')
            headers = t.table("add_headers")
            for header, value in headers.data.items():
                key = f'add_headers."{header}"'
                if not _HEADER_NAME.match(header):
                    t.error(key, "not a valid header field name")
                if not isinstance(value, str):
                    t.error(key, f"expected a string, got {value!r}")
                    continue
                template = self.template(value, placeholders, fail(key))
                if template is not None:
                    add_headers.append((header, template))
        elif action == "tag":
            t.error("add_headers", 'required with action = "tag"')

        route: str | None = None
        if "route" in t.data:
            route = t.string("route", "")
            if action != "route":
                t.error("route", 'only used with action = "route"')
            elif self.upstream_groups and route not in self.upstream_groups:
                known = ", ".join(sorted(self.upstream_groups))
                t.error("route", f'unknown upstream group "{route}" (known: {known})')
        elif action == "route":
            t.error("route", 'required with action = "route" (an upstream group name)')

        edit = read_edit(t, action, self.maps, self.upstream_groups)
        if len(self.errors.messages) > before:
            return None
        everything = all(
            c.field == "client_address"
            and isinstance(c.matcher, match.NetworkMatcher)
            and c.matcher.everything
            for c in conditions
        )
        return Rule(
            name=name,
            source=source,
            action=action,
            match=tuple(conditions),
            unless=tuple(unless),
            reply=reply,
            log_action=log_action,
            add_headers=tuple(add_headers),
            route=route,
            edit=edit,
            over_limit=over_limit,
            stage=max((c.stage for c in (*conditions, *unless)), default=CONNECT),
            sized=any(c.field == "size" for c in (*conditions, *unless)),
            terminal=action in TERMINAL,
            accepting=action in ACCEPTING,
            catch_all=everything and not unless,
        )

    def conditions(self, t: Table, which: str) -> list[Condition]:
        if which not in t.data:
            return []
        table = t.table(which)
        result = []
        for field, value in table.data.items():
            if field == "header":
                if not isinstance(value, dict) or not value:
                    t.error(f"{which}.header", 'expected header names: header."Name" = "value"')
                    continue
                for header, header_value in value.items():
                    key = f'{which}.header."{header}"'
                    if not _HEADER_NAME.match(header):
                        t.error(key, "not a valid header field name")
                        continue
                    cond = self.condition(t, key, "header", header.lower(), header_value)
                    if cond is not None:
                        result.append(cond)
                continue
            key = f"{which}.{field}"
            if field not in CONDITION_FIELDS:
                t.error(key, f"unknown field (known: {', '.join(CONDITION_FIELDS)})")
                continue
            cond = self.condition(t, key, field, "", value)
            if cond is not None:
                result.append(cond)
        return result

    def condition(
        self, t: Table, key: str, field: str, arg: str, value: object
    ) -> Condition | None:
        values = value if isinstance(value, list) else [value]
        if not values:
            t.error(key, "an empty list matches nothing")
            return None
        build = FIELDS[field].build()
        ok = True
        for item in values:
            if isinstance(item, str) and item.startswith("@"):
                name = item[1:]
                if name not in self.lists:
                    hint = ""
                    if "." in name and field in ("sender", "recipient"):
                        hint = f' (for every address in a domain write "*{item}")'
                    t.error(key, f'unknown list "{item}"{hint}')
                    ok = False
                    continue
                self.used_lists.add(name)
                for entry in self.lists[name][0]:
                    if entry.value.startswith("@"):
                        problem: str | None = "a list cannot refer to another list"
                    else:
                        problem = build.add(entry.value)
                    if problem:
                        t.error(key, f'list "{name}" ({entry.origin}): {problem}')
                        ok = False
                continue
            problem = build.add(item)
            if problem:
                t.error(key, problem)
                ok = False
        if not ok:
            return None
        spec = _show(value)
        info = FIELDS[field]
        return Condition(field, arg, key, spec, build.build(), info.stage, info.lazy)

    # --- replies and templates ------------------------------------------------------------

    def template(self, text: str, allowed: Collection[str], fail: Any) -> Template | None:
        fields = set()
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            fail(f"{exc} in {text!r} (write {{{{ and }}}} for literal braces)")
            return None
        for _, field, spec, conversion in parsed:
            if field is None:
                continue
            if field not in allowed:
                hint = (
                    " (only in a rule with over_limit)"
                    if field == "retry_after"
                    else f" (known: {', '.join(sorted(allowed))})"
                )
                fail(f"unknown placeholder {{{field}}}{hint}")
                return None
            if spec or conversion:
                fail(f"placeholder {{{field}}}: format specs are not supported")
                return None
            fields.add(field)
        return Template(text, frozenset(fields))

    def reply(
        self, text: str, action: str, placeholders: Collection[str], fail: Any
    ) -> ReplyTemplate | None:
        try:
            reply = Reply.parse(text)
        except ValueError as exc:
            fail(str(exc))
            return None
        wanted = _REPLY_CLASS.get(action)
        if wanted is not None and reply.code // 100 != wanted:
            fail(f'code {reply.code} does not fit action "{action}" (expected {wanted}xx)')
            return None
        template = self.template(reply.text, placeholders, fail)
        if template is None:
            return None
        return ReplyTemplate(reply, template)

    def warn_unreachable(self, rules: list[Rule]) -> None:
        for index, rule in enumerate(rules):
            if rule.terminal and rule.catch_all:
                for later in rules[index + 1 :]:
                    self.warnings.append(
                        f'{later.source}: rule "{later.name}": unreachable: rule "{rule.name}" '
                        f"({rule.source}) above it matches every message"
                    )
                return


def _show(value: object) -> str:
    """A TOML value as the operator wrote it, for traces."""
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)
