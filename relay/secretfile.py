"""Files that hold secrets (users file, DKIM keys): readable by the service, nobody else.

A secret is written owner-only, then given the group of its directory and made readable
by that group (0640). The system install (scripts/install --system) makes
/etc/policy-relay root:policy-relay 0750 and the unit runs the relay as group
policy-relay, so a file root writes there with `policy-relay passwd` or `dkim keygen`
is readable by the service and by nobody else. Where the group cannot be given (a user
writing into a directory of a group it is not in), the file stays 0600.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def share_with_directory_group(fd: int, directory: Path) -> None:
    """Make the open file `fd` 0640 with the group of `directory`, or leave it 0600."""
    os.fchmod(fd, 0o600)
    gid = os.stat(directory).st_gid
    if os.fstat(fd).st_gid != gid:
        try:
            os.fchown(fd, -1, gid)
        except PermissionError:
            return
    os.fchmod(fd, 0o640)


def make_private_directory(path: Path) -> None:
    """mkdir -p with 0750 and the group of the nearest existing parent for new levels."""
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    gid = os.stat(probe).st_gid
    for directory in reversed(missing):
        directory.mkdir(mode=0o750)
        os.chmod(directory, 0o750)  # mkdir's mode is filtered by the umask
        with contextlib.suppress(PermissionError):
            os.chown(directory, -1, gid)
