"""Every ``>>>`` example in the package's docstrings runs and prints what it says.

Examples that need files, a network or minutes of compute are written as ``Example::`` blocks
(prose for the reader), not as ``>>>`` prompts, so every prompt left is one that is checked here.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "densenet_zoo"


def _module_names():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__main__.py" or ">>>" not in path.read_text():
            continue
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = list(_module_names())


def test_some_examples_run():
    assert MODULES, "no module carries a runnable example"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name, globs=vars(module).copy()):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0
    assert results.failed == 0
