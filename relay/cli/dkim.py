"""The `policy-relay dkim` commands: make a signing key, check what DNS publishes."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from relay.checks import dkim
from relay.checks.dns import Resolver
from relay.runtime import Runtime
from relay.secretfile import make_private_directory, share_with_directory_group

# RFC 1035 section 3.3.14: one character-string in a TXT record holds at most 255 octets.
_TXT_CHUNK = 255


def add_dkim_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("dkim", help="DKIM signing keys")
    sub = parser.add_subparsers(dest="dkim_command", required=True, metavar="COMMAND")
    keygen = sub.add_parser("keygen", help="write a new key and print its DNS record")
    keygen.add_argument("--domain", required=True)
    keygen.add_argument("--selector", required=True)
    keygen.add_argument("--type", choices=("rsa", "ed25519"), default="rsa")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    keygen.add_argument("--key-directory", type=Path, metavar="DIR", default=Path("."),
                        help="the [dkim] key_directory (default: .)")
    check = sub.add_parser("check", help="compare each configured key with the key in DNS")
    check.add_argument("--config", metavar="FILE", type=Path,
                       help="config file (default: the embedded defaults)")


def txt_record(domain: str, selector: str, value: str) -> str:
    """The zone-file line to publish, split into 255-octet strings."""
    chunks = [value[i : i + _TXT_CHUNK] for i in range(0, len(value), _TXT_CHUNK)]
    quoted = " ".join(f'"{chunk}"' for chunk in chunks)
    return f"{selector}._domainkey.{domain}. IN TXT ( {quoted} )"


def keygen(args: argparse.Namespace) -> int:
    directory: Path = args.key_directory
    domain = args.domain.lower().rstrip(".")
    path = directory / domain / f"{args.selector}.key"
    if path.exists():
        print(f"policy-relay dkim keygen: {path}: exists; choose a new selector to rotate "
              "keys", file=sys.stderr)
        return 1
    pem, value = dkim.generate_key(args.type, args.bits)
    make_private_directory(path.parent)
    # The private key is readable by its owner only from the moment it exists, then by
    # the service's group too (relay/secretfile.py), before any byte of it is written.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        share_with_directory_group(out.fileno(), path.parent)
        out.write(pem)
    print(f"wrote {path}")
    print("publish this record, then run `policy-relay dkim check`:")
    print(txt_record(domain, args.selector, value))
    return 0


def check(loaded: Runtime) -> int:
    keys = loaded.settings.checks.dkim_keys
    if not keys:
        print("no DKIM signing keys configured ([dkim] key_directory or [[dkim.key]])")
        return 1

    async def run() -> list[tuple[bool, str]]:
        resolver = Resolver(loaded.settings.checks.dns)
        return [await dkim.check_published_key(resolver, key) for key in keys]

    results = asyncio.run(run())
    for ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {detail}")
    return 0 if all(ok for ok, _ in results) else 1


