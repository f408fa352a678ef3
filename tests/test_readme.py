"""The README and docs/ say what the project does: their commands are the ones CI and the Makefile
run, their python snippets run, their links and the files they name exist.

Convention: every fenced ```python block of README.md and docs/*.md runs, in order, one fresh
process per page (blocks of a page share one namespace), in an empty folder, offline. A block whose
fence reads ```python no-run is prose for the reader (it downloads weights or needs your data).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.S | re.M)
# Paths of the repository a page may name (in backticks or prose); `*` is a glob.
NAMED_PATH = re.compile(r"(?<![\w./-])((?:densenet_zoo|tests|benchmarks|examples|weights|docs)/[\w./*-]*[\w*])")


def _rel(page):
    return page.relative_to(ROOT).as_posix()


def _readme_commands():
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def _python_blocks(page):
    """(first line number, source) of each runnable python block of a page."""
    text = page.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        info = m.group(1).split()
        if info[:1] == ["python"] and "no-run" not in info[1:]:
            blocks.append((text.count("\n", 0, m.start(2)) + 1, m.group(2)))
    return blocks


def _prose(page):
    """The page without its fenced blocks (commands in them name files a user creates)."""
    return FENCE.sub("", page.read_text())


def test_readme_has_exactly_two_commands():
    assert _readme_commands() == ["make run", "make test"]


def test_ci_runs_the_readme_test_command():
    ci = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert _readme_commands()[1] in ci


def test_makefile_targets_create_the_environment():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("run", "test"):
        recipe = re.search(rf"^{target}: (.*)$", makefile, re.M).group(1)
        assert "install" in recipe
    assert "-m venv" in makefile and "pip install" in makefile


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_layout_section_names_every_subpackage_and_module():
    layout = re.search(r"## Layout\n(.*?)(\n## |\Z)", (ROOT / "docs" / "architecture.md").read_text(), re.S).group(1)
    package = ROOT / "densenet_zoo"
    missing = []
    for sub in sorted(p for p in package.iterdir() if (p / "__init__.py").is_file()):
        block = re.search(rf"^  {sub.name}/(.*?)(?=^  \S|^\S)", layout, re.S | re.M)
        if block is None:
            missing.append(f"{sub.name}/")
            continue
        missing += [f"{sub.name}/{m.name}" for m in sorted(sub.glob("*.py"))
                    if m.name != "__init__.py" and m.name not in block.group(1)]
    missing += [m.name for m in package.glob("*.py") if m.name not in ("__init__.py", "__main__.py") and m.name not in layout]
    assert missing == []


def _anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_points_at_a_file_and_heading(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", FENCE.sub("", dest.read_text()), re.M)
            if anchor not in {_anchor(h) for h in headings}:
                broken.append(target)
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_repository_path_a_page_names_exists(page):
    named = set(NAMED_PATH.findall(page.read_text()))
    missing = [n for n in sorted(named) if not list(ROOT.glob(n))]
    assert missing == []


def test_the_path_check_sees_the_files_the_docs_name():
    named = set().union(*(NAMED_PATH.findall(p.read_text()) for p in PAGES))
    assert {"examples/main_job.py", "benchmarks/memory.py", "densenet_zoo/memory/fused_block.py",
            "tests/models/test_model.py"} <= named
    assert "weights/manifest.json" in NAMED_PATH.findall("see `weights/manifest.json`.")


def test_the_docs_pages_the_readme_promises_exist():
    for name in ("memory", "benchmarks", "weights", "finetuning", "inference", "normalisation", "architecture"):
        assert f"(docs/{name}.md)" in (ROOT / "README.md").read_text(), name
    inference = (ROOT / "docs" / "inference.md").read_text()
    assert "\n## int8\n" in inference and "\n## Which precision on which CPU\n" in inference


def test_fences_are_read_as_the_convention_says(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("```python\na = 1\n```\n\n```python no-run\nb = 2\n```\n\n```bash\nc\n```\n")
    assert _python_blocks(page) == [(2, "a = 1\n")]


RUNNABLE = [p for p in PAGES if _python_blocks(p)]


def test_the_readme_and_most_pages_carry_runnable_snippets():
    assert ROOT / "README.md" in RUNNABLE and len(RUNNABLE) >= 6


@pytest.mark.timeout(300)
@pytest.mark.parametrize("page", RUNNABLE, ids=_rel)
def test_python_snippets_run(page, tmp_path):
    # Each block keeps its own line numbers in a traceback: padded with blank lines to its place.
    script = ["import os, sys", "_ns = {'__name__': '__main__'}"]
    for line, source in _python_blocks(page):
        script.append(f"exec(compile({chr(10) * (line - 1) + source!r}, {_rel(page)!r}, 'exec'), _ns)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               DENSENET_ZOO_OFFLINE="1", HF_HUB_OFFLINE="1", DENSENET_ZOO_CACHE=str(tmp_path / "cache"),
               DENSENET_ZOO_ALLOCATOR="default", MPLBACKEND="Agg")
    run = subprocess.run([sys.executable, "-c", "\n".join(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
