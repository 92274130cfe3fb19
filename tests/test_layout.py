"""The package tree stays a tree: no import cycles, every policy field documented."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

from relay.policy.fields import FIELDS

PACKAGE = ROOT / "relay"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The relay modules `path` imports when it is loaded (not those only imported for
    type checking, nor inside functions, which run later)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: imports_of(path, modules) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*stack[stack.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_relay_imports_itself_back():
    graph = import_graph()
    assert "relay.policy.session" in graph["relay.inbound.handler"]  # the graph is real
    assert find_cycle(graph) is None


def test_every_policy_field_is_documented_in_the_readme_and_the_shipped_policy():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shipped = (ROOT / "policies" / "10-relay.toml").read_text(encoding="utf-8")
    for name in FIELDS:
        assert f"`{name}`" in readme, f"README.md does not document the field {name}"
        assert f"#   {name} " in shipped, f"policies/10-relay.toml does not explain {name}"


def test_only_the_adapter_reaches_into_aiosmtpd():
    """aiosmtpd's private API is used in relay/inbound/protocol.py alone; other modules
    import only its documented names."""
    documented = {"Envelope", "Session", "ProxyData"}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "protocol.py" and path.parent.name == "inbound":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiosmtpd"):
                names = {alias.name for alias in node.names}
                assert names <= documented, f"{path}: imports {names - documented}"


def test_the_adapter_refuses_an_untested_aiosmtpd():
    from relay.inbound.protocol import TESTED_AIOSMTPD, check_aiosmtpd_version

    check_aiosmtpd_version(TESTED_AIOSMTPD[-1])
    with pytest.raises(ImportError, match=r"tested with aiosmtpd 1\.4\.6, but aiosmtpd 1\.5\.0"):
        check_aiosmtpd_version("1.5.0")
