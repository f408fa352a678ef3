"""A run whose loss or gradients stop being finite is an event: it stops at that step (or skips it, on
request), on every rank alike, keeps the last finite checkpoint, and never writes a non-finite model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import densenet_zoo as dz
from densenet_zoo import RunError
from densenet_zoo.cli import main
from densenet_zoo.train import TrainConfig, Trainer, finetune
from densenet_zoo.train.step import clip_gradients
from _dist import run_distributed
from _train_helpers import TINY, base_options, digits_subset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return digits_subset(tmp_path_factory.mktemp("nonfinite") / "digits", classes=2, train_per_class=8, val_per_class=2)


def _poisoned(from_call: int, calls: int = 10 ** 9) -> dz.DenseNet:
    """A tiny DenseNet whose logits are NaN in training calls ``from_call`` .. ``from_call + calls - 1``
    (counted from 1): a loss that blows up at a known step, through the model a user may pass in."""
    model = dz.create_model("densenet121", num_classes=2, **TINY)
    seen = {"n": 0}

    def hook(module, inputs, out):
        if not module.training or module is not model.classifier:  # not a copy (the run's memory estimate probes one)
            return out
        seen["n"] += 1
        return out * float("nan") if from_call <= seen["n"] < from_call + calls else out

    model.classifier.register_forward_hook(hook)
    return model


def _finite_file(path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values() if t.is_floating_point())


def test_a_diverging_run_stops_at_the_step_keeps_the_last_finite_checkpoint_and_resumes(data, tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(**base_options(data, out, epochs=3, batch_size=4))  # 4 steps an epoch
    with pytest.raises(RunError) as info:
        Trainer(config, model=_poisoned(from_call=6)).fit()  # the second step of epoch 2
    text = str(info.value)
    assert "\n" not in text and text.startswith("epoch 2, step 6 (batch 2 of 4): the loss or a gradient is not finite")
    assert f"last finite checkpoint is {out / 'last.safetensors'} (epoch 1" in text and "--lr" in text
    assert _finite_file(out / "last.safetensors") and _finite_file(out / "best.safetensors")
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    result = finetune(resume=str(out), epochs=3)  # without the poison: the run continues from epoch 1
    assert result["epochs_run"] == 3 and _finite_file(out / "last.safetensors")


def test_skip_drops_the_bad_steps_and_trains_on(data, tmp_path, capsys):
    config = TrainConfig(**base_options(data, tmp_path / "run", epochs=2, batch_size=4, on_nonfinite="skip"))
    result = Trainer(config, model=_poisoned(from_call=3, calls=2)).fit()
    log = capsys.readouterr().out
    assert "epoch 1, step 3 (batch 3 of 4): non-finite loss or gradient, step skipped (1 so far)" in log
    assert "step 4 (batch 4 of 4): non-finite loss or gradient, step skipped (2 so far)" in log
    assert result["epochs_run"] == 2 and _finite_file(tmp_path / "run" / "last.safetensors")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor([r["train_loss"], r["val_loss"]])).all() for r in rows)


def test_the_command_line_exits_1_with_one_line_and_writes_nothing(data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", "--data", str(data), "--out", str(out), "--model", "densenet121", "--model-args",
            json.dumps(TINY), "--image-size", "16", "--epochs", "2", "--batch-size", "8", "--lr", "1e12", "--no-progress"]
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "is not finite" in err[0] and "no checkpoint was written" in err[0], err
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix == ".safetensors"]


@pytest.mark.parametrize("lr", ["inf", "nan", "-inf", "0"])
def test_a_learning_rate_that_is_not_a_finite_positive_number_is_refused(data, tmp_path, lr, capsys):
    argv = ["finetune", "--data", str(data), "--out", str(tmp_path / "run"), f"--lr={lr}"]
    assert main(argv) == 1
    assert "--lr must be a finite number > 0" in capsys.readouterr().err and not (tmp_path / "run").exists()


def _ddp_run(rank: int, world_size: int, data: str, out: str) -> str:
    config = TrainConfig(**base_options(data, out, epochs=2, batch_size=4))
    model = _poisoned(from_call=3) if rank == 1 else _poisoned(from_call=10 ** 9)  # only rank 1 goes bad
    try:
        Trainer(config, model=model).fit()
    except RunError as exc:
        return str(exc)
    return "finished"


def test_one_rank_going_non_finite_stops_every_rank_at_the_same_step(data, tmp_path):
    messages = run_distributed(_ddp_run, 2, str(data), str(tmp_path / "run"))
    assert messages[0] == messages[1], messages
    assert messages[0].startswith("epoch 1, step 3 (batch 3 of 4): the loss or a gradient is not finite"), messages


def test_clipping_bounds_the_global_gradient_norm():
    model = dz.DenseNet(**TINY, num_classes=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    (model(torch.randn(2, 3, 16, 16)).sum() * 1e6).backward()
    norm = lambda: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))  # noqa: E731
    assert norm() > 10
    clip_gradients(optimizer, 1.0, scaler=None)
    assert norm() <= 1.0 + 1e-4
