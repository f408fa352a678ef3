"""One output policy for every command that writes: a device, FIFO or folder is never written over; an
existing file that is not the command's own kind of output is replaced only with --overwrite; its own
output is replaced as before; temporary files are unpredictable, never follow planted links, and
leftovers of killed writes are cleaned up."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from densenet_zoo._utils import atomic_write
from densenet_zoo.cli import main
from _train_helpers import digits_subset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return digits_subset(tmp_path_factory.mktemp("policy") / "digits", classes=3, train_per_class=4, val_per_class=2)


_PROFILE = ["profile", "--model", "densenet_bc_100", "--batch-size", "2", "--image-size", "32", "--modes", "none",
            "--steps", "1", "--warmup", "0", "--rounds", "0"]


def _command(name: str, target: Path, checkpoint: Path, data: Path) -> list:
    """The command line of ``name`` whose output is ``target`` (a file; a folder's file for evaluate/profile)."""
    return {
        "export": ["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(target),
                   "--image-size", "16"],
        "convert": ["convert", str(checkpoint), str(target)],
        "predict": ["predict", "--checkpoint", str(checkpoint), str(data / "val"), "--csv", str(target), "-q"],
        "evaluate": ["evaluate", "--checkpoint", str(checkpoint), "--data", str(data / "val"), "--out", str(target.parent)],
        "profile": _PROFILE + ["--out", str(target.parent)],
    }[name]


_TARGET_NAME = {"export": "model.pt", "convert": "model.safetensors", "predict": "predictions.csv",
                "evaluate": "evaluation.json", "profile": "profile.json"}
COMMANDS = sorted(_TARGET_NAME)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _special(kind: str, path: Path) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":  # a private node of the null device, in the test's own folder
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    else:
        path.mkdir()


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_target_that_is_not_a_regular_file_is_refused(command, kind, checkpoint, data, tmp_path, capsys):
    if kind == "device" and os.geteuid() != 0:
        pytest.skip("creating a device node needs root")
    target = tmp_path / "out" / _TARGET_NAME[command]
    target.parent.mkdir()
    _special(kind, target)
    mode = os.lstat(target).st_mode
    assert main(_command(command, target, checkpoint, data) + ["--overwrite"]) == 1
    message = _error(capsys)
    assert str(target) in message and ("not a regular file" in message or "is a folder" in message), message
    assert os.lstat(target).st_mode == mode  # still the same kind of node
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # nothing else written beside it


@pytest.mark.parametrize("command", COMMANDS)
def test_a_foreign_file_is_kept_unless_overwrite_and_own_output_is_replaced(command, checkpoint, data, tmp_path, capsys):
    target = tmp_path / "out" / _TARGET_NAME[command]
    target.parent.mkdir()
    target.write_text("my notes, not an output of densenet-zoo\n")
    argv = _command(command, target, checkpoint, data)
    assert main(argv) == 1
    message = _error(capsys)
    assert "exists and is not" in message and "--overwrite" in message and str(target) in message, message
    assert target.read_text() == "my notes, not an output of densenet-zoo\n"
    assert main(argv + ["--overwrite"]) == 0
    first = target.read_bytes()
    assert first != b"my notes, not an output of densenet-zoo\n"
    capsys.readouterr()
    assert main(argv) == 0  # its own output: replaced without --overwrite, as a re-run expects
    assert target.stat().st_size > 0
    assert not [p for p in target.parent.iterdir() if ".tmp" in p.name]


def test_temporary_files_are_unpredictable_and_never_follow_planted_links(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "out.csv"
    for pid in range(os.getpid() - 3, os.getpid() + 4):  # every name of the old scheme, and of the new prefix
        os.symlink(victim, tmp_path / f".out.csv.{pid}.tmp")
    atomic_write(target, lambda f: f.write("a,b\n"), binary=False)
    assert target.read_text() == "a,b\n" and victim.read_text() == "precious"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.csv.") and p.is_symlink()]


def test_leftovers_of_killed_writes_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "best.safetensors"
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
    leftover = tmp_path / f".best.safetensors.{dead}.abcd1234.tmp"
    leftover.write_bytes(b"half a checkpoint")
    other = tmp_path / f".other.safetensors.{dead}.abcd1234.tmp"  # another target's: not this write's to judge
    other.write_bytes(b"x")
    live = tmp_path / f".best.safetensors.{os.getppid()}.abcd1234.tmp"  # a live writer's: kept
    live.write_bytes(b"y")
    atomic_write(target, lambda f: f.write(b"whole"))
    assert target.read_bytes() == b"whole" and not leftover.exists() and other.exists() and live.exists()
