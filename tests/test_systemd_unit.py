"""The shipped systemd unit: systemd-analyze verify accepts it, and it says what we mean."""

from __future__ import annotations

import shutil
import subprocess
import sys
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
    assert unit["Service.DynamicUser"] == ["yes"]
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
