"""benchmarks/gpu_check.sh stays runnable: it parses, its test file exists, and every mode it asks for resolves."""

import importlib.util
import re
import shlex
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
    lists = dict(re.findall(r"^(EAGER|COMPILED)=(\S+)", text, re.M))
    assert sorted(lists) == ["COMPILED", "EAGER"] and "none:compile" in lists["COMPILED"].split(",")
    modes = list(lists.values()) + re.findall(r"--modes (?!\")(\S+)", text)
    assert len(modes) >= 3
    for spec in modes:
        resolve_modes(spec)  # raises on an unknown mode


def _benchmark_parser():
    spec = importlib.util.spec_from_file_location("memory_benchmark", SCRIPT.parent / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_command_of_every_part_parses(tmp_path):
    # Every part run, with a stand-in for python that only writes down its arguments: each benchmark command,
    # as the shell expands it, must be one that benchmarks/memory.py accepts, with modes that resolve.
    text = SCRIPT.read_text()
    default = re.search(r'PARTS=\$\{PARTS:-"([^"]+)"\}', text).group(1).split()
    second = re.search(r'second run \(PARTS="([^"]+)"\)', text).group(1).split()
    log, python = tmp_path / "argv", tmp_path / "python"
    python.write_text('#!/bin/sh\necho "$@" >> "$ARGV_LOG"\n')
    python.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "PYTHON": str(python), "ARGV_LOG": str(log),
           "PARTS": " ".join(default + second)}
    subprocess.run(["bash", str(SCRIPT)], cwd=SCRIPT.parents[1], env=env, capture_output=True, timeout=60, check=True)
    commands = [shlex.split(line) for line in log.read_text().splitlines()]
    benchmarks = [c[1:] for c in commands if c[0] == "benchmarks/memory.py"]
    assert len(benchmarks) == len(default + second) - 1 and ["-m", "pytest"] == commands[1][:2]
    parser = _benchmark_parser()
    for argv in benchmarks:
        args = parser.parse_args(argv)  # exits on an unknown flag or a bad value
        assert args.device == "cuda" and resolve_modes(args.modes), argv
    logs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert logs == sorted(["env.txt"] + [f"{name}.log" for name in default + second])
    # Each run fits one command of a device machine (10 minutes), with the parts' time limits added up.
    limit = {name: int(re.search(r"\(limit (\d+)s\)", (tmp_path / "out" / f"{name}.log").read_text()).group(1))
             for name in default + second}
    assert sum(limit[n] for n in default) <= 600 and sum(limit[n] for n in second) <= 600, limit
