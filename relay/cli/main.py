"""The `policy-relay` command: serve, check, test, and the operator's tools."""

from __future__ import annotations

import argparse
import os
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from relay import __version__, config, runtime
from relay.cli import dkim as dkimcli
from relay.cli.dkim import add_dkim_parser
from relay.cli.events import add_event_parsers
from relay.cli.examples import add_examples
from relay.cli.queue import (
    add_limits_parser,
    add_queue_parser,
    run_limits,
    run_queue,
    socket_flags,
    wait_ready,
)
from relay.cli.spool import add_spool_parser, run_spool
from relay.ops.configdump import dump
from relay.ops.logs import setup_logging

EX_CONFIG = 78  # sysexits.h: configuration error; systemd's RestartPreventExitStatus
EX_USAGE = 64


EX_PIPE = 141  # what a shell reports for a command killed by SIGPIPE (128 + 13)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policy-relay", description="SMTP relay proxy with policy filtering."
    )
    parser.add_argument("--version", action="version", version=f"policy-relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the relay")
    _config_flags(serve)
    serve.add_argument("--listen", action="append", default=[], metavar="ADDR:PORT",
                       help="listen here instead of the configured listeners (repeatable)")
    serve.add_argument("--upstream", metavar="HOST:PORT",
                       help="deliver through this smarthost (the default upstream group)")
    serve.add_argument("--spool-dir", metavar="DIR", help="keep the queue here")
    serve.add_argument("--hostname", metavar="NAME", help="name in the banner and Received:")
    serve.add_argument("--allow", action="append", default=[], metavar="CIDR",
                       help="client network allowed to relay, @relay_networks (repeatable)")
    serve.add_argument("--metrics", metavar="ADDR:PORT",
                       help='serve /metrics, /healthz, /readyz here ("" = off)')
    serve.add_argument("--control-socket", metavar="PATH",
                       help="the socket `policy-relay queue` talks to")
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check", help="validate config and policies, then exit")
    _config_flags(check)
    check.set_defaults(run=_check)

    test = commands.add_parser(
        "test", help="show what the policy decides for an envelope; nothing is sent",
        description="Walk an envelope through connect, helo, mail, rcpt and data like "
        "exim -bh. Exit status: 0 accepted, 4 tempfail, 5 reject.",
    )
    _config_flags(test)
    test.add_argument("--client-address", metavar="IP", default="127.0.0.1")
    test.add_argument("--helo", default="localhost", metavar="NAME")
    test.add_argument("--auth-user", default="", metavar="USER", help="as if logged in")
    test.add_argument("--from", dest="sender", default=None, metavar="ADDRESS",
                      help='envelope sender; "<>" for the null sender')
    test.add_argument("--to", dest="recipients", action="append", default=[],
                      metavar="ADDRESS", help="recipient (repeatable)")
    test.add_argument("--message", type=Path, metavar="FILE", help="message for DATA rules")
    test.add_argument("--listener", default="smtp", metavar="NAME")
    test.add_argument("--tls", action="store_true", help="as if the session used TLS")
    test.add_argument("--smtputf8", action="store_true",
                      help="send MAIL with SMTPUTF8 (RFC 6531), for non-ASCII addresses")
    test.add_argument("--spf", default="none", metavar="RESULT", help="SPF result to assume")
    test.add_argument("--dkim", default="none", metavar="RESULT", help="DKIM result to assume")
    test.add_argument("--spf-helo", default="none", metavar="RESULT",
                      help="SPF result of the HELO name to assume")
    test.add_argument("--dmarc", default="none", metavar="RESULT",
                      help="DMARC result to assume")
    test.add_argument("--dmarc-policy", default="", metavar="POLICY",
                      help="DMARC policy to assume (none, quarantine, reject)")
    test.add_argument("--dmarc-outbound", default="none", metavar="RESULT",
                      help="predicted outbound DMARC result to assume")
    test.add_argument("--over-limit", action="append", default=[], metavar="LIMIT",
                      help="treat this limit as exceeded (repeatable)")
    test.add_argument("--suppressed", action="append", default=[], metavar="ADDRESS",
                      help="treat this recipient as on the suppression list (repeatable)")
    test.add_argument("--live-checks", action="store_true",
                      help="run the relay's own checks: SPF and DKIM over the configured "
                      "resolver, limits in fresh in-memory buckets, the real suppression "
                      "list (instead of --spf, --dkim, --over-limit and --suppressed)")
    test.add_argument("--json", action="store_true",
                      help="print each command and its reply as one JSON object")
    test.add_argument("--cases", type=Path, metavar="FILE",
                      help="run the [[case]] tables of this TOML file instead")
    test.set_defaults(run=_test)

    add_spool_parser(commands)
    commands.choices["spool"].set_defaults(run=run_spool)
    add_dkim_parser(commands)
    commands.choices["dkim"].set_defaults(run=_dkim)
    add_queue_parser(commands).set_defaults(run=_queue)
    add_limits_parser(commands).set_defaults(run=_limits)
    add_event_parsers(commands)

    ready = commands.add_parser(
        "ready", help="wait until the running relay serves (for scripts)",
        description="Exit 0 as soon as the relay answers on its control socket (with "
        "workers, every worker listens); 69 if it does not within --timeout seconds.",
    )
    socket_flags(ready)
    ready.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                       help="how long to wait (default 60)")
    ready.set_defaults(run=_ready)

    passwd = commands.add_parser(
        "passwd", help="set a user's AUTH password in the users file",
        description="Reads the password twice from a terminal, or one line from stdin.",
    )
    passwd.add_argument("--config", metavar="FILE", type=Path,
                        help="find the users file as the listeners' users_file")
    passwd.add_argument("--file", metavar="PATH", help="the users file to write")
    passwd.add_argument("user")
    passwd.set_defaults(run=_passwd)

    dump = commands.add_parser("config", help="show the effective configuration")
    dump_commands = dump.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    dump_parser = dump_commands.add_parser("dump", help="print every setting, secrets redacted")
    _config_flags(dump_parser)
    dump_parser.add_argument("--json", action="store_true", help="as one JSON object")
    dump_parser.add_argument("--changed", action="store_true",
                             help="only what differs from the defaults (like postconf -n)")
    dump_parser.set_defaults(run=_config_dump)
    add_examples(parser)
    return parser


def _config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", type=Path,
                        help="config file (default: the embedded defaults)")
    parser.add_argument("--policies", metavar="DIR", help="read policies/*.toml from here")


def _overrides(args: argparse.Namespace) -> config.Overrides:
    return config.Overrides(
        listen=tuple(getattr(args, "listen", ())),
        upstream=getattr(args, "upstream", None),
        spool_dir=getattr(args, "spool_dir", None),
        policies_dir=args.policies,
        hostname=getattr(args, "hostname", None),
        allow=tuple(getattr(args, "allow", ())),
        metrics=getattr(args, "metrics", None),
        control_socket=getattr(args, "control_socket", None),
    )


def _load(args: argparse.Namespace) -> runtime.Runtime | None:
    try:
        loaded = runtime.load(args.config, _overrides(args))
    except config.ConfigError as exc:
        for line in exc.messages:
            print(line, file=sys.stderr)
        return None
    for warning in loaded.policy.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return loaded


def _serve(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return EX_CONFIG
    setup_logging(loaded.settings.log_level, loaded.settings.log_format)
    from relay.app import serve

    return serve(loaded, lambda: runtime.load(args.config, _overrides(args)))


def _check(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return EX_CONFIG
    print(f"{loaded.settings.source}: ok")
    print(f"{loaded.policies_dir}: ok ({len(loaded.policy.rules)} rules)")
    return 0


def _test(args: argparse.Namespace) -> int:
    from relay.policy import StaticChecks
    from relay.policy.dryrun import Client, run_cases, run_dry

    loaded = _load(args)
    if loaded is None:
        return EX_CONFIG
    if args.cases is not None:
        text, status = run_cases(loaded, args.cases)
        print(text, end="")
        return status
    if args.sender is None or not args.recipients:
        print("policy-relay test: --from and at least one --to are required "
              "(or --cases FILE)", file=sys.stderr)
        return EX_USAGE
    client = Client(
        args.client_address, args.sender, tuple(args.recipients), helo=args.helo,
        listener=args.listener, auth_user=args.auth_user, tls=args.tls,
        smtputf8=args.smtputf8,
        message=args.message.read_bytes() if args.message else None,
    )
    checks = StaticChecks(spf=args.spf, dkim=(args.dkim, ""),
                          over_limits=frozenset(args.over_limit), spf_helo=args.spf_helo,
                          dmarc=(args.dmarc, args.dmarc_policy),
                          dmarc_outbound=args.dmarc_outbound,
                          suppressed=dict.fromkeys(args.suppressed, _today()))
    outcome = run_dry(loaded, client, checks, live=args.live_checks)
    print(outcome.json() if args.json else outcome.text, end="\n" if args.json else "")
    return outcome.exit_status


def _today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def _config_dump(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return EX_CONFIG
    user: dict[str, Any] = {}
    if args.config is not None:
        user = tomllib.loads(Path(args.config).read_text(encoding="utf-8"))
    server = user.setdefault("server", {})
    if args.policies is not None or server.get("policies_dir"):
        # Absolute, so that the dump loads the same policies wherever it is pasted.
        server["policies_dir"] = str(loaded.policies_dir.resolve())
    if not server:
        del user["server"]
    print(dump(user, only_changed=args.changed, as_json=args.json), end="")
    return 0


def _passwd(args: argparse.Namespace) -> int:
    from relay.inbound.users import passwd_command

    return passwd_command(args.config, args.file, args.user)


def _find_control_socket(args: argparse.Namespace) -> bool:
    """Fill in --control-socket from the config; False (reported) if it won't load."""
    if args.control_socket is None:
        try:
            settings = config.load(args.config)
        except config.ConfigError as exc:
            for line in exc.messages:
                print(line, file=sys.stderr)
            return False
        args.control_socket = settings.ops.control_socket_path
    return True


def _queue(args: argparse.Namespace) -> int:
    return run_queue(args) if _find_control_socket(args) else EX_CONFIG


def _limits(args: argparse.Namespace) -> int:
    return run_limits(args) if _find_control_socket(args) else EX_CONFIG


def _ready(args: argparse.Namespace) -> int:
    if not _find_control_socket(args):
        return EX_CONFIG
    return wait_ready(args.control_socket, args.timeout)


def _dkim(args: argparse.Namespace) -> int:
    if args.dkim_command == "keygen":
        return dkimcli.keygen(args)
    args.policies = None
    loaded = _load(args)
    return EX_CONFIG if loaded is None else dkimcli.check(loaded)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        status = run(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return status
    except BrokenPipeError:
        # The reader went away (`| head -1`): stop quietly, as cat does. Point stdout at
        # /dev/null so the interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EX_PIPE
