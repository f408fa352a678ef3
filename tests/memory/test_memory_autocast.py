"""The fused strategies under autocast (bfloat16 on CPU) against normal mode under the same autocast.

bfloat16 keeps 8 significant bits, and the fused block rounds at other places than normal mode
(scale and shift of each norm, statistics shared across layers), so the tolerance is relative to
how far normal mode under autocast is from normal mode in float32: the same order, not bit equality.
"""

import copy

import pytest
import torch
import torch.nn as nn

import densenet_zoo as dz

pytestmark = pytest.mark.numerics  # run again with kernels capped at AVX2 (Makefile: make test)

FUSED = ("fused", "fused_lean")


def _model():
    torch.manual_seed(0)
    return dz.DenseNet(growth_rate=8, block_config=(4, 4), num_init_features=16, small_inputs=True, num_classes=5).train()


def _step(model, x, y, dtype):
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = model(x)
    nn.functional.cross_entropy(out.float(), y).backward()
    return out.detach().float()


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("strategy", FUSED)
def test_fused_under_bf16_autocast_matches_normal_mode_to_the_format(strategy, monkeypatch):
    from densenet_zoo.memory import fused_block as fused

    calls, real = [], fused.FusedDenseBlock.apply
    monkeypatch.setattr(fused.FusedDenseBlock, "apply", lambda *a: calls.append(a[2].dtype) or real(*a))
    base = _model()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    reference = copy.deepcopy(base)
    normal = copy.deepcopy(base)
    ours = copy.deepcopy(base).set_memory_efficient(strategy)
    out_fp32 = _step(reference, x, y, None)
    out_normal = _step(normal, x, y, torch.bfloat16)
    out_ours = _step(ours, x, y, torch.bfloat16)
    assert calls == [torch.bfloat16, torch.bfloat16]  # both blocks ran fused, in bfloat16

    format_error = max(_rel(out_normal, out_fp32), 2**-8)
    assert _rel(out_ours, out_normal) < 4 * format_error
    for (name, p), q, r in zip(normal.named_parameters(), ours.parameters(), reference.parameters()):
        assert q.grad.dtype == p.dtype == torch.float32, name
        assert _rel(q.grad, p.grad) < 4 * max(_rel(p.grad, r.grad), 2**-7), name
    for (name, a), b in zip(normal.named_buffers(), ours.buffers()):
        if a.dtype == torch.long:
            assert torch.equal(a, b), name  # num_batches_tracked: one update per forward
        else:
            assert _rel(b, a) < 2**-6, name


def test_fused_under_autocast_saves_less_than_normal_mode_under_autocast():
    from densenet_zoo.memory import SavedTensorBytes

    x = torch.randn(4, 3, 32, 32)
    saved = {}
    for mode in ("none",) + FUSED:
        model = _model().set_memory_efficient(mode)
        with SavedTensorBytes(exclude=model.parameters()) as counter, torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
        saved[mode] = counter.bytes
    assert saved["fused_lean"] < saved["fused"] < 0.7 * saved["none"]


@pytest.mark.parametrize("strategy", ["efficient", "shared", "norms", "layer"])
def test_per_layer_recompute_under_bf16_autocast_matches_normal_mode(strategy, monkeypatch):
    from densenet_zoo.memory import recompute

    calls, real = [], recompute.RecomputedStages.apply
    monkeypatch.setattr(recompute.RecomputedStages, "apply", lambda *a: calls.append(1) or real(*a))
    base = _model()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    reference, normal, ours = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base).set_memory_efficient(strategy)
    out_fp32 = _step(reference, x, y, None)
    out_normal = _step(normal, x, y, torch.bfloat16)
    out_ours = _step(ours, x, y, torch.bfloat16)
    assert len(calls) >= 8  # every layer ran the recompute function, not the checkpoint fallback
    assert _rel(out_ours, out_normal) < 4 * max(_rel(out_normal, out_fp32), 2**-8)
    for (name, p), q, r in zip(normal.named_parameters(), ours.parameters(), reference.parameters()):
        assert q.grad.dtype == torch.float32, name
        assert _rel(q.grad, p.grad) < 4 * max(_rel(p.grad, r.grad), 2**-7), name
    for (name, a), b in zip(normal.named_buffers(), ours.buffers()):
        if a.dtype == torch.long:
            assert torch.equal(a, b), name
