"""Every ``densenet-zoo`` subcommand given bad input: one line on stderr, exit code 1, no traceback;
``--debug`` shows the traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from densenet_zoo.cli import main

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


@pytest.fixture()
def tree(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("the user's")
    (tmp_path / "a_file").write_text("x")
    return tmp_path


def _cases(t: Path) -> dict:
    return {
        "models": (["models", "zzz*"], "no model name matches"),
        "weights list": (["weights", "list", "zzz*"], "no weights name matches"),
        "weights download": (["weights", "download", "no_such_weights"], "unknown weights"),
        "convert": (["convert", str(t / "missing.pth"), str(t / "o.safetensors")], "does not exist"),
        "sample-data": (["sample-data", "digits", str(t / "full")], "not empty"),
        "finetune": (["finetune", "--data", str(t / "missing"), "--out", str(t / "run")], "does not exist"),
        "finetune --out": (["finetune", "--data", str(t), "--out", str(t / "full")], "is not empty"),
        "finetune --resume": (["finetune", "--resume", str(t / "full")], "state.pt does not exist"),
        "evaluate": (["evaluate", "--checkpoint", str(t / "missing.safetensors"), "--data", str(t)], "does not exist"),
        "predict": (["predict", "--model", "densenet121", "--pretrained", str(t / "missing.png")], "does not exist"),
        "predict --top-k": (["predict", "--checkpoint", str(t / "a_file"), str(t / "a_file"), "--top-k", "0"], "--top-k"),
        "info": (["info", "no_such_model"], "unknown model"),
        "export": (["export", "--model", "densenet121", "--format", "onnx", "--out", str(t / "m.onnx"), "--image-size", "0"],
                   "positive integer"),
        "profile": (["profile", "--model", "no_such_model"], "unknown model"),
    }


@pytest.mark.parametrize("name", list(_cases(Path("."))))
def test_every_subcommand_gives_one_line_on_bad_input(name, tree, capsys):
    argv, message = _cases(tree)[name]
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("densenet-zoo ") and ": error: " in lines[0] and message in lines[0], lines[0]
    assert (tree / "full" / "x.txt").read_text() == "the user's" and sorted(p.name for p in (tree / "full").iterdir()) == ["x.txt"]


@pytest.mark.parametrize("name", ["finetune", "predict", "info", "sample-data"])
def test_the_console_entry_point_prints_one_line(name, tree):
    argv, message = _cases(tree)[name]
    r = subprocess.run([sys.executable, "-m", "densenet_zoo", *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr and message in r.stderr, r.stderr


def test_debug_shows_the_traceback(tree):
    with pytest.raises(ValueError, match="unknown model"):
        main(["--debug", "info", "no_such_model"])
    with pytest.raises(ValueError, match="unknown model"):
        main(["info", "no_such_model", "--debug"])  # also after the command name
    r = subprocess.run([sys.executable, "-m", "densenet_zoo", "--debug", "info", "no_such_model"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_an_unexpected_error_is_one_line_with_a_hint(monkeypatch, capsys):
    import densenet_zoo.infer.info as info  # the command imports model_info from here when it runs

    def broken(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(info, "model_info", broken)
    assert main(["info", "densenet121"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ZeroDivisionError: division by zero" in err and "--debug" in err


def test_an_error_from_a_dataloader_worker_is_one_line():
    from torch.utils.data import DataLoader, Dataset

    from densenet_zoo._utils import DataError
    from densenet_zoo.cli.common import one_line

    class Broken(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise DataError("img.png: unreadable image (truncated); fix or remove it")

    with pytest.raises(Exception) as err:
        next(iter(DataLoader(Broken(), num_workers=1, multiprocessing_context="fork" if sys.platform == "linux" else None)))
    text = one_line(err.value)
    assert "\n" not in text and "Traceback" not in text and "img.png: unreadable image (truncated)" in text


@pytest.mark.parametrize("argv", [
    ["--no-such-flag"], ["finetune", "--epochs", "ten"], ["finetune", "--no-such"], ["weights"],
    ["weights", "fly"], ["export", "--format", "caffe", "--out", "m.onnx"], ["predict"], ["profile", "--steps"],
    ["evaluate", "--checkpoint"], ["no-such-command"], [],
], ids=lambda a: " ".join(a) or "nothing")
def test_argument_errors_are_one_line_with_exit_code_1(argv, capsys):
    """Like every other error: one line naming the command and the problem, with where to read more."""
    assert main(argv) == 1
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert out == "" and len(lines) == 1 and lines[0].startswith("densenet-zoo") and ": error: " in lines[0], err
    assert "--help" in lines[0] and "usage:" not in err
