"""Every memory strategy and the fused function on a CUDA GPU (skipped without one).

float64 where the strategies are exact (no TF32, no reduced-precision reductions), the autocast
formats against normal mode under the same autocast, and the profiler on the device.
"""

import copy

import pytest
import torch

import densenet_zoo as dz
from _train_helpers import sgd_steps

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
STRATEGIES = [s for s in dz.list_memory_strategies() if s != "none"]
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _no_tf32():
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _model(**kwargs):
    torch.manual_seed(0)
    config = dict(growth_rate=8, block_config=(3, 3), num_init_features=16, small_inputs=True, num_classes=5)
    return dz.DenseNet(**{**config, **kwargs}).to(DEVICE).train()


def _steps(model, xs, ys, dtype=None):
    return [out.float() for out in sgd_steps(model, zip(xs, ys), autocast=dtype)]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_equals_normal_mode_on_cuda_in_float64(strategy):
    base = _model().double()
    g = torch.Generator(device=DEVICE).manual_seed(1)
    xs = [torch.randn(4, 3, 16, 16, device=DEVICE, dtype=torch.float64, generator=g) for _ in range(2)]
    ys = [torch.randint(0, 5, (4,), device=DEVICE, generator=g) for _ in range(2)]
    normal, ours = copy.deepcopy(base), copy.deepcopy(base).set_memory_efficient(strategy)
    for a, b in zip(_steps(normal, xs, ys), _steps(ours, xs, ys)):
        assert torch.allclose(a, b, atol=1e-9, rtol=0)
    for (name, p), q in zip(normal.named_parameters(), ours.parameters()):
        assert torch.allclose(p, q, atol=1e-9, rtol=0) and torch.allclose(p.grad, q.grad, atol=1e-9, rtol=1e-7), name
    for (name, a), b in zip(normal.named_buffers(), ours.buffers()):
        assert torch.allclose(a.double(), b.double(), atol=1e-9, rtol=0), name  # running stats updated once


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", ["fused", "fused_lean"])
def test_fused_under_cuda_autocast_matches_normal_mode_to_the_format(strategy, dtype, monkeypatch):
    from densenet_zoo.memory import fused_block as fused

    calls, real = [], fused.FusedDenseBlock.apply
    monkeypatch.setattr(fused.FusedDenseBlock, "apply", lambda *a: calls.append(a[2].dtype) or real(*a))
    base = _model(block_config=(4, 4))
    x, y = [torch.randn(4, 3, 16, 16, device=DEVICE)], [torch.randint(0, 5, (4,), device=DEVICE)]
    reference, normal, ours = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base).set_memory_efficient(strategy)
    (out_fp32,), (out_normal,), (out_ours,) = _steps(reference, x, y), _steps(normal, x, y, dtype), _steps(ours, x, y, dtype)
    assert calls == [dtype, dtype]
    assert _rel(out_ours, out_normal) < 4 * max(_rel(out_normal, out_fp32), 2**-8)
    for (name, p), q, r in zip(normal.named_parameters(), ours.parameters(), reference.parameters()):
        assert q.grad.dtype == torch.float32, name
        assert _rel(q.grad, p.grad) < 4 * max(_rel(p.grad, r.grad), 2**-7), name


@pytest.mark.parametrize("strategy", ["fused", "fused_lean"])
def test_fused_stem_and_transitions_on_cuda_in_float64_and_bf16(strategy, monkeypatch):
    from densenet_zoo.memory import fused_stem as stem, fused_transition as transition

    calls = []
    for function in (stem.FusedStem, transition.FusedTransition):
        monkeypatch.setattr(function, "apply", (lambda real: lambda *a: calls.append(1) or real(*a))(function.apply))
    base = _model(small_inputs=False, block_config=(2, 2, 2))  # the ImageNet stem, two transitions
    g = torch.Generator(device=DEVICE).manual_seed(1)
    xs = [torch.randn(2, 3, 64, 64, device=DEVICE, generator=g) for _ in range(2)]
    ys = [torch.randint(0, 5, (2,), device=DEVICE, generator=g) for _ in range(2)]
    normal, ours = copy.deepcopy(base).double(), copy.deepcopy(base).double().set_memory_efficient(strategy)
    for a, b in zip(_steps(normal, [x.double() for x in xs], ys), _steps(ours, [x.double() for x in xs], ys)):
        assert torch.allclose(a, b, atol=1e-9, rtol=0)
    for (name, p), q in zip(normal.named_parameters(), ours.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-9, rtol=1e-7), name
    assert len(calls) == 6  # stem and two transitions, two steps
    reference, normal, ours = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base).set_memory_efficient(strategy)
    (out_fp32,), (out_normal,), (out_ours,) = (_steps(m, xs[:1], ys[:1], d) for m, d in
                                               ((reference, None), (normal, torch.bfloat16), (ours, torch.bfloat16)))
    assert _rel(out_ours, out_normal) < 4 * max(_rel(out_normal, out_fp32), 2**-8)


def test_fused_function_directly_on_cuda_gradcheck_in_float64():
    from densenet_zoo.memory.fused_block import fused_block_forward

    block = _model().double().features.denseblock1
    x = torch.randn(2, 16, 6, 6, device=DEVICE, dtype=torch.float64, requires_grad=True)
    for keep in (True, False):
        with torch.random.fork_rng(devices=[0]):
            ours = fused_block_forward(block, x, keep)
        expected = dz.memory.MemoryStrategy().block_forward(block, x)
        assert torch.allclose(ours, expected, atol=1e-10)
        g = torch.randn_like(ours)
        (a,) = torch.autograd.grad(ours, x, g)
        (b,) = torch.autograd.grad(expected, x, g)
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.timeout(300)
def test_profiler_on_cuda_reports_every_mode():
    report = dz.profile("densenet_bc_100", batch_size=4, image_size=32, modes="all", device=DEVICE, steps=1,
                        model_kwargs=dict(growth_rate=12, block_config=[6, 6, 6], num_init_features=24))
    for row in report.rows:
        assert "error" not in row, row
        assert row["peak_bytes"] > 0 and row["step_s"] > 0 and row["allocator"] == "cuda caching allocator"
    assert report.row("fused_lean")["peak_bytes"] < report.row("none")["peak_bytes"]
    bf16 = dz.profile("densenet_bc_100", batch_size=4, image_size=32, modes="none,fused", device=DEVICE, steps=1,
                      autocast="bfloat16", model_kwargs=dict(growth_rate=8, block_config=[2, 2, 2], num_init_features=16))
    assert bf16.meta["autocast"] == "bfloat16" and all("error" not in r for r in bf16.rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_run_on_cuda_and_match_the_torch_path(dtype, monkeypatch):
    from densenet_zoo.memory import triton_kernels

    pytest.importorskip("triton")
    calls, real = [], triton_kernels._launch
    monkeypatch.setattr(triton_kernels, "_launch", lambda name, *a, **k: calls.append(name) or real(name, *a, **k))
    base = _model(block_config=(4, 4)).set_memory_efficient("fused")
    g = torch.Generator(device=DEVICE).manual_seed(2)
    xs, ys = [torch.randn(8, 3, 16, 16, device=DEVICE, generator=g)], [torch.randint(0, 5, (8,), device=DEVICE, generator=g)]
    autocast = None if dtype == torch.float32 else dtype
    kernels, plain, reference = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base).set_memory_efficient("none")
    (out_k,) = _steps(kernels, xs, ys, autocast)
    assert {"column_sums", "norm_relu", "relu_norm_backward"} <= set(calls)
    monkeypatch.setenv("DENSENET_ZOO_KERNELS", "torch")
    (out_t,) = _steps(plain, xs, ys, autocast)
    (out_r,) = _steps(reference, xs, ys, autocast)
    spread = max(_rel(out_t, out_r), 1e-6 if dtype == torch.float32 else 2**-8)
    assert _rel(out_k, out_t) < 4 * spread
    for (name, p), q, r in zip(plain.named_parameters(), kernels.parameters(), reference.parameters()):
        assert _rel(q.grad, p.grad) < 4 * max(_rel(p.grad, r.grad), 1e-5 if dtype == torch.float32 else 2**-7), name


@pytest.mark.parametrize("strategy", ["fused", "fused_lean"])
def test_compiled_fused_on_cuda_trains_like_eager_normal_mode(strategy):
    torch._dynamo.reset()
    base = _model().double()
    g = torch.Generator(device=DEVICE).manual_seed(1)
    xs = [torch.randn(4, 3, 16, 16, device=DEVICE, dtype=torch.float64, generator=g) for _ in range(2)]
    ys = [torch.randint(0, 5, (4,), device=DEVICE, generator=g) for _ in range(2)]
    normal, ours = copy.deepcopy(base), copy.deepcopy(base).set_memory_efficient(strategy)
    compiled = torch.compile(ours, fullgraph=True)
    outs_n, outs_c = _steps(normal, xs, ys), _steps(compiled, xs, ys)
    for a, b in zip(outs_n, outs_c):
        assert torch.allclose(a, b, atol=1e-9, rtol=0)
    for (name, p), q in zip(normal.named_parameters(), ours.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-9, rtol=1e-7), name
    for (name, a), b in zip(normal.named_buffers(), ours.buffers()):
        assert torch.allclose(a.double(), b.double(), atol=1e-9, rtol=0), name
