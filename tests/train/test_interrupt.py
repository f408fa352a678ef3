"""Ctrl-C (SIGINT) or SIGTERM during a run: it finishes the optimizer step it is in, saves the state
there, stops with :class:`RunInterrupted`, and resumes to the weights of a run never interrupted;
even where the signal lands in code that would swallow a ``KeyboardInterrupt`` (a figure being
drawn). The same signal twice stops at once; every rank stops at the same step."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from densenet_zoo.train import RunInterrupted, TrainConfig, Trainer, finetune
from densenet_zoo.train import run_files
from densenet_zoo.weights import read_safetensors
from _dist import run_distributed
from _train_helpers import base_options, digits_subset

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 4  # per epoch: 2 classes x 8 images, batch 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return digits_subset(tmp_path_factory.mktemp("interrupt") / "digits", classes=2, train_per_class=8, val_per_class=2)


@pytest.fixture(autouse=True)
def default_handlers():
    """What a process started from a terminal has (a suite started in the background ignores SIGINT)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the run left its handler behind"
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def _send(signum):
    """``signum`` to this process; SIGTERM only where the run took it (by default it would end pytest)."""
    assert signum != signal.SIGTERM or signal.getsignal(signum) != signal.SIG_DFL, "the run does not handle SIGTERM"
    os.kill(os.getpid(), signum)


def _stopped(run, *args, **kwargs) -> RunInterrupted:
    """What ``run(...)`` raised, which must be RunInterrupted (a bare KeyboardInterrupt would end the session)."""
    try:
        run(*args, **kwargs)
    except RunInterrupted as exc:
        return exc
    except KeyboardInterrupt as exc:
        pytest.fail(f"a KeyboardInterrupt from wherever the signal landed escaped the run: {exc!r}")
    pytest.fail("the run went on after the signal")


def _position(out):
    state = torch.load(out / "state.pt", weights_only=True)
    return state["epoch"], state["batches_done"], state["global_step"]


def _assert_same_weights(a, b):
    ref, got = read_safetensors(a)[0], read_safetensors(b)[0]
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k].double(), ref[k].double(), atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_a_figure_is_drawn_stops_after_the_next_step_and_resumes_exactly(data, tmp_path, monkeypatch, capfd, signum):
    finetune(**base_options(data, tmp_path / "ref", epochs=3, batch_size=4))
    real = run_files.plot_curves

    def plot_and_get_a_signal(history, path):
        if len(history) == 1:  # while epoch 1's curves are drawn: a KeyboardInterrupt there used to be lost
            _send(signum)
        return real(history, path)

    monkeypatch.setattr(run_files, "plot_curves", plot_and_get_a_signal)
    out = tmp_path / "run"
    assert _stopped(finetune, **base_options(data, out, epochs=3, batch_size=4)).signum == signum
    assert _position(out) == (1, 1, STEPS + 1)  # epoch 1 done, then the step in progress, saved
    assert "stopping after this step" in capfd.readouterr().err
    monkeypatch.setattr(run_files, "plot_curves", real)
    assert finetune(resume=str(out))["epochs_run"] == 3
    _assert_same_weights(tmp_path / "ref" / "last.safetensors", out / "last.safetensors")


def test_the_same_signal_twice_stops_at_once_and_the_saved_state_stays_whole(data, tmp_path):
    def on_save(path, position):
        if position["global_step"] == 2:
            _send(signal.SIGINT)  # asks to stop after the step
            _send(signal.SIGINT)  # and now: raised here, inside the hook

    out = tmp_path / "run"
    _stopped(finetune, **base_options(data, out, epochs=2, batch_size=4, save_every=1), on_save=on_save)
    assert _position(out) == (0, 2, 2)
    assert finetune(resume=str(out))["epochs_run"] == 2


def test_sigterm_after_ctrl_c_does_not_cut_the_save_short(data, tmp_path):
    # torchrun answers Ctrl-C by sending its workers SIGTERM: the run still saves at the step.
    def on_save(path, position):
        if position["global_step"] == 1:
            _send(signal.SIGINT)
            _send(signal.SIGTERM)

    out = tmp_path / "run"
    exc = _stopped(finetune, **base_options(data, out, epochs=2, batch_size=4, save_every=1), on_save=on_save)
    assert exc.signum == signal.SIGINT and _position(out) == (0, 2, 2)


def test_a_handler_of_the_caller_is_kept(data, tmp_path):
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        def on_save(path, position):
            if position["global_step"] == 1:
                os.kill(os.getpid(), signal.SIGINT)

        result = finetune(**base_options(data, tmp_path / "run", epochs=1, batch_size=4, save_every=1), on_save=on_save)
        assert result["epochs_run"] == 1 and seen == [signal.SIGINT]  # the caller's handler ran; the run went on
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


class _SignalAt:
    """Forward hook: SIGINT to this process at the ``n``-th training forward of the classifier."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, module, inputs, out):
        if module.training:
            self.calls += 1
            if self.calls == self.n:
                os.kill(os.getpid(), signal.SIGINT)
        return out


def _ddp_run(rank: int, world_size: int, data: str, out: str):
    import densenet_zoo as dz
    from _train_helpers import TINY

    model = dz.create_model("densenet121", num_classes=2, **TINY)
    if rank == 1:  # only rank 1 gets the signal, in its 3rd forward: step 3, the first of epoch 2 (2 a rank)
        model.classifier.register_forward_hook(_SignalAt(3))
    trainer = Trainer(TrainConfig(**base_options(data, out, epochs=3, batch_size=8)), model=model)
    try:
        trainer.fit()
    except RunInterrupted as exc:
        return ["stopped", int(exc.signum), trainer.global_step]
    except KeyboardInterrupt:
        return ["bare KeyboardInterrupt", 0, trainer.global_step]
    return ["finished", 0, trainer.global_step]


def test_one_rank_signalled_stops_every_rank_at_the_same_step(data, tmp_path):
    results = run_distributed(_ddp_run, 2, str(data), str(tmp_path / "run"))
    assert results[0] == results[1] == ["stopped", signal.SIGINT, 3], results
    assert _position(tmp_path / "run") == (1, 1, 3)


def test_the_command_line_exits_143_on_sigterm_and_says_how_to_go_on(data, tmp_path, monkeypatch, capsys):
    import json

    from densenet_zoo.cli import main
    from _train_helpers import TINY

    real = run_files.plot_curves
    monkeypatch.setattr(run_files, "plot_curves", lambda history, path: _send(signal.SIGTERM) or real(history, path))
    out = tmp_path / "run"
    argv = ["finetune", "--data", str(data), "--out", str(out), "--model-args", json.dumps(TINY), "--image-size", "16",
            "--batch-size", "4", "--epochs", "3", "--no-progress"]
    assert main(argv) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert f"densenet-zoo finetune: stopped by SIGTERM; {out} keeps the last saved state; continue with: " \
           f"densenet-zoo finetune --resume {out}" in err, err
    assert _position(out) == (1, 1, STEPS + 1)
