"""The shipped systemd unit: systemd-analyze verify accepts it, and it says what we mean."""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "policy-relay.service"
INSTALLED = "/usr/local/bin/policy-relay"
ANALYZE = shutil.which("systemd-analyze") or (
    "/usr/bin/systemd-analyze" if Path("/usr/bin/systemd-analyze").exists() else None
)
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)"
)


def directives(text: str) -> dict[str, list[str]]:
    """Section.Key -> values, in order (systemd allows repeated keys such as ExecReload)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key}", []).append(value)
    return found


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)


def venv_binary() -> Path:
    binary = Path(sys.executable).parent / "policy-relay"
    assert binary.exists(), f"{binary} missing: pip install -e . first"
    return binary


@needs_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify refuses a unit whose ExecStart binary does not exist ("Command ... is not
    # executable"), so a copy points at this checkout's installed entry point instead.
    copy = tmp_path / "policy-relay.service"
    copy.write_text(UNIT.read_text().replace(INSTALLED, str(venv_binary())))
    result = verify(copy)
    assert result.returncode == 0, result.stderr
    assert "policy-relay.service" not in result.stderr, result.stderr


@needs_analyze
@pytest.mark.skipif(Path(INSTALLED).exists(), reason=f"{INSTALLED} is installed here")
def test_verify_rejects_the_unit_only_for_the_missing_binary(tmp_path: Path) -> None:
    copy = tmp_path / "policy-relay.service"
    shutil.copy(UNIT, copy)
    result = verify(copy)
    assert result.returncode != 0
    problems = [line for line in result.stderr.splitlines() if "policy-relay" in line]
    assert problems and all("is not executable" in line for line in problems), result.stderr


def test_unit_is_notify_with_checked_reload_and_no_restart_on_bad_config() -> None:
    unit = directives(UNIT.read_text())
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.NotifyAccess"] == ["main"]
    config = "--config /etc/policy-relay/config.toml"
    check = f"{INSTALLED} check {config}"
    assert unit["Service.ExecStartPre"] == [check]
    assert unit["Service.ExecStart"] == [f"{INSTALLED} serve {config}"]
    assert unit["Service.ExecReload"] == [check, "/bin/kill -HUP $MAINPID"]
    assert unit["Service.Restart"] == ["on-failure"]
    assert unit["Service.RestartPreventExitStatus"] == ["74 78"]
    assert "Service.WatchdogSec" not in unit
    assert "#WatchdogSec=30s" in UNIT.read_text()


def test_unit_runs_unprivileged_and_sandboxed() -> None:
    unit = directives(UNIT.read_text())
    assert unit["Service.User"] == unit["Service.Group"] == ["policy-relay"]
    assert unit["Service.ConfigurationDirectoryMode"] == ["0750"]
    for kind in ("StateDirectory", "RuntimeDirectory", "ConfigurationDirectory"):
        assert unit[f"Service.{kind}"] == ["policy-relay"]
    assert unit["Service.AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["Service.CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("PrivateDevices", "yes"), ("RestrictSUIDSGID", "yes"),
                       ("SystemCallFilter", "@system-service"),
                       ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX")):
        assert unit[f"Service.{key}"] == [value], key


# -- the system install -----------------------------------------------------------------


def test_system_install_into_a_temporary_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = subprocess.run([str(ROOT / "scripts" / "install"), "--system", "--root", str(root)],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert "systemctl daemon-reload && systemctl enable --now policy-relay" in result.stdout
    binary = root / "opt" / "policy-relay" / "bin" / "policy-relay"
    assert os.readlink(root / "usr" / "local" / "bin" / "policy-relay") == \
        "/opt/policy-relay/bin/policy-relay"
    etc = root / "etc" / "policy-relay"
    assert stat.S_IMODE(etc.stat().st_mode) == 0o750
    config = etc / "config.toml"
    assert 'policies_dir = "policies"' in config.read_text()
    assert (etc / "policies" / "10-relay.toml").exists()
    check = subprocess.run([str(binary), "check", "--config", str(config)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stderr
    assert check.stdout.splitlines()[1] == f"{etc / 'policies'}: ok (9 rules)"
    unit = root / "etc" / "systemd" / "system" / "policy-relay.service"
    assert unit.read_text() == UNIT.read_text()
    if ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # The installed unit, pointed at the installed binary inside the temporary root.
    copy = tmp_path / "policy-relay.service"
    copy.write_text(unit.read_text().replace(INSTALLED, str(binary)))
    verified = verify(copy)
    assert verified.returncode == 0, verified.stderr


# Drop to nobody:nogroup after the imports: this interpreter may live where nobody cannot
# read (a pyenv under /root, just what the unit's ProtectHome=yes hides).
AS_NOBODY = """
import os, sys
from relay.cli.main import main
import relay.runtime, relay.policy, tomllib
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
sys.exit(main(sys.argv[1:]))
"""


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI as an unprivileged user (nobody:nogroup), the way the unit runs it."""
    return subprocess.run(
        [sys.executable, "-c", AS_NOBODY, *argv],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd="/",
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run check as another user")
def test_check_fails_on_a_users_file_the_service_user_cannot_read() -> None:
    directory = Path(tempfile.mkdtemp(prefix="policy-relay-check-"))
    try:
        directory.chmod(0o755)
        etc = directory / "etc"
        etc.mkdir(mode=0o750)
        etc.chmod(0o750)
        os.chown(etc, 0, grp.getgrnam("nogroup").gr_gid)  # as /etc/policy-relay: root:group
        users = etc / "users"
        users.write_text("")
        users.chmod(0o600)  # root's own, as `passwd` used to write it
        config = etc / "config.toml"
        config.write_text(f'[listener.smtp]\naddress = "127.0.0.1:2525"\nauth = "optional"\n'
                          f'users_file = "{users}"\n')
        config.chmod(0o644)
        failed = as_nobody("check", "--config", str(config))
        assert failed.returncode == 78
        assert f"listener.smtp.users_file: cannot read {users}: Permission denied" \
            in failed.stderr
        # `passwd` gives the file to the directory's group: the service user reads it.
        written = subprocess.run(
            [sys.executable, "-m", "relay", "passwd", "--file", str(users), "alice"],
            input="secret\n", capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert written.returncode == 0, written.stderr
        fine = as_nobody("check", "--config", str(config))
        assert fine.returncode == 0, fine.stderr
    finally:
        shutil.rmtree(directory)
