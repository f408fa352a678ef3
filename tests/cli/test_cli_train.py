"""``densenet-zoo sample-data / finetune / evaluate / predict`` end to end, resume after SIGKILL,
atomic checkpoint writes, torchrun DDP against one process, and bad input."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import densenet_zoo as dz
from densenet_zoo.cli import main
from densenet_zoo.train import finetune
from densenet_zoo.weights import read_safetensors

from _train_helpers import base_options, default_sigint, digits_subset

pytestmark = pytest.mark.usefixtures("one_thread")


ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
TINY_JSON = '{"growth_rate": 8, "block_config": [2, 2], "num_init_features": 16, "small_inputs": true}'


def _cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "densenet_zoo", *map(str, args)], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True, **kw)


def _torchrun_cmd(data, out, *extra):
    """``densenet-zoo finetune`` of the tiny model in two processes under torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "densenet_zoo",
            *map(str, _tiny_flags(data, out, *extra))]


def _torchrun(data, out, *extra, timeout):
    return subprocess.run(_torchrun_cmd(data, out, *extra), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _tiny_flags(data, out, *extra):
    return ["finetune", "--data", str(data), "--out", str(out), "--model", "densenet121", "--model-args", TINY_JSON,
            "--image-size", "16", "--batch-size", "8", "--lr", "0.05", "--augment", "light", "--deterministic",
            "--threads", "1", "--no-progress", *extra]




@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return digits_subset(tmp_path_factory.mktemp("small") / "digits")


def _weights(path):
    return read_safetensors(path)[0]


@pytest.mark.timeout(300)
def test_sample_data_finetune_evaluate_predict(tmp_path, capsys):
    data, out = tmp_path / "digits", tmp_path / "run"
    assert main(["sample-data", "digits", str(data)]) == 0
    # Digits at their native 8x8 resolution: two epochs of a tiny DenseNet.
    r = _cli("finetune", "--data", data, "--out", out, "--model", "densenet121", "--model-args", TINY_JSON,
             "--image-size", "8", "--epochs", "2", "--batch-size", "32", "--lr", "0.1", "--augment", "none",
             "--threads", "1", timeout=280)
    assert r.returncode == 0, r.stderr
    assert "epoch 2:" in r.stdout and "best val acc@1" in r.stdout
    assert "\r" not in r.stderr  # no progress bars when not on a terminal
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    acc = max(float(row["val_acc1"]) for row in rows)
    print(f"held-out digits accuracy after 2 epochs: {acc:.2f}%")
    assert acc > 60.0  # chance is 10 %
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "best.safetensors"), "--data", str(data / "val")]) == 0
    text = capsys.readouterr().out
    assert f"acc@1 {acc:.2f}%" in text and (out / "confusion.png").is_file() and (out / "evaluation.json").is_file()
    images = sorted((data / "val" / "7").glob("*.png"))[:3] + sorted((data / "val" / "1").glob("*.png"))[:3]
    assert main(["predict", "--checkpoint", str(out / "best.safetensors"), *map(str, images), "--csv", str(tmp_path / "p.csv"), "-q"]) == 0
    preds = list(csv.reader(open(tmp_path / "p.csv")))[1:]
    assert len(preds) == 6 and all(row[1] in [str(i) for i in range(10)] for row in preds)
    model, meta = dz.load_model(out / "best.safetensors")
    assert meta["class_names"] == [str(i) for i in range(10)] and model.num_classes == 10


_KILLED_AFTER_STEP_9 = """
import json, os, signal, sys, torch
from densenet_zoo.train import finetune
torch.set_num_threads(1)

def on_save(path, position):  # the public hook: called right after each state write
    if position["global_step"] == 9:
        os.kill(os.getpid(), signal.SIGKILL)

finetune(on_save=on_save, **json.loads(sys.argv[1]))
"""


@pytest.mark.timeout(240)
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(small, tmp_path):
    common = dict(epochs=2, save_every=1)
    finetune(**base_options(small, tmp_path / "ref", **common))  # 6 steps per epoch, never interrupted
    out = tmp_path / "run"
    # SIGKILL at a real save point: epoch 2, batch 3 of 6, just after its state was written
    proc = subprocess.run([sys.executable, "-c", _KILLED_AFTER_STEP_9, json.dumps(base_options(small, out, **common))],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=200)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    state = torch.load(out / "state.pt", weights_only=True)
    assert (state["epoch"], state["batches_done"], state["global_step"]) == (1, 3, 9)
    r = _cli("finetune", "--resume", out, "--threads", "1", timeout=200)
    assert r.returncode == 0, r.stderr
    ref, got = _weights(tmp_path / "ref" / "last.safetensors"), _weights(out / "last.safetensors")
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k].double(), ref[k].double(), atol=1e-6, rtol=0, msg=k)
    ref_rows = list(csv.DictReader(open(tmp_path / "ref" / "metrics.csv")))
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    for a, b in zip(ref_rows, rows):
        for key in ("train_loss", "train_acc1", "val_loss", "val_acc1", "lr"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6, abs=1e-9), key


_WRITER = """
import sys, torch
from densenet_zoo.train.run_files import save_run_state
i = 0
while True:
    i += 1
    save_run_state({"format": 1, "step": i, "model": {"w": torch.full((4_000_000,), float(i))}}, sys.argv[1])
"""


@pytest.mark.timeout(120)
def test_a_kill_during_a_state_write_never_leaves_a_broken_file(tmp_path):
    path = tmp_path / "state.pt"
    rng = random.Random(0)
    last = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=ENV)
        try:
            deadline = time.time() + 60
            while not path.exists() and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.05, 0.6))  # lands anywhere in a 16 MB write
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        state = torch.load(path, weights_only=True)
        assert torch.equal(state["model"]["w"], torch.full((4_000_000,), float(state["step"])))
        last = state["step"]
    assert last >= 1


@pytest.mark.timeout(240)
def test_ctrl_c_under_torchrun_saves_at_a_step_on_every_rank_and_resumes(small, tmp_path):
    # A terminal's Ctrl-C reaches torchrun and its workers; torchrun then sends them SIGTERM. Both ranks
    # finish the same step, rank 0 saves it, and the run resumes from there.
    out = tmp_path / "ddp"
    cmd = _torchrun_cmd(small, out, "--epochs", "50", "--batch-size", "4")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=default_sigint)  # its own process group, as a terminal gives
    try:
        deadline = time.time() + 150
        while not (out / "state.pt").exists() and time.time() < deadline:  # epoch 1 is saved: mid epoch 2 next
            time.sleep(0.05)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "stopping after this step" in err, err[-3000:]
    assert err.count("densenet-zoo finetune: interrupted") == 1, err[-3000:]  # rank 0 says it, once
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["global_step"] > 12  # past epoch 1's save (12 steps): the step it stopped at was saved
    r = _cli("finetune", "--resume", out, "--epochs", str(state["epoch"] + 1), "--threads", "1", timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.timeout(240)
def test_torchrun_two_processes_match_one_process(small, tmp_path):
    # sync_bn normalises with the statistics of the global batch, the two ranks' batches together
    # are the single process's batch (same permutation), and DDP averages the ranks' mean losses:
    # each step is the single-process step up to float summation order. The DDP run also uses the
    # memory-efficient mode (recomputation re-runs sync_bn's collectives in backward).
    common = dict(epochs=1, norm="sync_bn", weight_decay=1e-3)
    finetune(**base_options(small, tmp_path / "one", **common))
    r = _torchrun(small, tmp_path / "ddp", "--epochs", "1", "--norm", "sync_bn", "--weight-decay", "1e-3",
                  "--memory-efficient", timeout=220)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and r.stdout.count("epoch 1:") == 1  # rank 0 prints, once
    assert r.stdout.count("best val acc@1") == 1, r.stdout  # the closing line too
    one, ddp = _weights(tmp_path / "one" / "last.safetensors"), _weights(tmp_path / "ddp" / "last.safetensors")
    for k in one:
        torch.testing.assert_close(ddp[k].double(), one[k].double(), atol=2e-5, rtol=1e-4, msg=k)
    a = list(csv.DictReader(open(tmp_path / "one" / "metrics.csv")))[0]
    b = list(csv.DictReader(open(tmp_path / "ddp" / "metrics.csv")))[0]
    assert float(a["val_acc1"]) == float(b["val_acc1"])
    assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-5)


def test_compile_flag_trains_and_a_compiler_that_cannot_build_is_one_line(small, tmp_path, capsys):
    torch._dynamo.reset()
    assert main(_tiny_flags(small, tmp_path / "compiled", "--epochs", "1", "--compile")) == 0
    assert (tmp_path / "compiled" / "last.safetensors").is_file()
    import torch._inductor.config as inductor

    # the CPU backend's C++ compiler missing, as on a machine without one: refused before the run starts
    torch._dynamo.reset()
    capsys.readouterr()
    with inductor.patch({"cpp.cxx": (str(tmp_path / "no-such-c++"),)}):
        assert main(_tiny_flags(small, tmp_path / "broken", "--epochs", "1", "--compile")) == 1
    assert inductor.cpp.cxx != (str(tmp_path / "no-such-c++"),)  # put back for the tests that follow
    err = capsys.readouterr().err
    assert "--compile: torch.compile cannot build here: its CPU backend needs a C++ compiler" in err, err
    assert "run without --compile" in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "broken").exists()


def test_torchrun_compiled_with_accumulation_matches_one_eager_process(small, tmp_path):
    # The DDP model compiled, the fused blocks as operators, gradients accumulated without a sync
    # (no_sync) over two micro-batches: the single eager process's steps up to float rounding.
    common = dict(epochs=1, norm="sync_bn", memory_efficient="fused", accum_steps=2)
    finetune(**base_options(small, tmp_path / "one", **common))
    r = _torchrun(small, tmp_path / "ddp", "--epochs", "1", "--norm", "sync_bn", "--memory-efficient", "fused",
                  "--accum-steps", "2", "--compile", timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    one, ddp = _weights(tmp_path / "one" / "last.safetensors"), _weights(tmp_path / "ddp" / "last.safetensors")
    for k in one:
        torch.testing.assert_close(ddp[k].double(), one[k].double(), atol=1e-4, rtol=1e-3, msg=k)


def test_bad_input_gives_one_line_errors_and_overwrites_nothing(small, tmp_path, capsys):
    one_class, empty, unsupported = tmp_path / "one", tmp_path / "empty", tmp_path / "unsup"
    (one_class / "a").mkdir(parents=True)
    (one_class / "a" / "x.png").write_bytes((small / "train" / "0").glob("*.png").__next__().read_bytes())
    for d in (empty, unsupported):
        for c in ("a", "b"):
            (d / c).mkdir(parents=True)
    (empty / "a" / "x.png").write_bytes((one_class / "a" / "x.png").read_bytes())
    (unsupported / "a" / "x.png").write_bytes((one_class / "a" / "x.png").read_bytes())
    (unsupported / "b" / "scan.heic").write_bytes(b"\0" * 32)
    run = tmp_path / "run"
    assert main(_tiny_flags(small, run, "--epochs", "1")) == 0
    saved = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    cases = {
        "does not exist": _tiny_flags(tmp_path / "missing", tmp_path / "o1"),
        "at least 2 class folders": _tiny_flags(one_class, tmp_path / "o2"),
        "holds no images": _tiny_flags(empty, tmp_path / "o3"),
        "unsupported image type '.heic'": _tiny_flags(unsupported, tmp_path / "o4"),
        "--batch-size must be an integer >= 1, got 0": _tiny_flags(small, tmp_path / "o5", "--batch-size", "0"),
        "already holds a run": _tiny_flags(small, run),
        "holds a run of model 'densenet121'": ["finetune", "--resume", str(run), "--model", "densenet169"],
        "cannot resume it as model_args": ["finetune", "--resume", str(run), "--model-args", '{"growth_rate": 4}'],
    }
    for message, argv in cases.items():
        assert main([str(a) for a in argv]) == 1, message
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == saved
    r = _cli(*_tiny_flags(small, tmp_path / "o6", "--batch-size", "0"))  # the real entry point: exit 1, no traceback
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
