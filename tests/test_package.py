"""The package's shape: seven layers that import only downwards, no cycle, no tlkeras import hidden in
a function, no private name crossing modules, modules and functions of readable size, the README's
layout tree in step with the folders, and every name of the old flat modules still importable."""

from __future__ import annotations

import ast
import importlib
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tlkeras"
# Bottom to top: a module may import from its own layer and the ones before it.
LAYERS = ("models", "data", "fitting", "analysis", "exports", "serving", "workflows")
# Top-level modules below every layer (no tlkeras imports of their own) and above all of them.
BASE = ("_quiet", "_compat", "checks", "progress")
TOP = ("__init__", "cli")
MAX_MODULE_LINES = 600
MAX_FUNCTION_CODE_LINES = 80
MAX_TRAIN_SCRIPT_LINES = 150


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def rank(module: str) -> int:
    """The layer index of a tlkeras module: BASE -1, the layers 0-6, TOP (and the package) 7."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in TOP:
        return len(LAYERS)
    if parts[1] in BASE:
        return -1
    return LAYERS.index(parts[1])


def _resolve(node: ast.ImportFrom | ast.Import) -> set[str]:
    """The tlkeras modules an import statement names (``from tlkeras.data import x`` names
    ``tlkeras.data.x`` when that is a module, else the package ``tlkeras.data``)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.split(".")[0] == "tlkeras"}
    if not node.module or node.module.split(".")[0] != "tlkeras":
        return set()
    found = set()
    for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        found.add(sub if sub in MODULES else node.module)
    return found


def imports(module: str, *, inside_functions: bool | None = None) -> dict[str, list[int]]:
    """tlkeras modules imported by ``module`` -> line numbers (all imports, or only those inside /
    outside functions)."""
    tree = ast.parse(MODULES[module].read_text())
    in_function = {
        id(n)
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        for n in ast.walk(fn)
    }
    found: dict[str, list[int]] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if inside_functions is not None and (id(node) in in_function) != inside_functions:
            continue
        for target in _resolve(node) - {module}:
            found.setdefault(target, []).append(node.lineno)
    return found


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


def test_the_layer_ranks():
    assert rank("tlkeras._quiet") < rank("tlkeras.models.blocks") < rank("tlkeras.data.sources")
    assert rank("tlkeras.serving") < rank("tlkeras.workflows.sweep") < rank("tlkeras.cli")
    assert rank("tlkeras") == rank("tlkeras.cli")


def test_at_least_five_layers_and_a_handful_of_top_level_modules():
    assert all((PACKAGE / layer / "__init__.py").is_file() for layer in LAYERS)
    assert sorted(p.stem for p in PACKAGE.glob("*.py")) == sorted(BASE + TOP)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    upward = {
        target: lines
        for target, lines in imports(module).items()
        if rank(target) > rank(module) or (rank(module) == -1 and rank(target) == -1)
    }
    assert not upward, f"{module} imports a layer above it: {upward}"


def test_no_import_cycle():
    graph = {m: set(imports(m)) for m in MODULES if m != "tlkeras"}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_tlkeras_module_imported_inside_a_function(module):
    """Every tlkeras module imports TensorFlow through tlkeras/__init__ anyway, so an import inside a
    function hides nothing but a dependency (and, before, a cycle)."""
    hidden = imports(module, inside_functions=True)
    assert not hidden, f"{module}: {hidden}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=module_name)
def test_no_private_name_crosses_modules(path):
    tree = ast.parse(path.read_text())
    crossing = [
        f"line {node.lineno}: {alias.name} from {node.module}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tlkeras")
        for alias in node.names
        if alias.name.startswith("_") and alias.name not in ("_quiet", "_compat")
    ]
    # module._name on an imported tlkeras module
    bound = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tlkeras")
        for alias in node.names
        if f"{node.module}.{alias.name}" in MODULES
    }
    crossing += [
        f"line {node.lineno}: {node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in bound
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
    ]
    assert not crossing, f"{path.name}: {crossing}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=module_name)
def test_modules_and_functions_stay_readable(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: over {MAX_MODULE_LINES} lines"
    long = []
    for fn in ast.walk(ast.parse(text)):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        body = fn.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring does not count
        if body and (n := fn.end_lineno - body[0].lineno + 1) > MAX_FUNCTION_CODE_LINES:
            long.append(f"{fn.name} ({n} lines)")
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_CODE_LINES} code lines: {long}"


def test_the_train_script_stays_thin():
    lines = len((REPO / "scripts" / "train.py").read_text().splitlines())
    assert lines <= MAX_TRAIN_SCRIPT_LINES


def layout_tree() -> str:
    """The README's layout block, from each layer's docstring (its first line)."""
    lines = ["tlkeras/"]
    for layer in LAYERS:
        doc = importlib.import_module(f"tlkeras.{layer}").__doc__.strip().splitlines()[0]
        name, _, what = doc.partition(": ")
        assert name == layer, f"tlkeras/{layer}/__init__.py's docstring starts with {name!r}"
        lines.append(f"  {layer + '/':<11} {what}")
    return "\n".join(lines)


def test_the_readme_layout_is_the_package():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- layout -->\n```text\n(.*?)```", readme, re.S)
    assert block, "README.md has no '<!-- layout -->' block"
    assert block.group(1).rstrip("\n") == layout_tree(), (
        "README.md's layout differs from the package; paste:\n" + layout_tree()
    )


OLD_NAMES = json.loads((Path(__file__).parent / "fixtures" / "legacy" / "names.json").read_text())


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_every_name_of_the_flat_modules_still_imports(old):
    module = importlib.import_module("tlkeras" if old == "__init__" else f"tlkeras.{old}")
    missing = [name for name in OLD_NAMES[old] if not hasattr(module, name)]
    assert not missing, f"tlkeras.{old} lost {missing}"


def test_an_old_module_name_never_replaces_a_public_function():
    import tlkeras

    old_blocks = importlib.import_module("tlkeras.blocks")  # the flat module's name: a view
    assert callable(tlkeras.blocks) and tlkeras.blocks.__module__ == "tlkeras.models.blocks"
    assert old_blocks.resolve_block_index is tlkeras.models.blocks.resolve_block_index


def test_ci_runs_the_readme_test_command_then_the_slow_tier():
    readme = (REPO / "README.md").read_text()
    command = re.search(r'pip install -e "\.\[test\]" && (python -m pytest[^\n]*)', readme).group(1)
    ci = [
        line.replace("python3 ", "python ")
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if "-m pytest" in line and not line.lstrip().startswith("#")
    ]
    assert ci == [command, command.replace('-m "not slow"', "-m slow")]


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_docstring_names_every_module_in_it(layer):
    doc = importlib.import_module(f"tlkeras.{layer}").__doc__
    modules = sorted(p.stem for p in (PACKAGE / layer).glob("*.py") if p.stem != "__init__")
    missing = [m for m in modules if f"``{m}``" not in doc]
    assert not missing, f"tlkeras/{layer}/__init__.py's docstring does not name {missing}"
