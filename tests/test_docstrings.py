"""Every ``>>>`` example in the package's docstrings runs and prints what it says, and the public
API's docstrings follow one convention (Google style: Args, Returns, an example call).

Examples that need files, a network or minutes of compute are written as ``Example::`` blocks
(prose for the reader), not as ``>>>`` prompts, so every prompt left is one that is checked here.
"""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import inspect
import re
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


# The public API's docstrings follow one convention, Google style (as timm and torchvision):
# a summary line, then ``Args:`` naming every parameter (``Attributes:`` for a dataclass's fields),
# ``Returns:`` for a function that returns something, and an example call (``Example:`` or ``>>>``).
SECTION = re.compile(r"^(\w[\w ]*):\s*$", re.M)


def _sections(doc):
    """{section title: its indented body} of a Google-style docstring."""
    found = {}
    marks = list(SECTION.finditer(doc))
    for mark, nxt in zip(marks, marks[1:] + [None]):
        found[mark.group(1)] = doc[mark.end():nxt.start() if nxt else len(doc)]
    return found


def _documented_names(body):
    return set(re.findall(r"^ {4}(\*{0,2}\w+)(?: \([^)]*\))?:", body, re.M))


def _parameters(obj):
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return []
    if all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return []  # a class without an __init__ of its own: nothing to document
    star = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [star.get(p.kind, "") + p.name for p in params]


def convention_problems(obj):
    """What keeps ``obj``'s docstring from the convention (an empty list when it follows it)."""
    doc = inspect.getdoc(obj) or ""
    if not doc.strip():
        return ["no docstring"]
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return []
    problems = []
    sections = _sections(doc)
    params = _parameters(obj)
    if params:
        title = "Attributes" if dataclasses.is_dataclass(obj) and "Attributes" in sections else "Args"
        if title not in sections:
            problems.append("no Args: section")
        else:
            missing = [p for p in params if p not in _documented_names(sections[title])]
            if missing:
                problems.append(f"{title}: does not name {missing}")
    if not inspect.isclass(obj):
        annotation = inspect.signature(obj).return_annotation
        if annotation not in (None, "None", inspect.Signature.empty) and "Returns" not in sections:
            problems.append("no Returns: section")
    if "Example" not in sections and "Examples" not in sections and ">>>" not in doc:
        problems.append("no example call")
    return problems


def test_public_api_docstrings_follow_the_convention():
    import densenet_zoo

    problems = {name: convention_problems(getattr(densenet_zoo, name)) for name in densenet_zoo.__all__}
    assert {name: p for name, p in problems.items() if p} == {}


def test_the_convention_check_finds_what_is_missing():
    def undocumented(a, *, b=1, **kwargs) -> int:
        """Summary only."""

    def documented(a, *, b=1, **kwargs) -> int:
        """Summary.

        Args:
            a: one.
            b (int): two.
            **kwargs: the rest.

        Returns:
            A number.

        Example:
            >>> documented(1)
        """

    def half(a, b) -> None:
        """Summary.

        Args:
            a: one.

        Example:
            half(1, 2)
        """

    assert convention_problems(undocumented) == ["no Args: section", "no Returns: section", "no example call"]
    assert convention_problems(documented) == []
    assert convention_problems(half) == ["Args: does not name ['b']"]
