"""The users file for SMTP AUTH: one "name:$scrypt$..." line per user, salted scrypt hashes."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from pathlib import Path

from relay.secretfile import share_with_directory_group

# scrypt cost: N = 2**15, r = 8, p = 1 needs 32 MiB and some 50-100 ms per check
# (RFC 7914 section 2; the interactive-login figures of the scrypt paper).
LOG_N = 15
BLOCK_SIZE = 8
PARALLELISM = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
_HASH = re.compile(
    r"^\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)$"
)
_USER = re.compile(r"^[^\x00-\x20\x7f:]{1,255}$")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: bytes, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    n = 1 << log_n
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=_KEY_BYTES,
                          maxmem=2 * 128 * r * n * p + 1024 * 1024)


def hash_password(password: str, log_n: int = LOG_N, r: int = BLOCK_SIZE,
                  p: int = PARALLELISM) -> str:
    """The users-file form of `password`: "$scrypt$ln=15,r=8,p=1$<salt>$<key>"."""
    salt = secrets.token_bytes(_SALT_BYTES)
    key = _scrypt(password.encode("utf-8"), salt, log_n, r, p)
    return f"$scrypt$ln={log_n},r={r},p={p}${_b64(salt)}${_b64(key)}"


def matches(encoded: str, password: bytes) -> bool:
    m = _HASH.match(encoded)
    if m is None:
        return False
    log_n, r, p = (int(x) for x in m.group(1, 2, 3))
    if not (1 <= log_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
        return False
    key = _scrypt(password, _unb64(m.group(4)), log_n, r, p)
    return hmac.compare_digest(key, _unb64(m.group(5)))


# Each check holds a 32 MiB scrypt buffer for 50-100 ms; a relay runs at most this many
# at once and the others wait their turn, so a burst of AUTH attempts (wrong passwords
# included) cannot take memory without bound.
MAX_CONCURRENT_CHECKS = 2


class CheckGate:
    """Runs password checks off the event loop, at most `limit` at a time."""

    def __init__(self, limit: int = MAX_CONCURRENT_CHECKS) -> None:
        self.limit = limit
        self._slots = asyncio.Semaphore(limit)
        self.running = 0
        self.peak = 0  # the most checks that ever ran at once

    def __repr__(self) -> str:
        return f"<CheckGate running={self.running}/{self.limit} peak={self.peak}>"

    async def check(self, path: str | Path, login: bytes, password: bytes) -> bool:
        async with self._slots:
            self.running += 1
            self.peak = max(self.peak, self.running)
            try:
                return await asyncio.to_thread(check, path, login, password)
            finally:
                self.running -= 1


@functools.cache
def _dummy() -> str:
    # Checked against when the user does not exist, so that the answer takes as long.
    return hash_password(secrets.token_hex(8))


def valid_username(name: str) -> bool:
    return bool(_USER.match(name))


def read_users(path: str | Path) -> dict[str, str]:
    """name -> encoded hash; blank lines and "#" comments are skipped. Raises OSError."""
    users = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, encoded = line.partition(":")
            users[name] = encoded
    return users


def check(path: str | Path, login: bytes, password: bytes) -> bool:
    """True if `login` is in the users file with this password. Slow on purpose: run it
    off the event loop. Raises OSError when the file cannot be read."""
    users = read_users(path)
    try:
        name = login.decode("utf-8")
    except UnicodeDecodeError:
        name = ""
    encoded = users.get(name) if valid_username(name) else None
    ok = matches(encoded or _dummy(), password)
    return ok and encoded is not None


def set_password(path: str | Path, name: str, password: str) -> None:
    """Add or replace one user's entry; the file is replaced atomically, mode 0640 with
    its directory's group (0600 where that group cannot be given)."""
    if not valid_username(name):
        raise ValueError(f"invalid user name {name!r}: no spaces, colons or control characters")
    target = Path(path)
    lines = []
    if target.exists():
        lines = [
            line for line in target.read_text(encoding="utf-8").splitlines()
            if line.strip().partition(":")[0] != name or line.strip().startswith("#")
        ]
    lines.append(f"{name}:{hash_password(password)}")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            # Readable by the service's group (relay/secretfile.py), before any byte.
            share_with_directory_group(out.fileno(), target.parent)
            out.write("\n".join(lines) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def passwd_command(config_path: Path | None, users_file: str | None, name: str) -> int:
    """`policy-relay passwd USER`: read a password (twice from a terminal, else one line
    of stdin) and write USER's entry; returns the exit status."""
    import getpass
    import sys

    from relay import config

    if users_file is None:
        try:
            settings = config.load(config_path)
        except config.ConfigError as exc:
            print("\n".join(exc.messages), file=sys.stderr)
            return 78
        files = sorted({lst.users_file for lst in settings.listeners if lst.users_file})
        if len(files) != 1:
            print("policy-relay passwd: no single users_file among the configured listeners; "
                  "pass --file", file=sys.stderr)
            return 64
        users_file = files[0]
    if not valid_username(name):
        print(f"policy-relay passwd: invalid user name {name!r}", file=sys.stderr)
        return 64
    if sys.stdin.isatty():
        password = getpass.getpass(f"New password for {name}: ")
        if getpass.getpass("Again: ") != password:
            print("policy-relay passwd: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("policy-relay passwd: empty password", file=sys.stderr)
        return 1
    try:
        set_password(users_file, name, password)
    except OSError as exc:
        print(f"policy-relay passwd: {users_file}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"{users_file}: password set for {name}")
    return 0
