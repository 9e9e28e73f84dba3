"""The package's shape: no import cycle among tlkeras modules, no tlkeras import hidden in a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tlkeras"


def _tlkeras_imports(node: ast.AST, module: str) -> set[str]:
    """The tlkeras modules that the import statements directly under ``node`` name."""
    names: set[str] = set()
    for stmt in ast.iter_child_nodes(node):
        if isinstance(stmt, ast.Import):
            names |= {a.name for a in stmt.names if a.name.startswith("tlkeras.")}
        elif isinstance(stmt, ast.ImportFrom) and stmt.module:
            if stmt.module == "tlkeras":  # from tlkeras import data, weights as w
                names |= {f"tlkeras.{a.name}" for a in stmt.names}
            elif stmt.module.startswith("tlkeras."):
                names.add(stmt.module)
    known = {f"tlkeras.{p.stem}" for p in PACKAGE.glob("*.py")}
    return (names & known) - {module}


def module_graph() -> dict[str, set[str]]:
    return {
        f"tlkeras.{p.stem}": _tlkeras_imports(ast.parse(p.read_text()), f"tlkeras.{p.stem}")
        for p in sorted(PACKAGE.glob("*.py"))
        if p.stem != "__init__"
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, …, a]``, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_among_module_level_imports():
    cycle = find_cycle(module_graph())
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_no_tlkeras_module_imported_inside_a_function(path):
    """Every tlkeras module imports TensorFlow through tlkeras/__init__ anyway, so an import inside a
    function hides nothing but a dependency (and, before, a cycle)."""
    module = f"tlkeras.{path.stem}"
    hidden = [
        f"line {fn.lineno}: {sorted(found)}"
        for fn in ast.walk(ast.parse(path.read_text()))
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        for found in [set().union(*(_tlkeras_imports(n, module) for n in ast.walk(fn)))]
        if found
    ]
    assert not hidden, f"{path.name}: {hidden}"
