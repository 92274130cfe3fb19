"""`policy-relay suppress` and `policy-relay trace`: the suppression list and message
history, read and edited where they are stored (no running relay needed)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from relay import config
from relay.events import history
from relay.events.suppression import Entry, SuppressionError, SuppressionList, open_list

EX_CONFIG = 78
EX_UNAVAILABLE = 69


def add_event_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    suppress = commands.add_parser(
        "suppress", help="list and edit the suppression list",
        description="Recipients that failed permanently ([suppression] codes) are refused "
        "at RCPT by the shipped rule suppressed-recipients until they expire. Works on "
        "suppression.db in the spool directory (or the [suppression] Redis), running "
        "relay or not.")
    verbs = suppress.add_subparsers(dest="suppress_command", required=True, metavar="COMMAND")
    listing = verbs.add_parser("list", help="every address on the list")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    add = verbs.add_parser("add", help="suppress addresses")
    add.add_argument("addresses", nargs="+", metavar="ADDRESS")
    add.add_argument("--reason", default="operator", help='why (default "operator")')
    remove = verbs.add_parser("remove", help="take addresses off the list")
    remove.add_argument("addresses", nargs="+", metavar="ADDRESS")
    load = verbs.add_parser("import", help="add the entries of a file (- = stdin)",
                            description="Lines are JSON objects as `export` writes them, "
                            "or plain addresses; # starts a comment.")
    load.add_argument("file", metavar="FILE")
    verbs.add_parser("export", help="every entry as one JSON object per line")
    for parser in (suppress, listing, add, remove, load, verbs.choices["export"]):
        _flags(parser)
    suppress.set_defaults(run=run_suppress)

    trace = commands.add_parser(
        "trace", help="what happened to a message: its decisions and delivery attempts",
        description="Find messages by queue id, Message-ID or recipient in the event "
        "history ([events] history, default 7 days), also after they left the queue.")
    trace.add_argument("query", metavar="QUEUE-ID|MESSAGE-ID|RECIPIENT")
    trace.add_argument("--json", action="store_true", help="the events as a JSON list")
    _flags(trace)
    trace.set_defaults(run=run_trace)


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", type=Path, default=argparse.SUPPRESS,
                        help="config file (default: the embedded defaults)")
    parser.add_argument("--spool-dir", metavar="DIR", default=argparse.SUPPRESS,
                        help="the relay's spool directory (default: from the config)")


def _settings(args: argparse.Namespace) -> config.Settings | None:
    spool_dir = getattr(args, "spool_dir", None)
    try:
        return config.load(getattr(args, "config", None),
                           config.Overrides(spool_dir=spool_dir))
    except config.ConfigError as exc:
        for line in exc.messages:
            print(line, file=sys.stderr)
        return None


def run_trace(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return EX_CONFIG
    found = history.find(settings.spool_path, args.query)
    if args.json:
        print(json.dumps(found, indent=1))
    else:
        print(history.text(found), end="")
    if not found:
        print(f"policy-relay trace: nothing found for {args.query!r}", file=sys.stderr)
        return 1
    return 0


def run_suppress(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return EX_CONFIG
    listed = open_list(settings.suppression, settings.spool_path)

    async def run() -> int:
        try:
            return await _suppress(listed, args)
        finally:
            await listed.close()

    try:
        return asyncio.run(run())
    except SuppressionError as exc:
        print(f"policy-relay suppress: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE


async def _suppress(listed: SuppressionList, args: argparse.Namespace) -> int:
    command = args.suppress_command
    if command in ("list", "export"):
        for entry in await listed.entries():
            if command == "export" or args.json:
                print(json.dumps(entry.as_dict()))
            else:
                print(_line(entry))
        return 0
    if command == "add":
        for address in args.addresses:
            await listed.add(address, args.reason, "")
            print(f"{address}: suppressed")
        return 0
    if command == "remove":
        status = 0
        for address in args.addresses:
            if await listed.remove(address):
                print(f"{address}: removed")
            else:
                print(f"{address}: not on the list", file=sys.stderr)
                status = 1
        return status
    return await _import(listed, args.file)


async def _import(listed: SuppressionList, name: str) -> int:
    stream = sys.stdin if name == "-" else open(name, encoding="utf-8")  # noqa: SIM115
    count, status = 0, 0
    with stream:
        for number, raw in enumerate(stream, 1):
            line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("{") \
                else raw.strip()
            if not line:
                continue
            try:
                item = json.loads(line) if line.startswith("{") else {"address": line}
                address = str(item["address"])
                added = float(item["added"]) if "added" in item else None
            except (ValueError, KeyError, TypeError):
                print(f"{name}:{number}: expected an address or a JSON object with "
                      f"\"address\", got {line[:80]!r}", file=sys.stderr)
                status = 1
                continue
            await listed.add(address, str(item.get("reason", "import")),
                             str(item.get("reply", "")), added)
            count += 1
    print(f"{count} addresses imported")
    return status


def _line(entry: Entry) -> str:
    day = time.strftime("%Y-%m-%d", time.localtime(entry.added))
    until = time.strftime("%Y-%m-%d", time.localtime(entry.expires))
    reply = f" {entry.reply}" if entry.reply else ""
    return f"{entry.address}  since {day}  until {until}  {entry.reason}{reply}"
