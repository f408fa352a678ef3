"""The README's commands are the ones CI and the Makefile run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands():
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


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


def test_layout_section_names_every_subpackage_and_module():
    layout = re.search(r"## Layout\n(.*?)(\n## |\Z)", (ROOT / "README.md").read_text(), re.S).group(1)
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


def test_every_test_file_the_readme_names_exists():
    named = set(re.findall(r"tests/[a-z_/]*test_[a-z_]+\.py", (ROOT / "README.md").read_text()))
    assert named and [n for n in sorted(named) if not (ROOT / n).is_file()] == []


def test_every_source_file_the_readme_names_exists():
    named = set(re.findall(r"densenet_zoo/[a-z_/]*\.py", (ROOT / "README.md").read_text()))
    assert [n for n in sorted(named) if not (ROOT / n).is_file()] == []
