"""The package's shape: its import graph has no cycle and points down the layering, modules stay small.

The graph is read from the source (``ast``), with imports inside functions counted as much as those at
the top of a module, so a cycle cannot hide behind a deferred import.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "densenet_zoo"

#: Bottom to top. A module may import from its own layer or a lower one, never from a higher one.
LAYERS = ["_utils", "hardware", "allocator", "norms", "memory", "weights", "models", "train", "profiling", "infer", "cli"]
LAYER_OF = {name: i for i, name in enumerate(LAYERS)}
#: train and profiling are siblings: neither imports the other.
SIBLINGS = {frozenset({"train", "profiling"})}


def _modules() -> Dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _resolve(module: str, is_package: bool, node: ast.ImportFrom, mods: Dict[str, Path]) -> List[str]:
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = []
    for alias in node.names:
        if f"{target}.{alias.name}" in mods:
            found.append(f"{target}.{alias.name}")
        elif target in mods:
            found.append(target)
    return found


def _type_checking_nodes(tree: ast.AST) -> Set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids.update(id(sub) for stmt in node.body for sub in ast.walk(stmt))
    return ids


def import_graph() -> Dict[str, Set[str]]:
    """module -> package modules it imports (anywhere in the file; ``TYPE_CHECKING`` blocks excluded)."""
    mods = _modules()
    graph: Dict[str, Set[str]] = {}
    for module, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        deps: Set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                deps.update(_resolve(module, path.name == "__init__.py", node, mods))
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
        graph[module] = deps - {module}
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_sees_deferred_imports():
    # A cycle closed by an import inside a function must show: check the reader on a known edge.
    graph = import_graph()
    assert "densenet_zoo.models.densenet" in graph["densenet_zoo.models.factory"]
    assert "densenet_zoo.memory.base" in graph["densenet_zoo.memory.recompute"]


def test_no_import_cycles():
    # Package __init__ files only re-export what lies below them; a cycle through one is still a cycle.
    graph = import_graph()
    assert _cycles(graph) == []


def test_a_cycle_would_be_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_point_down_the_layers():
    wrong = []
    for module, deps in import_graph().items():
        here = _layer(module)
        if here not in LAYER_OF:
            continue  # the package's own __init__ / __main__: the public face re-exports everything
        for dep in deps:
            there = _layer(dep)
            if there not in LAYER_OF:
                wrong.append(f"{module} -> {dep} (the top-level package)")
            elif LAYER_OF[there] > LAYER_OF[here] or frozenset({here, there}) in SIBLINGS:
                wrong.append(f"{module} -> {dep}")
    assert wrong == []


def test_every_subpackage_is_a_layer():
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert subpackages <= set(LAYERS)
    assert (PACKAGE / "_utils.py").is_file()


def _docstring_lines(tree):
    """Line numbers of every docstring: the Args/Returns the convention asks for are not code to split."""
    lines = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(n):
            lines.update(range(n.body[0].lineno, n.body[0].end_lineno + 1))
    return lines


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    source = path.read_text()
    tree = ast.parse(source)
    docs = _docstring_lines(tree)
    assert source.count("\n") - len(docs) <= 400, f"{path.name}: split it by idea"
    long = []
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            size = n.end_lineno - n.lineno + 1 - len(docs & set(range(n.lineno, n.end_lineno + 1)))
            if size > 60:
                long.append(f"{n.name} ({size} lines)")
    assert long == []


def test_the_size_check_counts_code_not_docstrings():
    body = "".join(f"    x{i} = {i}\n" for i in range(59))
    docstring = '    """Summary.\n\n' + "    Args:\n" * 30 + '    """\n'
    tree = ast.parse(f"def f():\n{docstring}{body}    return x0\n")
    function = tree.body[0]
    size = function.end_lineno - function.lineno + 1 - len(_docstring_lines(tree))
    assert size == 61  # def, 59 assignments, return: one over the limit, whatever the docstring's length


def test_no_package_attribute_hides_a_module():
    # ``import densenet_zoo.x.y as m`` must give the module y, not a function that a package re-exports as y.
    import importlib

    hidden = []
    for module in sorted(_modules()):
        if module.count(".") < 1 or module.endswith("__main__"):
            continue
        parent, _, leaf = module.rpartition(".")
        imported = importlib.import_module(module)
        if getattr(importlib.import_module(parent), leaf) is not imported:
            hidden.append(module)
    assert hidden == []
