"""Sizes that cannot fit are refused before anything large is allocated: the saved activations are estimated
(measured on one small image, scaled) and compared with what the process can get. Run in a child whose
address space is capped a little above what it uses, so an attempt to allocate would fail there, not here."""

from __future__ import annotations

import json

import pytest

from _hostile_helpers import run_capped
from _train_helpers import TINY, digits_subset

_CLI = """
import contextlib, io
from densenet_zoo.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    rc = main({argv!r})
raise RuntimeError(f"rc={{rc}} " + err.getvalue())
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return digits_subset(tmp_path_factory.mktemp("sizes") / "digits", classes=2, train_per_class=2, val_per_class=1)


def _finetune(data, out, *flags):
    return ["finetune", "--data", str(data), "--out", str(out), "--model", "densenet121", "--model-args",
            json.dumps(TINY), "--epochs", "1", "--no-progress", *flags]


def test_impossible_sizes_are_refused_up_front_with_the_estimate(data, tmp_path):
    cases = [
        _CLI.format(argv=_finetune(data, tmp_path / "a", "--image-size", "100000", "--batch-size", "2")),
        _CLI.format(argv=_finetune(data, tmp_path / "b", "--image-size", "2048", "--batch-size", "100000")),
        _CLI.format(argv=["profile", "--model", "densenet121", "--batch-size", "100000", "--image-size", "224",
                          "--modes", "none", "--steps", "1", "--warmup", "0"]),
        "dz.profile('densenet121', batch_size=4096, image_size=1024, modes='none,fused_lean', steps=1, warmup=0)",
    ]
    outcomes = run_capped(cases, allow_mib=1536, timeout=240)
    for case, res in zip(cases, outcomes):
        msg = res["msg"]
        assert not res["ok"] and res["s"] < 60, (case, res)
        if res["type"] == "RuntimeError":  # the command line: exit code 1, one line
            code, err = msg.split(" ", 1)
            lines = [line for line in err.splitlines() if line.strip()]
            assert code == "rc=1" and len(lines) == 1, msg
            msg = lines[0]
        else:
            assert res["zoo"], res
        assert "GiB of activations for backward, more than the" in msg and "this process can use" in msg, msg
        assert "smaller --image-size or --batch-size" in msg and "can't allocate" not in msg
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_size_that_fits_only_the_lean_strategy_is_told_so(data, tmp_path):
    """Normal mode needs ~8x the memory of fused_lean: between the two, the refusal names fused_lean."""
    case = _CLI.format(argv=_finetune(data, tmp_path / "c", "--image-size", "768", "--batch-size", "8"))
    (res,) = run_capped([case], allow_mib=1536, timeout=240)
    assert "--memory-efficient fused_lean (about" in res["msg"], res
