"""`policy-relay dkim keygen` and `dkim check` against a real DNS server."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import run_cli
from dnsserver import dnsmasq, split_txt


def keygen(directory: Path, selector: str, kind: str) -> str:
    result = run_cli("dkim", "keygen", "--domain", "example.test", "--selector", selector,
                     "--type", kind, "--key-directory", str(directory))
    assert result.returncode == 0, result.stderr
    key = directory / "example.test" / f"{selector}.key"
    assert key.stat().st_mode & 0o777 == 0o640  # the group of its directory may read
    assert key.stat().st_gid == key.parent.stat().st_gid
    assert f"wrote {key}" in result.stdout
    record = result.stdout.splitlines()[-1]
    assert record.startswith(f"{selector}._domainkey.example.test. IN TXT ( ")
    # The value as published: the quoted 255-octet strings joined.
    return "".join(re.findall(r'"([^"]*)"', record))


def config(tmp_path: Path, port: int, keys: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[dns]\nnameservers = ["127.0.0.1:{port}"]\ntimeout = "1s"\n\n'
        f'[dkim]\nkey_directory = "{keys}"\n'
    )
    return path


def test_keygen_then_check_matches_the_published_keys(tmp_path: Path):
    keys = tmp_path / "keys"
    rsa = keygen(keys, "rsa2026", "rsa")
    ed = keygen(keys, "ed2026", "ed25519")
    assert len(rsa) > 255  # a 2048-bit key needs several TXT strings
    with dnsmasq({"rsa2026._domainkey.example.test": split_txt(rsa),
                  "ed2026._domainkey.example.test": ed}) as server:
        result = run_cli("dkim", "check", "--config", str(config(tmp_path, server.port, keys)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok   ed2026._domainkey.example.test: public key matches" in result.stdout
    assert "ok   rsa2026._domainkey.example.test: public key matches" in result.stdout


def test_check_reports_a_key_missing_from_dns(tmp_path: Path):
    keys = tmp_path / "keys"
    keygen(keys, "new", "ed25519")
    with dnsmasq({"other._domainkey.example.test": "v=DKIM1; p="}) as server:
        result = run_cli("dkim", "check", "--config", str(config(tmp_path, server.port, keys)))
    assert result.returncode == 1
    assert "FAIL new._domainkey.example.test: no TXT record published" in result.stdout


def test_keygen_refuses_to_overwrite_a_key(tmp_path: Path):
    keygen(tmp_path, "s1", "ed25519")
    again = run_cli("dkim", "keygen", "--domain", "example.test", "--selector", "s1",
                    "--key-directory", str(tmp_path))
    assert again.returncode == 1
    assert "exists; choose a new selector" in again.stderr
