"""Rules the test suite keeps so that its results do not depend on the order tests run in."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_test_module_sets_torch_threads_at_import():
    """``torch.set_num_threads`` at module level changes every test collected after it (the ``one_thread``
    fixture of conftest.py sets and restores it); code that runs in a child process is not affected."""
    modules = sorted(p for p in TESTS.rglob("*.py") if p.name.startswith("test_") or p.name == "conftest.py")
    imported = {a.name if isinstance(n, ast.Import) else n.module for m in modules
                for n in ast.walk(ast.parse(m.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [n])}
    helpers = [p for p in TESTS.glob("_*.py") if p.stem in imported]  # scripts run as children are not imported
    assert helpers, "the helper modules the tests import"
    offenders = []
    for path in modules + helpers:
        tree = ast.parse(path.read_text())
        for node in tree.body:  # statements that run at import
            for call in ast.walk(node):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    break
                if isinstance(call, ast.Call) and ast.unparse(call.func).endswith("set_num_threads"):
                    offenders.append(f"{path.relative_to(TESTS)}:{call.lineno}")
    assert offenders == [], "use the one_thread fixture instead"


def test_the_makefile_reruns_the_numerics_tests_capped_at_avx2():
    makefile = (TESTS.parent / "Makefile").read_text()
    assert "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2" in makefile
    assert "TORCHINDUCTOR_CACHE_DIR=$$cache $(AVX2_CAP) $(PY) -m pytest -q -m numerics" in makefile
