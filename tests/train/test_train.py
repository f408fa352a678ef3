"""The fine-tuning engine through its Python API: sampling, schedule, freezing, accumulation,
memory modes, norms, AMP, early stopping and the files a run writes."""

import csv
import json
import math

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import densenet_zoo as dz
from densenet_zoo._utils import RunError, UnsupportedError
from densenet_zoo.train import finetune
from densenet_zoo.train.compiling import compile_errors
from densenet_zoo.train.freezing import apply_freeze
from densenet_zoo.train.optim import lr_factor, param_groups
from densenet_zoo.train.sampler import EpochBatchSampler
from densenet_zoo.models import load_model
from densenet_zoo.weights import read_safetensors

from _train_helpers import TINY, base_options, digits_subset

pytestmark = pytest.mark.usefixtures("one_thread")





@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return digits_subset(tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    return out, finetune(**base_options(data, out, epochs=2, save_every=2))


def _weights(path):
    return read_safetensors(path)[0]


def _assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), atol=atol, rtol=0, msg=k)


def test_rank_batches_together_are_the_single_process_batch():
    single = EpochBatchSampler(40, 8, seed=5)
    ranks = [EpochBatchSampler(40, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    for s in [single, *ranks]:
        s.set_epoch(3)
    assert len(single) == len(ranks[0]) == 5
    for k, batch in enumerate(single):
        assert sorted(batch) == sorted(list(ranks[0])[k] + list(ranks[1])[k])
    single.set_epoch(3, skip=2)
    full = EpochBatchSampler(40, 8, seed=5)
    full.set_epoch(3)
    assert list(single) == list(full)[2:]
    odd = [EpochBatchSampler(5, 2, rank=r, world_size=2) for r in range(2)]  # padded like DistributedSampler
    assert sum(len(b) for s in odd for b in s) == 6


def test_schedule_equals_torch_warmup_then_cosine():
    warmup, total = 4, 20
    p = nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.SGD([p], lr=0.1)
    ref = torch.optim.lr_scheduler.SequentialLR(ref_opt, [
        torch.optim.lr_scheduler.LinearLR(ref_opt, start_factor=1 / warmup, total_iters=warmup - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=total - warmup),
    ], milestones=[warmup])
    for step in range(total):
        assert ref_opt.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(step, warmup, total), abs=1e-9), step
        ref_opt.step()
        ref.step()


def test_layer_decay_groups_and_no_weight_decay_on_norms():
    model = dz.create_model("densenet121", num_classes=3, **TINY)
    groups = param_groups(model, 0.1, 1e-4, layer_decay=0.5)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["classifier.weight"])] == (0.1, 1e-4)
    assert lr_of[id(named["features.norm5.weight"])] == (0.1, 0.0)
    assert lr_of[id(named["features.denseblock2.denselayer1.conv1.weight"])] == (pytest.approx(0.05), 1e-4)
    assert lr_of[id(named["features.transition1.conv.weight"])] == (pytest.approx(0.025), 1e-4)
    assert lr_of[id(named["features.conv0.weight"])] == (pytest.approx(0.0125), 1e-4)
    assert len(lr_of) == len(named)
    apply_freeze(model, "block1")
    trainable = {id(p) for g in param_groups(model, 0.1, 0.0) for p in g["params"]}
    assert id(named["features.conv0.weight"]) not in trainable and id(named["features.denseblock2.denselayer1.conv1.weight"]) in trainable
    with pytest.raises(ValueError, match="block1..block2"):
        apply_freeze(dz.create_model("densenet121", **TINY), "block3")


def test_run_writes_loadable_outputs(run, data):
    out, result = run
    for name in ("best.safetensors", "last.safetensors", "state.pt", "metrics.csv", "metrics.jsonl", "curves.png", "config.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*tmp"))
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["batches_done"] == 0 and state["global_step"] == 12
    assert set(state["rng"][0]) >= {"torch"}
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [json.loads(l)["val_acc1"] for l in open(out / "metrics.jsonl")] == [float(r["val_acc1"]) for r in rows]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, meta = load_model(out / "last.safetensors")
    assert meta["class_names"] == ["0", "1", "2", "3"] and meta["preprocessing"]["size"] == 16 and meta["norm"] == "bn"
    assert meta["arch"] == "densenet121" and meta["model_args"]["growth_rate"] == 8
    # The weights in the state equal last.safetensors, and re-evaluating them gives the logged accuracy.
    _assert_same_weights(_weights(out / "last.safetensors"), state["model"], 0)
    from densenet_zoo.train.evaluate import evaluate_checkpoint

    ev = evaluate_checkpoint(str(out / "last.safetensors"), str(data / "val"), out=str(out / "eval"))
    assert ev["acc1"] == pytest.approx(float(rows[-1]["val_acc1"]), abs=1e-9)
    assert ev["loss"] == pytest.approx(float(rows[-1]["val_loss"]), rel=1e-5)
    assert (out / "eval" / "confusion.png").is_file() and sum(map(sum, ev["confusion"])) == 16


def test_a_new_run_refuses_an_output_folder_that_holds_one(run, data):
    out, _ = run
    before = (out / "state.pt").read_bytes()
    with pytest.raises(RunError, match="already holds a run"):
        finetune(**base_options(data, out))
    assert (out / "state.pt").read_bytes() == before


def test_gradient_accumulation_equals_the_big_batch(data, tmp_path):
    # GroupNorm: no batch statistics, so 2 x 4 accumulated is the same step as 8 at once
    # ("light" augmentation is on, so the samples' random crops must match too).
    def model():
        torch.manual_seed(0)
        return dz.DenseNet(num_classes=4, norm_layer=lambda c: nn.GroupNorm(4, c), **TINY)

    common = dict(epochs=1, label_smoothing=0.1, weight_decay=1e-3, optimizer="adamw", lr=1e-3)
    finetune(model_obj=model(), **base_options(data, tmp_path / "big", batch_size=8, **common))
    # Two loader workers here, none above: augmentation and order do not depend on them.
    finetune(model_obj=model(), **base_options(data, tmp_path / "acc", batch_size=4, accum_steps=2, workers=2, **common))
    _assert_same_weights(_weights(tmp_path / "big" / "last.safetensors"), _weights(tmp_path / "acc" / "last.safetensors"), 1e-6)


def test_freezing_keeps_frozen_weights_and_statistics(data, tmp_path):
    finetune(**base_options(data, tmp_path / "f", epochs=1, freeze="block1"))
    torch.manual_seed(0)  # the run's initial weights: same seed, same constructor
    init = dz.create_model("densenet121", num_classes=4, **TINY).state_dict()
    after = _weights(tmp_path / "f" / "last.safetensors")
    for k, v in after.items():
        frozen = k.startswith(("features.conv0", "features.denseblock1.", "features.transition1."))
        assert torch.equal(v, init[k]) == frozen, k


def test_every_memory_mode_trains_like_normal_mode(data, tmp_path):
    finetune(**base_options(data, tmp_path / "none", epochs=1))
    ref = _weights(tmp_path / "none" / "last.safetensors")
    for name in dz.list_memory_strategies():
        if name == "none":
            continue
        finetune(**base_options(data, tmp_path / name, epochs=1, memory_efficient=name))
        # fused strategies (and "auto", which may choose them): other kernels, same math, float32 rounding differs
        _assert_same_weights(_weights(tmp_path / name / "last.safetensors"), ref, 1e-4 if name.startswith("fused") or name == "auto" else 1e-5)


def test_compiled_training_trains_like_eager_and_resumes_without_the_compiler(data, tmp_path):
    # The fused strategy compiled (one operator per block), with accumulation; each run is resumed for
    # a second epoch, the compiled one with compile off (a setting a resume may change).
    common = dict(memory_efficient="fused", accum_steps=2, batch_size=4, epochs=1)
    runs = {"eager": {}, "compiled": {"compile": True}}
    graphs = {}
    for name, options in runs.items():
        torch._dynamo.reset()
        counters.clear()  # cumulative over the process: earlier tests compiled too
        assert finetune(**base_options(data, tmp_path / name, **common, **options))["epochs_run"] == 1
        graphs[name] = counters["stats"]["unique_graphs"]
    assert graphs == {"eager": 0, "compiled": graphs["compiled"]} and graphs["compiled"] > 0  # the compiler ran
    weights = {name: _weights(tmp_path / name / "last.safetensors") for name in runs}
    _assert_same_weights(weights["compiled"], weights["eager"], 1e-4)
    for name in runs:
        assert finetune(resume=str(tmp_path / name), epochs=2, compile=False)["epochs_run"] == 2
    weights = {name: _weights(tmp_path / name / "last.safetensors") for name in runs}
    _assert_same_weights(weights["compiled"], weights["eager"], 1e-4)


def test_a_compiler_backend_that_fails_is_one_line():
    def failing_backend(graph, example_inputs):
        raise RuntimeError("no code for this machine\nmore detail")

    torch._dynamo.reset()
    step = torch.compile(lambda x: x.sin() + 1, backend=failing_backend)
    with pytest.raises(UnsupportedError, match=r"^--compile: torch.compile could not build the model here \(RuntimeError: "
                                              r"no code for this machine\); run without --compile$"):
        with compile_errors(True):
            step(torch.ones(3))
    torch._dynamo.reset()


def test_sync_bn_in_one_process_trains_like_bn(data, tmp_path):
    finetune(**base_options(data, tmp_path / "bn", epochs=1))
    finetune(**base_options(data, tmp_path / "sbn", epochs=1, norm="sync_bn"))
    _assert_same_weights(_weights(tmp_path / "sbn" / "last.safetensors"), _weights(tmp_path / "bn" / "last.safetensors"), 1e-6)
    assert load_model(tmp_path / "sbn" / "last.safetensors")[1]["norm"] == "sync_bn"


def test_bf16_autocast_on_cpu_and_early_stopping(data, tmp_path):
    finetune(**base_options(data, tmp_path / "fp32", epochs=1))
    r = finetune(**base_options(data, tmp_path / "amp", epochs=1, amp="bf16"))
    assert math.isfinite(r["history"][0]["train_loss"])
    # bf16 really ran (the weights differ from the fp32 run's) and trained like fp32 (they differ
    # by far less than one epoch moved them).
    torch.manual_seed(0)  # the runs' initial weights: same seed, same constructor
    init = dz.create_model("densenet121", num_classes=4, **TINY).state_dict()
    fp32, bf16 = _weights(tmp_path / "fp32" / "last.safetensors"), _weights(tmp_path / "amp" / "last.safetensors")
    floats = [k for k in fp32 if fp32[k].is_floating_point()]
    moved = torch.cat([(fp32[k] - init[k]).double().flatten() for k in floats]).norm()
    apart = torch.cat([(bf16[k] - fp32[k]).double().flatten() for k in floats]).norm()
    assert 0 < apart < 0.05 * moved, (apart, moved)  # measured: 0.005
    # A head that barely moves: val accuracy stays put, so patience 1 stops after epoch 2.
    r = finetune(**base_options(data, tmp_path / "es", epochs=5, freeze="features", lr=1e-12, patience=1))
    assert r["stopped_early"] and r["epochs_run"] == 2 and r["best_epoch"] == 1
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        finetune(**base_options(data, tmp_path / "fp16", amp="fp16", device="cpu"))


def test_unreadable_images_are_skipped_or_fatal_with_strict_data(data, tmp_path, capsys):
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(data, copy)
    (copy / "train" / "0" / "broken.png").write_bytes(b"not an image")
    r = finetune(**base_options(copy, tmp_path / "skip", epochs=1))
    assert r["skipped_images"] == 1
    assert "skipped 1 unreadable image(s), e.g. " + str(copy / "train" / "0" / "broken.png") in capsys.readouterr().err
    with pytest.raises(ValueError, match="broken.png: unreadable image"):
        finetune(**base_options(copy, tmp_path / "strict", epochs=1, strict_data=True))
    assert not (tmp_path / "strict").exists()


def test_start_from_a_finetuned_file_takes_its_weights_and_preprocessing(run, data, tmp_path):
    src = run[0] / "best.safetensors"
    opts = base_options(data, tmp_path / "again", epochs=1, freeze="features", lr=1e-12, image_size=None, weights=str(src))
    finetune(**opts)
    before, after = _weights(src), _weights(tmp_path / "again" / "last.safetensors")
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("features."))
    assert load_model(tmp_path / "again" / "last.safetensors")[1]["preprocessing"]["size"] == 16  # from the file, not 224
