"""The service's shape: no import circles among its modules, and routes get what they use from deps."""

from __future__ import annotations

import ast
from pathlib import Path

import service

ROOT = Path(service.__file__).parent


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("service", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The service modules ``tree`` imports, at any level (``from service.routes import web`` counts web)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found & known


def test_no_import_circles():
    modules = _modules()
    graph = {name: _imports(tree, set(modules)) - {name} for name, tree in modules.items()}
    cycles, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert len(graph) > 15 and not cycles, cycles


def test_routes_do_not_read_app_state():
    routes = sorted((ROOT / "routes").glob("*.py"))
    assert len(routes) >= 5
    offenders = [p.name for p in routes if "app.state" in p.read_text(encoding="utf-8")]
    assert not offenders, f"{offenders} read app.state; take ServicesDep / SettingsDep from service.deps"
