"""`policy-relay spool check` and `spool salvage`: a damaged spool, read as far as it goes."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from relay.queue.salvage import salvage, survey

EX_DATAERR = 65


def add_spool_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    spool = commands.add_parser(
        "spool", help="check a spool the relay refused, or salvage its mail",
        description="A spool the relay refuses as damaged stays as it is. `check` says what "
        "is readable; `salvage --to DIR` copies every readable message into a fresh spool "
        "at DIR, which a relay can then use (spool_dir).",
        epilog="example: policy-relay spool salvage /var/lib/policy-relay/spool "
        "--to /var/lib/policy-relay/spool.salvaged",
    )
    actions = spool.add_subparsers(dest="spool_command", required=True, metavar="COMMAND")
    check = actions.add_parser("check", help="report integrity and readable messages")
    check.add_argument("directory", type=Path, help="the spool directory")
    save = actions.add_parser("salvage", help="copy readable messages into a new spool")
    save.add_argument("directory", type=Path, help="the damaged spool directory")
    save.add_argument("--to", type=Path, required=True, metavar="DIR", dest="target",
                      help="an empty directory for the new spool")


def run_spool(args: argparse.Namespace) -> int:
    database = args.directory / "spool.db"
    if not database.exists():
        print(f"policy-relay spool: {database}: no such file", file=sys.stderr)
        return EX_DATAERR
    if args.spool_command == "check":
        found = survey(database)
        print(f"{database}: {'ok' if found.problem is None else 'damaged: ' + found.problem}")
        print(f"readable messages: {len(found.readable)}")
        print(f"unreadable messages: {found.unreadable}")
        return 0 if found.problem is None and not found.unreadable else EX_DATAERR
    if args.target.exists() and any(args.target.iterdir()):
        print(f"policy-relay spool: {args.target}: not empty", file=sys.stderr)
        return EX_DATAERR
    found = asyncio.run(salvage(database, args.target))
    print(f"salvaged: {len(found.readable)}")
    print(f"unreadable: {found.unreadable}")
    if found.problem is not None:
        print(f"not salvaged: {found.problem}")
    return 0
