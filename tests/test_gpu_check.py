"""benchmarks/gpu_check.sh stays runnable: it parses, its test file exists, and every mode it asks for resolves."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from densenet_zoo.profiling.runner import resolve_modes

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_parses_and_runs_no_part_without_a_gpu(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    done = subprocess.run(["bash", str(SCRIPT)], cwd=SCRIPT.parents[1], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PARTS": "none"}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["env.txt"]


def test_every_mode_and_file_the_script_names_exists():
    text = SCRIPT.read_text()
    assert (SCRIPT.parents[1] / "tests/memory/test_memory_cuda.py").is_file()
    eager = re.search(r"^EAGER=(\S+)", text, re.M).group(1)
    modes = [eager] + re.findall(r"--modes (?!\")(\S+)", text)
    assert len(modes) >= 3
    for spec in modes:
        resolve_modes(spec)  # raises on an unknown mode
