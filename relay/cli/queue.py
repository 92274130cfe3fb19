"""The `policy-relay queue` commands.

Wiring (relay/cli.py):

    queuecli.add_queue_parser(commands)        # adds `queue` and its sub-commands
    ...
    if args.command == "queue":
        return queuecli.run_queue(args)        # before loading config: no config needed

Commands, modelled on postqueue(1), postsuper(1) and qshape(1):

    queue list [--json]          mailq layout; --json = one object per line (postqueue -j)
    queue show ID [--body]       envelope, per-recipient state, optionally the message
    queue flush [ID...]          queued messages due now (all when no ID)
    queue hold ID...             keep in the spool, do not deliver
    queue release ID...          back to the queue, due now
    queue delete ID...           remove from the spool
    queue delete ALL [QUEUE]     everything, or one queue (deferred, active, hold, failed);
                                 ALL only in upper case, as postsuper: `all` is an id
    queue summary                counts by queue; route x age buckets like qshape

In `list`, a `!` after the id marks a held message (as Postfix) and `#` a failed one
(kept after a permanent failure or expiry, for the operator to look at).

Exit status: 0 done, 1 an id was not found (or the relay refused), 69 (EX_UNAVAILABLE)
no relay answers on the control socket, 77 (EX_NOPERM) no permission to use it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from relay.ops.metrics import QUEUE_STATES
from relay.queue import control

EX_UNAVAILABLE = 69  # sysexits.h
EX_NOPERM = 77
PROG = "policy-relay queue"
LIMITS_PROG = "policy-relay limits"

# Postfix's postqueue -p layout: rows "%-10s%c%8ld %20.20s %s" (id, mark, size, arrival,
# sender), recipients at column 41, and a header one column wider than the id field.
_HEADER = "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------"
_MARKS = {"hold": "!", "failed": "#"}


def add_queue_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add `queue` with its sub-commands to the top-level `add_subparsers()` object."""
    queue = subparsers.add_parser(
        "queue", help="list and manage the queue of a running relay",
        description="Talk to the running relay over its control socket.",
    )
    socket_flags(queue)
    commands = queue.add_subparsers(dest="queue_command", required=True, metavar="COMMAND")

    listing = commands.add_parser("list", help="list queued messages (like mailq)")
    listing.add_argument("--json", action="store_true",
                         help="one JSON object per message and line (like postqueue -j)")

    show = commands.add_parser("show", help="show one message (like postcat -q)")
    show.add_argument("id", metavar="ID")
    show.add_argument("--body", action="store_true", help="print the message itself too")

    flush = commands.add_parser("flush", help="deliver queued messages now")
    flush.add_argument("ids", nargs="*", metavar="ID", help="only these (default: all)")
    for name, text in (("hold", "keep messages in the queue, undelivered"),
                       ("release", "release held messages for delivery now")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("ids", nargs="+", metavar="ID")

    delete = commands.add_parser(
        "delete", help="delete messages: ID... or ALL [deferred|active|hold|failed]"
    )
    delete.add_argument("ids", nargs="+", metavar="ID",
                        help="queue ids, or ALL (upper case) optionally followed by a queue")

    commands.add_parser("summary", help="counts by queue and age (like qshape)")
    for sub in commands.choices.values():
        socket_flags(sub, after=True)
    return queue


def socket_flags(parser: argparse.ArgumentParser, after: bool = False) -> None:
    """--control-socket and --config, before the sub-command or after it (`after`: a
    flag not given there must not undo one given before it)."""
    default: Any = argparse.SUPPRESS if after else None
    parser.add_argument("--control-socket", metavar="PATH", type=Path, default=default,
                        help="the relay's control socket (default: [control] socket of the "
                        "config, see config.toml)")
    parser.add_argument("--config", metavar="FILE", type=Path, default=default,
                        help="config file naming the control socket")


def run_queue(args: argparse.Namespace) -> int:
    """Run the chosen `queue` sub-command; returns the exit status."""
    return asyncio.run(run_queue_async(args))


async def run_queue_async(args: argparse.Namespace) -> int:
    command = _COMMANDS[args.queue_command]
    try:
        return await command(args, args.control_socket)
    except control.ControlUnavailable as exc:
        _error(str(exc))
        return EX_NOPERM if exc.permission else EX_UNAVAILABLE
    except _Usage as exc:
        _error(str(exc))
        return 2


class _Usage(Exception):
    pass


def _error(text: str, prog: str = PROG) -> None:
    print(f"{prog}: {text}", file=sys.stderr)


async def _call(path: Path, payload: dict[str, Any]) -> dict[str, Any]:
    answer = await control.request(path, payload)
    if not answer.get("ok") and not answer.get("missing"):
        raise control.ControlUnavailable(f"the relay refused: {answer.get('error')}")
    return answer


# -- list ------------------------------------------------------------------------------


async def queue_list(args: argparse.Namespace, path: Path) -> int:
    messages = (await _call(path, {"op": "list"}))["messages"]
    if args.json:
        for m in messages:
            print(json.dumps(postqueue_json(m), separators=(",", ":")))
    else:
        print(format_mailq(messages), end="")
    return 0


def format_mailq(messages: list[dict[str, Any]]) -> str:
    """The queue in postqueue -p layout."""
    if not messages:
        return "Mail queue is empty\n"
    blocks = []
    # Postfix's ids are 10 characters at most; ours are longer: widen the column.
    width = max(10, *(len(m["id"]) for m in messages))
    indent = " " * (width + 31)
    for m in messages:
        mark = _MARKS.get(m["state"], " ")
        arrival = time.asctime(time.localtime(m["arrival_time"]))[:20]
        lines = [f"{m['id']:<{width}}{mark}{m['size']:>8} {arrival:20.20} "
                 f"{m['sender'] or 'MAILER-DAEMON'}"]
        previous = None
        for r in _undelivered(m):
            # showq prints a reason once for consecutive recipients sharing it,
            # right-aligned to column 78.
            if r["reply"] and r["reply"] != previous:
                lines.append(f"{'':>{max(0, 76 - len(r['reply']))}}({r['reply']})")
            previous = r["reply"]
            lines.append(indent + r["address"])
        blocks.append("\n".join(lines) + "\n")
    total = sum(m["size"] for m in messages)
    count = len(messages)
    footer = f"-- {total // 1024} Kbytes in {count} Request{'' if count == 1 else 's'}.\n"
    header = f"{'-Queue ID-':<{width + 2}}" + _HEADER.removeprefix("-Queue ID-  ")
    return header + "\n" + "\n".join(blocks) + "\n" + footer


def _undelivered(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in message["recipients"] if r["state"] != "sent"]


def postqueue_json(m: dict[str, Any]) -> dict[str, Any]:
    """postqueue -j's fields (so its consumers work), plus the relay's own."""
    return {
        "queue_name": m["queue"],
        "queue_id": m["id"],
        "arrival_time": int(m["arrival_time"]),
        "message_size": m["size"],
        "sender": m["sender"],
        "recipients": [
            {"address": r["address"], "state": r["state"],
             **({"delay_reason": r["reply"]} if r["reply"] else {})}
            for r in _undelivered(m)
        ],
        "state": m["state"],
        "attempts": m["attempts"],
        "next_attempt": m["next_attempt"],
        "last_error": m["last_error"],
        "route": m["route"],
    }


# -- show ------------------------------------------------------------------------------


async def queue_show(args: argparse.Namespace, path: Path) -> int:
    answer = await _call(path, {"op": "show", "id": args.id, "body": args.body})
    if not answer["ok"]:
        _error(f"{args.id}: no such message")
        return 1
    print(format_show(answer["message"]), end="")
    if args.body:
        print(f"*** MESSAGE CONTENTS {args.id} ***")
        body = answer["body"]
        print(body, end="" if body.endswith("\n") else "\n")
        print("*** END OF MESSAGE ***")
    return 0


def format_show(m: dict[str, Any]) -> str:
    def when(t: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(t))

    lines = [
        f"queue id: {m['id']}",
        f"queue: {m['queue']}",
        f"arrival: {when(m['arrival_time'])}",
        f"size: {m['size']}",
        f"sender: <{m['sender']}>",
        f"client: {m['helo']}[{m['client_address']}] listener={m['listener']}"
        + (f" sasl_username={m['sasl_username']}" if m["sasl_username"] else ""),
        f"route: {m['route']}",
        f"attempts: {m['attempts']}",
    ]
    if m["state"] == "queued":
        lines.append(f"next attempt: {when(m['next_attempt'])}")
    if m["last_error"]:
        lines.append(f"last error: {m['last_error']}")
    for r in m["recipients"]:
        reply = f" ({r['reply']})" if r["reply"] else ""
        lines.append(f"recipient: <{r['address']}> {r['state']}{reply}")
    return "\n".join(lines) + "\n"


# -- changes ---------------------------------------------------------------------------


async def queue_flush(args: argparse.Namespace, path: Path) -> int:
    answer = await _call(path, {"op": "flush", "ids": args.ids})
    status = _report(answer, "Flushed", "not flushed")
    for line in answer.get("upstreams", []):
        print(line)
    return status


async def queue_hold(args: argparse.Namespace, path: Path) -> int:
    answer = await _call(path, {"op": "hold", "ids": args.ids})
    return _report(answer, "Placed on hold", "not placed on hold")


async def queue_release(args: argparse.Namespace, path: Path) -> int:
    answer = await _call(path, {"op": "release", "ids": args.ids})
    return _report(answer, "Released from hold", "not held")


async def queue_delete(args: argparse.Namespace, path: Path) -> int:
    ids: list[str] = args.ids
    if "ALL" in ids:
        # postsuper -d ALL [queue]: only upper-case ALL, and only as the first word.
        if ids[0] != "ALL" or len(ids) > 2 or (len(ids) == 2 and ids[1] not in QUEUE_STATES):
            raise _Usage("usage: delete ALL [" + "|".join(QUEUE_STATES) + "]")
        payload: dict[str, Any] = {"op": "delete", "all": True,
                                   "state": ids[1] if len(ids) == 2 else None}
    else:
        payload = {"op": "delete", "ids": ids}
    return _report(await _call(path, payload), "Deleted", "not deleted")


def _report(answer: dict[str, Any], done: str, not_done: str) -> int:
    count = len(answer.get("done", []))
    print(f"{done}: {count} message{'' if count == 1 else 's'}")
    for skipped in answer.get("skipped", []):
        _error(f"{skipped['id']}: {not_done} (message is {skipped['state']})")
    for queue_id in answer.get("missing", []):
        _error(f"{queue_id}: no such message")
    return 1 if answer.get("missing") else 0


# -- summary ---------------------------------------------------------------------------


async def queue_summary(args: argparse.Namespace, path: Path) -> int:
    print(format_summary(await _call(path, {"op": "summary"})), end="")
    return 0


def format_summary(s: dict[str, Any]) -> str:
    counts = ", ".join(f"{name} {s['counts'][name]}" for name in QUEUE_STATES)
    noun = "message" if s["total"] == 1 else "messages"
    lines = [f"{s['total']} {noun}, {s['size'] // 1024} Kbytes ({counts})", ""]
    rows = {"TOTAL": [sum(col) for col in zip(*s["routes"].values(), strict=True)]
            if s["routes"] else [0] * len(s["buckets"])}
    rows.update(s["routes"])
    width = max(len(name) for name in rows)
    lines.append(f"{'':<{width}} {'T':>5}" + "".join(f"{b:>6}" for b in s["buckets"]))
    for name, row in rows.items():
        lines.append(f"{name:<{width}} {sum(row):>5}" + "".join(f"{n:>6}" for n in row))
    lines.append(f"(age in minutes since arrival; last column older than "
                 f"{s['buckets'][-2]} minutes)")
    return "\n".join(lines) + "\n"


_COMMANDS: dict[str, Callable[[argparse.Namespace, Path], Awaitable[int]]] = {
    "list": queue_list,
    "show": queue_show,
    "flush": queue_flush,
    "hold": queue_hold,
    "release": queue_release,
    "delete": queue_delete,
    "summary": queue_summary,
}


# -- ready -----------------------------------------------------------------------------


def wait_ready(path: Path, timeout: float) -> int:
    """Poll the control socket until the relay answers (bounded by `timeout` seconds)."""

    async def poll() -> int:
        deadline = time.monotonic() + timeout
        problem = "no answer"
        while True:
            try:
                answer = await control.request(path, {"op": "summary"}, timeout=5.0)
            except control.ControlUnavailable as exc:
                if exc.permission:
                    _error(str(exc), "policy-relay ready")
                    return EX_NOPERM
                problem = str(exc)
            else:
                if answer.get("ok"):
                    return 0
                problem = str(answer.get("error"))
            if time.monotonic() >= deadline:
                _error(f"not ready after {timeout:g}s: {problem}", "policy-relay ready")
                return EX_UNAVAILABLE
            await asyncio.sleep(0.2)

    return asyncio.run(poll())


# -- limits -----------------------------------------------------------------------------


def add_limits_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add `limits show [NAME] [--key GLOB]`: bucket states of the running relay."""
    limits = subparsers.add_parser("limits", help="rate-limit buckets of a running relay")
    socket_flags(limits)
    commands = limits.add_subparsers(dest="limits_command", required=True, metavar="COMMAND")
    show = commands.add_parser("show", help="buckets that are not idle (local and Redis)")
    show.add_argument("name", nargs="?", metavar="NAME", help="only this limit")
    show.add_argument("--key", metavar="GLOB", help="only keys matching this glob")
    socket_flags(show, after=True)
    return limits


def run_limits(args: argparse.Namespace) -> int:
    async def show() -> int:
        payload = {"op": "limits", "name": args.name, "key": args.key}
        answer = await control.request(args.control_socket, payload)
        if not answer.get("ok"):
            _error(str(answer.get("error")), LIMITS_PROG)
            return 1
        buckets = answer["buckets"]
        if not buckets:
            print("all buckets idle")
            return 0
        width = max(len(b["key"]) for b in buckets)
        print(f"{'LIMIT':<20} {'KEY':<{width}} {'BACKEND':<8} {'REMAINING':>9} {'FULL IN':>9}")
        for b in buckets:
            print(f"{b['limit']:<20} {b['key']:<{width}} {b['backend']:<8} "
                  f"{b['remaining']:>9} {b['full_in']:>8.1f}s")
        return 0

    try:
        return asyncio.run(show())
    except control.ControlUnavailable as exc:
        _error(str(exc), LIMITS_PROG)
        return EX_NOPERM if exc.permission else EX_UNAVAILABLE
