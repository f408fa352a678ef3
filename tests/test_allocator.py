"""Allocator choice: environment for worker processes, what a process runs with, the command line's re-exec."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from densenet_zoo import allocator
from densenet_zoo.allocator import active_allocator, allocator_env, describe, find_library

ROOT = Path(__file__).resolve().parents[1]
PRELOADED = [pytest.param(name, marks=pytest.mark.skipif(
    find_library(name) is None, reason=f"{name} is not installed (apt-get install {allocator._PACKAGES[name]})"))
    for name in ("tcmalloc", "jemalloc")]


def _active_in_child(env):
    code = "from densenet_zoo.allocator import active_allocator; print(active_allocator())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT), **env),
                         capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def test_default_and_mmap_threshold_need_nothing_installed():
    assert allocator_env("default") == {}
    assert allocator_env("mmap-threshold")["MALLOC_MMAP_THRESHOLD_"] == "65536"
    assert _active_in_child(allocator_env("mmap-threshold")) == "mmap-threshold"
    assert "glibc" in describe("default")


@pytest.mark.parametrize("name", PRELOADED)
def test_preloaded_library_is_what_the_child_runs_with(name):
    env = allocator_env(name)
    assert env["LD_PRELOAD"].startswith(find_library(name))
    assert _active_in_child(env) == name
    assert active_allocator() == "default" or os.environ.get("LD_PRELOAD")  # this process was left alone


def test_absent_library_names_the_debian_package(monkeypatch):
    monkeypatch.setattr(allocator, "_LIBRARY_DIRS", ())
    with pytest.raises(ValueError, match=r"apt-get install libjemalloc2.*--allocator default"):
        allocator_env("jemalloc")
    with pytest.raises(ValueError, match="unknown allocator 'glibc'; expected one of default, tcmalloc"):
        allocator_env("glibc")


def test_preferred_allocator_reads_the_opt_out(monkeypatch):
    monkeypatch.setenv(allocator.ENV_VAR, "default")
    assert allocator.preferred_allocator() == "default"
    monkeypatch.setenv(allocator.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="DENSENET_ZOO_ALLOCATOR='fast'"):
        allocator.preferred_allocator()
    monkeypatch.delenv(allocator.ENV_VAR)
    assert allocator.preferred_allocator() == ("tcmalloc" if find_library("tcmalloc") else "default")


def test_library_call_of_the_cli_never_reexecutes(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    allocator.reexec_with_preferred("finetune", ["finetune", "--data", "x"])  # argv given: called from Python
    allocator.reexec_with_preferred("profile", None)  # not a command that trains in this process
    assert calls == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("wanted", ["default"] + PRELOADED)
def test_finetune_says_which_allocator_runs_in_its_first_line(wanted, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{allocator.ENV_VAR: wanted})
    env.pop("LD_PRELOAD", None)
    proc = subprocess.run([sys.executable, "-m", "densenet_zoo", "finetune", "--data", str(tmp_path / "missing")],
                          env=env, capture_output=True, text=True, cwd=tmp_path, timeout=100)
    first = proc.stdout.splitlines()[0]
    assert proc.returncode == 1
    assert first.startswith(f"densenet-zoo finetune: memory allocator {wanted}"), proc.stdout
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr  # bad input: still one line


@pytest.mark.parametrize("env, active, says", [
    ("auto", "default", "tcmalloc is not installed (it keeps training memory lower: apt-get install libtcmalloc-minimal4)"),
    ("default", "default", "as DENSENET_ZOO_ALLOCATOR=default asks"),
    ("auto", "tcmalloc", "DENSENET_ZOO_ALLOCATOR=default runs without it"),
])
def test_the_allocator_line_says_what_runs_and_how_to_change_it(env, active, says, monkeypatch):
    monkeypatch.setenv(allocator.ENV_VAR, env)
    note = allocator.allocator_note(active)
    assert note.startswith(f"memory allocator {active}") and note.endswith(says), note
    assert "to turn this off" not in note
