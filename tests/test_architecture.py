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
LAYERS = ["_utils", "hardware", "allocator", "norms", "memory", "data", "weights", "models", "train", "profiling", "infer", "cli"]
LAYER_OF = {name: i for i, name in enumerate(LAYERS)}
#: train and profiling are siblings: neither imports the other.
SIBLINGS = {frozenset({"train", "profiling"})}
#: Dependencies a module may need that the package does not require.
OPTIONAL = {"triton"}


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
        try:
            imported = importlib.import_module(module)
        except ModuleNotFoundError as exc:  # the Triton kernels' source, where Triton is not installed
            assert exc.name in OPTIONAL, exc
            continue
        if getattr(importlib.import_module(parent), leaf) is not imported:
            hidden.append(module)
    assert hidden == []


# --- Startup: the command line parses, and the package imports, without loading the heavy libraries. ---------------
# Each check runs in a fresh interpreter: in this one, other tests have long imported torch and timm.

import json
import os
import subprocess
import sys

ROOT = PACKAGE.parent
HEAVY = ("torch", "torchvision", "timm", "numpy")


def _fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter (this checkout first on the path); it prints one JSON line, returned."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


_RUN_CLI = """
import contextlib, io, json, sys
from densenet_zoo.cli import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        code = main({argv!r})
    except SystemExit as stop:
        code = stop.code
print(json.dumps(dict(code=code, out=out.getvalue(), err=err.getvalue(), heavy=[m for m in {heavy!r} if m in sys.modules])))
"""


@pytest.mark.parametrize("argv, code, says", [
    (["--help"], 0, "usage: densenet-zoo"),
    (["finetune", "--help"], 0, "--memory-efficient"),
    (["--version"], 0, "densenet-zoo "),
    (["--no-such-flag"], 1, "unrecognized arguments: --no-such-flag"),
    (["finetune", "--epochs", "ten"], 1, "invalid int value: 'ten'"),
    (["weights"], 1, "the following arguments are required"),
    ([], 1, "give a command"),
], ids=["help", "command-help", "version", "unknown-flag", "bad-value", "missing-action", "no-command"])
def test_the_cli_answers_before_importing_torch(argv, code, says):
    r = _fresh(_RUN_CLI.format(argv=argv, heavy=HEAVY))
    assert r["code"] == code and says in r["out"] + r["err"], r
    assert r["heavy"] == [], f"densenet-zoo {' '.join(argv)} imported {r['heavy']}"


def test_version_is_the_package_version():
    import densenet_zoo

    r = _fresh(_RUN_CLI.format(argv=["--version"], heavy=HEAVY))
    assert r["out"].strip() == f"densenet-zoo {densenet_zoo.__version__}"


def test_python_m_help_imports_no_torch():
    # The real entry point, through runpy and __main__.py: -X importtime lists every module it imported.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "densenet_zoo", "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert r.returncode == 0 and "usage: densenet-zoo" in r.stdout
    assert "densenet_zoo.cli.app" in imported and imported.isdisjoint(HEAVY)


def test_import_densenet_zoo_loads_neither_timm_nor_torchvision():
    r = _fresh(f"import json, sys, densenet_zoo; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert r == []


def test_a_network_loads_the_compiler_only_for_the_strategy_that_needs_it():
    # torch._dynamo costs a second or two in a process: building networks with any strategy and running
    # them for inference does not load it; 'auto', which hands its measuring to eager mode under
    # torch.compile, does when a network takes it. (Training loads it anyway, through torch's own
    # checkpoint and optimizers.)
    r = _fresh("""
import json, sys, torch, densenet_zoo as dz
seen = {}
for mode in dz.list_memory_strategies():
    if mode == "auto":
        continue
    model = dz.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, small_inputs=True, memory_efficient=mode)
    with torch.no_grad():
        model.eval()(torch.randn(2, 3, 16, 16))
    seen[mode] = "torch._dynamo" in sys.modules
model.set_memory_efficient("auto")
seen["auto"] = "torch._dynamo" in sys.modules
print(json.dumps(seen))
""")
    assert r.pop("auto") is True and len(r) >= 8 and not any(r.values()), r


def test_every_exported_name_loads_on_first_use():
    code = """
import importlib, json, pkgutil, densenet_zoo
missing = {}
for pkg in ["densenet_zoo"] + [f"densenet_zoo.{m.name}" for m in pkgutil.iter_modules(densenet_zoo.__path__) if m.ispkg]:
    module = importlib.import_module(pkg)
    names = getattr(module, "__all__", [])
    space = {}
    exec(f"from {pkg} import *", space)  # a fresh lookup of every name in __all__
    missing[pkg] = sorted(set(names) - set(space)) + sorted(set(names) - set(dir(module)))
print(json.dumps(dict(missing=missing, unknown=hasattr(densenet_zoo, "no_such_name"),
                      create=densenet_zoo.create_model is importlib.import_module("densenet_zoo.models.factory").create_model)))
"""
    r = _fresh(code)
    assert all(names == [] for names in r["missing"].values()) and len(r["missing"]) >= 9, r["missing"]
    assert r["unknown"] is False and r["create"] is True


_TIMM_NAMES = """
import densenet_zoo as dz
print(json.dumps(dict(
    models=timm.list_models("dz_*"), ours=["dz_" + n for n in dz.list_models()],
    tags=timm.list_pretrained("dz_densenet121*"), weights=["dz_" + n for n in dz.list_weights("densenet121*")],
    built=type(timm.create_model("dz_densenet_bc_100", num_classes=3)).__module__,
    loader=type(timm.__spec__.loader).__name__ if timm.__loader__ is timm.__spec__.loader else "differs",
)))
"""


@pytest.mark.parametrize("first", [
    "import densenet_zoo; assert 'timm' not in sys.modules; import timm",  # registered right after timm's import
    "import timm; import densenet_zoo",                                     # registered at once
    "import densenet_zoo.models.timm_adapter; import timm",                 # the adapter imports timm itself
    "import densenet_zoo; from timm.models import create_model; import timm",
], ids=["dz-then-timm", "timm-then-dz", "adapter-first", "timm-submodule-first"])
def test_dz_models_enter_timms_registry_whichever_is_imported_first(first):
    r = _fresh(f"import json, sys\n{first}\n{_TIMM_NAMES}")
    assert r["models"] == sorted(r["ours"]) and len(r["models"]) >= 8
    assert sorted(r["tags"]) == sorted(r["weights"]) and r["tags"]
    assert r["built"] == "densenet_zoo.models.densenet"
    assert r["loader"] == "SourceFileLoader"  # timm keeps its own loader, not the watcher's wrapper


def test_torch_hub_loads_from_a_fresh_interpreter():
    code = f"""
import json, sys, torch
model = torch.hub.load({str(ROOT)!r}, "densenet_bc_100", source="local", num_classes=3, block_config=(2, 2, 2))
print(json.dumps(dict(kind=type(model).__module__, classes=model.num_classes)))
"""
    assert _fresh(code) == {"kind": "densenet_zoo.models.densenet", "classes": 3}


# ---------------------------------------------------------------------------------------------
# No shims: names are imported from where they are defined, and no private name crosses a package
# ---------------------------------------------------------------------------------------------


def _package_imports(module: str, path: Path, mods: Dict[str, Path], *, type_only: bool = True):
    """``(node, target module, imported name)`` for every ``from <package module> import name`` in ``module``
    (with ``type_only=False``, not those inside ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    skip = set() if type_only else _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or id(node) in skip:
            continue
        if node.level:
            base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            target = ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target in mods:
            for alias in node.names:
                if f"{target}.{alias.name}" not in mods:  # a name, not a submodule
                    yield node, target, alias


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports_across_packages() -> List[str]:
    """``module: name from target`` where a private name crosses from one subpackage into another."""
    mods = _modules()
    found = []
    for module, path in mods.items():
        for _, target, alias in _package_imports(module, path, mods):
            if _is_private(alias.name) and _layer(target) != _layer(module):
                found.append(f"{module}: {alias.name} from {target}")
    return found


def _used_names(tree: ast.AST) -> Set[str]:
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return used | {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}


def _declared_all(tree: ast.Module) -> Set[str]:
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in stmt.targets):
            return {elt.value for elt in getattr(stmt.value, "elts", []) if isinstance(elt, ast.Constant)}
    return set()


def reexports() -> List[str]:
    """Modules (package ``__init__`` files aside) that hold names defined elsewhere only to hand them on.

    A re-export is a name imported from a package module that the module never uses, or that it lists
    in ``__all__``; a module whose body is only imports (and ``__all__``) is a shim as a whole.
    """
    mods = _modules()
    found = []
    for module, path in mods.items():
        if path.name in ("__init__.py", "__main__.py"):
            continue
        tree = ast.parse(path.read_text())
        body = [s for s in tree.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        if body and all(isinstance(s, (ast.Import, ast.ImportFrom)) or s in _all_assigns(tree) for s in body):
            found.append(f"{module}: only imports")
            continue
        used, exported = _used_names(tree), _declared_all(tree)
        for _, target, alias in _package_imports(module, path, mods, type_only=False):  # those serve annotations
            bound = alias.asname or alias.name
            if bound not in used or bound in exported:
                found.append(f"{module}: {bound} from {target}")
    return found


def _all_assigns(tree: ast.Module) -> List[ast.stmt]:
    return [s for s in tree.body if isinstance(s, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in s.targets)]


def test_no_private_name_crosses_a_subpackage():
    assert private_imports_across_packages() == []


def test_no_module_re_exports():
    assert reexports() == []


def test_the_shim_checks_would_find_a_shim(tmp_path, monkeypatch):
    # The two checks above pass vacuously if they read nothing: plant a shim and a private import and see them found.
    pkg = tmp_path / "densenet_zoo"
    for sub in ("models", "infer"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "models" / "net.py").write_text("class _Layer:\n    pass\n\n\ndef build():\n    return _Layer()\n")
    (pkg / "infer" / "shim.py").write_text('"""A shim."""\nfrom ..models.net import build\n\n__all__ = ["build"]\n')
    (pkg / "infer" / "user.py").write_text("from ..models.net import _Layer, build\n\n\ndef f():\n    return _Layer, build\n")
    (pkg / "infer" / "passer.py").write_text("from ..models.net import build\n\n\ndef g():\n    return 1\n")
    monkeypatch.setitem(globals(), "PACKAGE", pkg)
    assert private_imports_across_packages() == ["densenet_zoo.infer.user: _Layer from densenet_zoo.models.net"]
    assert sorted(reexports()) == ["densenet_zoo.infer.passer: build from densenet_zoo.models.net",
                                   "densenet_zoo.infer.shim: only imports"]
