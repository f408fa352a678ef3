"""The fused block's chunked kernels and its scratch buffer.

The tests elsewhere run small images, whose matrices fit in one chunk; here the chunks are made a
few rows long, so that every chunk boundary, and a last chunk shorter than the others, is crossed.
"""

import copy
import threading

import pytest
import torch
import torch.nn as nn

import densenet_zoo as dz
from densenet_zoo.memory import kernels, release_workspaces, workspace, workspace_bytes
from densenet_zoo.memory.workspace import scratch

pytestmark = pytest.mark.numerics  # run again with kernels capped at AVX2 (Makefile: make test)

FUSED = ("fused", "fused_lean")


def _tiny(**kwargs):
    return dz.DenseNet(growth_rate=8, block_config=(3, 3), num_init_features=16, small_inputs=True, num_classes=5, **kwargs)


def _step(model, x, y):
    out = model.train()(x)
    nn.functional.cross_entropy(out, y).backward()
    return out.detach()


@pytest.mark.parametrize("strategy", FUSED)
@pytest.mark.parametrize("rows", [1, 7, 100])
def test_fused_block_in_short_chunks_equals_normal_mode_in_float64(strategy, rows, monkeypatch):
    monkeypatch.setattr(kernels, "chunk_rows", lambda cols, like: rows)
    torch.manual_seed(0)
    normal = _tiny().double()
    fused = copy.deepcopy(normal).set_memory_efficient(strategy)
    x, y = torch.randn(3, 3, 12, 12, dtype=torch.float64), torch.randint(0, 5, (3,))  # 432 and 108 rows per block
    assert torch.allclose(_step(normal, x, y), _step(fused, x, y), atol=1e-10, rtol=0)
    for (name, p), q in zip(normal.named_parameters(), fused.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-10, rtol=1e-8), name
    for (name, a), b in zip(normal.named_buffers(), fused.buffers()):
        assert torch.allclose(a.double(), b.double(), atol=1e-10, rtol=0), name


def test_relu_norm_backward_matches_autograd():
    torch.manual_seed(0)
    x = torch.randn(37, 5, dtype=torch.float64) * 3 + 1
    weight, bias = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    g = torch.randn(37, 5, dtype=torch.float64)
    leaf, w, b = (t.clone().requires_grad_() for t in (x, weight, bias))
    out = torch.relu(nn.functional.batch_norm(leaf, None, None, w, b, training=True, eps=1e-5))
    expected = torch.autograd.grad(out, (leaf, w, b), g)

    mean, var = x.mean(0), x.var(0, unbiased=False)
    grad_x = torch.full_like(x, 0.5)  # accumulate: added to what is there
    seen = []
    gw, gb = kernels.relu_norm_backward(g.clone().__getitem__, x, mean, (var + 1e-5).rsqrt(), weight, bias, grad_x,
                                          True, lambda rows, a: seen.append((rows, a.clone())))
    assert torch.allclose(grad_x - 0.5, expected[0], atol=1e-12)
    assert torch.allclose(gw, expected[1], atol=1e-12) and torch.allclose(gb, expected[2], atol=1e-12)
    assert torch.allclose(torch.cat([a for _, a in seen]), out.detach(), atol=1e-12)  # the recomputed output


def test_scratch_is_reused_grows_and_is_released():
    release_workspaces()
    like = torch.empty(0)
    with scratch(like, [10, 20]) as (a, b):
        first = a.data_ptr()
        assert (a.numel(), b.numel()) == (10, 20) and b.data_ptr() == first + 10 * 4
        with scratch(like, [5]) as (nested,):  # a nested request gets its own memory
            assert not (first <= nested.data_ptr() < first + 30 * 4)
    with scratch(like, [30]) as (again,):
        assert again.data_ptr() == first  # the same buffer, step after step
    with scratch(like, [1000]) as (bigger,):
        assert bigger.numel() == 1000
    assert workspace_bytes() == 1000 * 4
    assert release_workspaces() == 4000 and workspace_bytes() == 0


def test_scratch_is_per_thread():
    release_workspaces()
    ptrs = []

    def use():
        with scratch(torch.empty(0), [64]) as (t,):
            ptrs.append(t.data_ptr())
            barrier.wait()

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ptrs)) == 2


@pytest.mark.parametrize("strategy", FUSED)
def test_fused_results_do_not_live_in_the_scratch_buffer(strategy):
    """What leaves the block (its output, the input's gradient) is its own memory: the scratch buffer is
    overwritten by the next block and the next step."""
    release_workspaces()
    model = _tiny(memory_efficient=strategy).train()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    outs = []
    model.features.denseblock1.register_forward_hook(lambda m, i, o: outs.append(o))
    model(x).sum().backward()
    buffers = list(workspace._local.buffers.values())
    assert buffers
    for buffer in buffers:
        lo, hi = buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * buffer.element_size()
        for t in (outs[0], x.grad, model.features.denseblock1.denselayer1.conv1.weight.grad):
            assert not (lo <= t.data_ptr() < hi)
    grad = x.grad.clone()
    model.zero_grad()
    model(torch.randn(2, 3, 16, 16)).sum().backward()  # another step reuses the scratch buffer
    assert torch.equal(grad, x.grad)


def _count(monkeypatch, function):
    calls, real = [], function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("strategy", FUSED)
def test_stem_and_transitions_run_as_one_function_and_equal_normal_mode(strategy, monkeypatch):
    from densenet_zoo.memory import fused_stem as stem, fused_transition as transition

    calls = _count(monkeypatch, transition.FusedTransition)
    stem_calls = _count(monkeypatch, stem.FusedStem)
    monkeypatch.setattr(kernels, "chunk_rows", lambda cols, like: 50)
    monkeypatch.setattr(stem, "_IMAGE_BYTES", 1)  # one image per chunk
    torch.manual_seed(0)
    normal = dz.DenseNet(growth_rate=8, block_config=(2, 2, 2), num_init_features=16, num_classes=5).double()
    fused = copy.deepcopy(normal).set_memory_efficient(strategy)
    x, y = torch.randn(2, 3, 64, 64, dtype=torch.float64), torch.randint(0, 5, (2,))
    for _ in range(2):
        assert torch.allclose(_step(normal, x, y), _step(fused, x, y), atol=1e-10, rtol=0)
    assert len(calls) == 4 and len(stem_calls) == 2  # two transitions and the stem, two steps
    for (name, p), q in zip(normal.named_parameters(), fused.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-10, rtol=1e-8), name
    for (name, a), b in zip(normal.named_buffers(), fused.buffers()):
        assert torch.allclose(a.double(), b.double(), atol=1e-10, rtol=0), name  # num_batches_tracked: 2 == 2


def test_transition_with_other_modules_is_not_fused(monkeypatch):
    from densenet_zoo.memory import fused_transition as transition

    calls = _count(monkeypatch, transition.FusedTransition)
    normal = dz.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5).double()
    normal.features.transition1.pool = nn.MaxPool2d(2, 2)
    model = copy.deepcopy(normal).set_memory_efficient("fused")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for m in (normal, model):
        m.train()(x).square().sum().backward()
    assert calls == []
    # the transition that runs as modules still gives normal mode's gradients (the other blocks stay fused)
    for (name, p), q in zip(normal.named_parameters(), model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-10, rtol=1e-8), name


@pytest.mark.parametrize("strategy", FUSED)
def test_stem_and_transitions_under_bf16_autocast_match_normal_mode_to_the_format(strategy, monkeypatch):
    from densenet_zoo.memory import fused_stem as stem, fused_transition as transition

    calls, stem_calls = _count(monkeypatch, transition.FusedTransition), _count(monkeypatch, stem.FusedStem)
    torch.manual_seed(0)
    reference = dz.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5)
    normal, fused = copy.deepcopy(reference), copy.deepcopy(reference).set_memory_efficient(strategy)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 5, (4,))

    def step(model, autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model.train()(x)
        nn.functional.cross_entropy(out.float(), y).backward()
        return out.float().detach()

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    out_ref, out_normal, out_fused = step(reference, False), step(normal, True), step(fused, True)
    assert len(calls) == len(stem_calls) == 1
    assert rel(out_fused, out_normal) < 4 * max(rel(out_normal, out_ref), 2**-8)
    for (name, p), q, r in zip(normal.named_parameters(), fused.parameters(), reference.parameters()):
        assert q.grad.dtype == torch.float32 and rel(q.grad, p.grad) < 4 * max(rel(p.grad, r.grad), 2**-7), name


@pytest.mark.parametrize("strategy", FUSED)
@pytest.mark.parametrize("where", ["features.norm0", "features.transition1.conv", "features.denseblock1.denselayer1.norm2"])
def test_forward_hooks_still_fire_under_the_fused_strategies(strategy, where):
    """A fused function calls no modules: where a module has a forward hook, that part runs as before."""
    normal = dz.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5).double()
    model = copy.deepcopy(normal).set_memory_efficient(strategy)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    seen = {}
    for key, m in (("normal", normal), ("fused", model)):
        m.get_submodule(where).register_forward_hook(lambda mod, i, o, key=key: seen.setdefault(key, []).append(o.detach().clone()))
        m.train()(x).square().sum().backward()
    # the forward's call sees normal mode's output (a part recomputed in backward may call it again)
    assert len(seen["normal"]) == 1 and len(seen["fused"]) >= 1
    assert torch.allclose(seen["fused"][0], seen["normal"][0], atol=1e-10, rtol=0)
    for (name, p), q in zip(normal.named_parameters(), model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-10, rtol=1e-8), name
