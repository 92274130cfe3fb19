"""`policy-relay config dump`: the effective settings, secrets redacted (like postconf)."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from pathlib import Path
from typing import Any

from relay.config import Settings

# Field names whose values must never be printed: they hold secrets read from files.
SECRET_FIELDS = frozenset({"password", "private_key"})
REDACTED = "<redacted>"


def plain(value: Any) -> Any:
    """Settings as JSON-friendly data, with every secret replaced by "<redacted>"."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: REDACTED if f.name in SECRET_FIELDS else plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
        }
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network | Path):
        return str(value)
    if isinstance(value, bytes):
        return REDACTED
    return value


def flatten(data: Any, prefix: str = "") -> list[str]:
    """postconf-style "dotted.key = value" lines."""
    if isinstance(data, dict):
        lines = []
        for key, item in data.items():
            lines += flatten(item, f"{prefix}.{key}" if prefix else key)
        return lines
    return [f"{prefix} = {json.dumps(data)}"]


def dump(settings: Settings, as_json: bool) -> str:
    data = plain(settings)
    # The inbound limits are [server] keys, shown beside the other [server] settings.
    data.update(data.pop("inbound"))
    data["spool_path"] = str(settings.spool_path)
    data["control_socket_path"] = str(settings.ops.control_socket_path)
    if as_json:
        return json.dumps(data, indent=2, sort_keys=True) + "\n"
    return "\n".join(flatten(data)) + "\n"
