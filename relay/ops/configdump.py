"""`policy-relay config dump`: the effective config.toml, secrets redacted (like postconf).

The output is TOML in config.toml's own keys and units, so it can be pasted back: the
defaults are the shipped config.toml (a test keeps it equal to the built-in defaults)
with the operator's file laid over it. `changed` keeps only what differs from the
defaults, like `postconf -n`.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path
from typing import Any

# In a wheel the shipped config.toml is packaged here (pyproject force-include); in a
# source checkout it is the repository's own.
_PACKAGED = Path(__file__).parent.parent / "defaults" / "config.toml"
_CHECKOUT = Path(__file__).parent.parent.parent / "config.toml"
# Tables of named entries: an entry's defaults are those of the shipped entry, without
# the keys that name what the entry is.
_NAMED = {"listener": ("smtp", ("address",)), "upstream": ("default", ("hosts",))}
REDACTED = "<redacted>"
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")

Document = dict[str, Any]


def defaults_document() -> Document:
    path = _PACKAGED if _PACKAGED.is_file() else _CHECKOUT
    return tomllib.loads(path.read_text(encoding="utf-8"))


def effective(user: Document, defaults: Document) -> Document:
    """The operator's document laid over the defaults, as the loader reads it."""
    out = copy.deepcopy(defaults)
    for key, value in user.items():
        if key in _NAMED and isinstance(value, dict):
            template = _template(defaults, key)
            out[key] = {name: _merge(copy.deepcopy(template), entry)
                        for name, entry in value.items()}
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def changed(document: Document, defaults: Document) -> Document:
    """Only the keys whose value differs from the default (postconf -n)."""
    out: Document = {}
    for key, value in document.items():
        if key in _NAMED and isinstance(value, dict):
            if value != defaults.get(key):
                template = _template(defaults, key)
                identity = _NAMED[key][1]
                out[key] = {entry_name: {k: v for k, v in entry.items()
                                         if k in identity or template.get(k) != v}
                            for entry_name, entry in value.items()}
        elif isinstance(value, dict) and isinstance(defaults.get(key), dict):
            inner = changed(value, defaults[key])
            if inner:
                out[key] = inner
        elif defaults.get(key, object()) != value:
            out[key] = value
    return out


def redact(document: Any, key: str = "") -> Any:
    """Secrets written into the file itself (not *_file paths) never leave it."""
    if isinstance(document, dict):
        return {k: redact(v, k) for k, v in document.items()}
    if isinstance(document, list):
        return [redact(v, key) for v in document]
    if isinstance(document, str) and document:
        if "password" in key and not key.endswith("_file"):
            return REDACTED
        if key.endswith("_url") or key == "url":
            # redis://user:secret@host -> redis://user:<redacted>@host (also a sink's url)
            return re.sub(r"(//[^:/@]*:)[^@/]*@", rf"\1{REDACTED}@", document)
    return document


def _template(defaults: Document, table: str) -> Document:
    name, identity = _NAMED[table]
    entry = defaults.get(table, {}).get(name, {})
    return {k: v for k, v in entry.items() if k not in identity}


def _merge(base: Document, over: Document) -> Document:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


# -- TOML out ---------------------------------------------------------------------------


def to_toml(document: Document) -> str:
    """TOML for the subset config.toml uses: tables, arrays of tables, scalars, arrays."""
    lines: list[str] = []
    _table(document, [], lines)
    text = "\n".join(lines).strip("\n")
    return text + "\n" if text else ""


def _table(table: Document, path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not _is_table(v) and not _is_table_array(v)}
    if path and (scalars or not table):
        lines += ["", f"[{'.'.join(map(_key, path))}]"]
    lines += [f"{_key(k)} = {_value(v)}" for k, v in scalars.items()]
    for key, value in table.items():
        if _is_table(value):
            _table(value, [*path, key], lines)
        elif _is_table_array(value):
            for item in value:
                lines += ["", f"[[{'.'.join(map(_key, [*path, key]))}]]"]
                lines += [f"{_key(k)} = {_value(v)}" for k, v in item.items()]


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string (same escapes for what JSON emits).
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dump(user: Document, *, only_changed: bool = False, as_json: bool = False) -> str:
    defaults = defaults_document()
    document = effective(user, defaults)
    if only_changed:
        document = changed(document, defaults)
    document = redact(document)
    if as_json:
        return json.dumps(document, indent=2) + "\n"
    return to_toml(document)
