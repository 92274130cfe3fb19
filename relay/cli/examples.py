"""One example per command, shown at the end of its --help."""

from __future__ import annotations

import argparse

EXAMPLES = {
    "serve": "policy-relay serve --config /etc/policy-relay/config.toml\n"
             "  policy-relay serve --upstream smtp.example.net:587 --allow 10.0.0.0/8",
    "check": "policy-relay check --config /etc/policy-relay/config.toml",
    "test": "policy-relay test --client-address 10.20.0.5 --from app@example.com "
            "--to you@example.org",
    "queue": "policy-relay queue list --control-socket /run/policy-relay/control.sock",
    "queue list": "policy-relay queue list --json | head -1",
    "queue show": "policy-relay queue show 0006614C6DFDCBE --body",
    "queue flush": "policy-relay queue flush",
    "queue hold": "policy-relay queue hold 0006614C6DFDCBE",
    "queue release": "policy-relay queue release 0006614C6DFDCBE",
    "queue delete": "policy-relay queue delete ALL deferred",
    "queue summary": "policy-relay queue summary",
    "limits": "policy-relay limits show per_app_server --key '10.20.*'",
    "limits show": "policy-relay limits show per_app_server --key '10.20.*'",
    "ready": "policy-relay ready --timeout 120 && swaks --server 127.0.0.1:2525 "
             "--to you@example.org",
    "passwd": "policy-relay passwd --config /etc/policy-relay/config.toml alice",
    "dkim": "policy-relay dkim keygen --domain example.com --selector r2026 "
            "--key-directory /etc/policy-relay/dkim",
    "dkim keygen": "policy-relay dkim keygen --domain example.com --selector r2026 "
                   "--type ed25519 --key-directory /etc/policy-relay/dkim",
    "dkim check": "policy-relay dkim check --config /etc/policy-relay/config.toml",
    "config": "policy-relay config dump --changed --config /etc/policy-relay/config.toml",
    "suppress": "policy-relay suppress list --config /etc/policy-relay/config.toml",
    "suppress list": "policy-relay suppress list --json",
    "suppress add": "policy-relay suppress add nobody@example.org --reason 'asked by app'",
    "suppress remove": "policy-relay suppress remove user@example.org",
    "suppress import": "policy-relay suppress import addresses.txt",
    "suppress export": "policy-relay suppress export > suppressed.jsonl",
    "trace": "policy-relay trace '<20261130.1234@app.example.com>'",
    "config dump": "policy-relay config dump --changed --config /etc/policy-relay/config.toml",
}


def add_examples(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Give every command under `parser` its example as the --help epilog."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                command = f"{path} {name}".strip()
                if command in EXAMPLES:
                    sub.epilog = f"example:\n  {EXAMPLES[command]}"
                    sub.formatter_class = argparse.RawDescriptionHelpFormatter
                add_examples(sub, command)
