"""The indexer's import graph: no circles, and the read path (``index``) apart from search and the jobs."""

from __future__ import annotations

import ast
from pathlib import Path

import indexer

PACKAGE = Path(indexer.__file__).parent


def imports_of(path: Path) -> set[str]:
    """The ``indexer.*`` modules a file imports anywhere (top level, in functions, under TYPE_CHECKING)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            if node.module == "indexer":  # from indexer import builder, sources
                out |= {f"indexer.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("indexer.") and (PACKAGE / f"{m.split('.', 1)[1]}.py").is_file()}


def graph() -> dict[str, set[str]]:
    return {f"indexer.{p.stem}": imports_of(p) for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle found by a depth-first walk (each reported once from where it closes)."""
    found, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(g.get(m, ())):
            if state.get(n) == "open":
                found.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in g:
        if m not in state:
            visit(m, [m])
    return found


def test_cycles_are_found_in_a_made_up_graph():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_indexer_has_no_import_circles():
    assert cycles(graph()) == []


def test_search_and_the_jobs_share_the_read_path_not_each_other():
    g = graph()
    assert "indexer.index" in g["indexer.search"] and "indexer.index" in g["indexer.builder"]
    assert "indexer.builder" not in g["indexer.search"] and "indexer.search" not in g["indexer.builder"]
    assert not g["indexer.index"] & {"indexer.search", "indexer.builder", "indexer.pipeline", "indexer.cli"}
