"""The `policy-relay` command: serve, check, and the operator's tools."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from relay import __version__, config

EX_CONFIG = 78  # sysexits.h: configuration error; systemd's RestartPreventExitStatus


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policy-relay", description="SMTP relay proxy with policy filtering."
    )
    parser.add_argument("--version", action="version", version=f"policy-relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the relay")
    _config_flag(serve)
    serve.add_argument("--listen", action="append", default=[], metavar="ADDR:PORT",
                       help="listen here instead of the configured listeners (repeatable)")
    serve.add_argument("--upstream", metavar="HOST:PORT",
                       help="deliver through this smarthost (the default upstream group)")
    serve.add_argument("--spool-dir", metavar="DIR", help="keep the queue here")
    serve.add_argument("--policies", metavar="DIR", help="read policies/*.toml from here")
    serve.add_argument("--hostname", metavar="NAME", help="name in the banner and Received:")
    serve.add_argument("--allow", action="append", default=[], metavar="CIDR",
                       help="client network allowed to relay (repeatable)")

    check = commands.add_parser("check", help="validate the configuration and exit")
    _config_flag(check)
    return parser


def _config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", type=Path,
                        help="config file (default: the embedded defaults)")


def _overrides(args: argparse.Namespace) -> config.Overrides:
    return config.Overrides(
        listen=tuple(args.listen),
        upstream=args.upstream,
        spool_dir=args.spool_dir,
        policies_dir=args.policies,
        hostname=args.hostname,
        allow=tuple(args.allow),
    )


def setup_logging(level: str) -> None:
    # Under journald the journal stamps each line itself.
    fmt = "%(name)s: %(message)s"
    if "JOURNAL_STREAM" not in os.environ:
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)
    # aiosmtpd logs every command at INFO; our own lines carry what an operator needs.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, logging.getLogger().level))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = _overrides(args) if args.command == "serve" else config.Overrides()
    try:
        settings = config.load(args.config, overrides)
    except config.ConfigError as exc:
        for line in exc.messages:
            print(line, file=sys.stderr)
        return EX_CONFIG
    if args.command == "check":
        print(f"{settings.source}: ok")
        return 0
    setup_logging(settings.log_level)
    from relay.app import serve

    serve(settings, args.config, overrides)
    return 0
