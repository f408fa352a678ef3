"""The fused block's Triton kernels, run on CPU tensors by Triton's interpreter (``TRITON_INTERPRET=1``).

Triton reads ``TRITON_INTERPRET`` when its language module is imported, so the checks run in a
process started with it: :func:`test_kernels_under_the_interpreter` starts pytest on this file so.

Each kernel against the same arithmetic in torch operations, on strided matrices whose sizes are
not multiples of the tile; then whole fused blocks and a model with the kernels on, against normal
mode in float64. The same kernels compile for CUDA tensors (tests/memory/test_memory_cuda.py).
"""

import copy
import os
import subprocess
import sys

import pytest
import torch

import densenet_zoo as dz
from densenet_zoo.memory import triton_kernels
from _train_helpers import sgd_steps

pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 process that "
                                 "test_kernels_under_the_interpreter starts")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.timeout(600)
def test_kernels_under_the_interpreter():
    if INTERPRETED:
        pytest.skip("this is the interpreted run")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("DENSENET_ZOO_KERNELS", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          capture_output=True, text=True, env=env, timeout=580)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " skipped" in proc.stdout  # every check ran there; this one skipped


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.delenv("DENSENET_ZOO_KERNELS", raising=False)
    assert triton_kernels.enabled(torch.zeros(1))


def _strided(rows, cols, dtype, generator):
    """Columns 3..3+cols of a wider matrix: the layout of a slice of the block buffer."""
    return torch.randn(rows, cols + 7, generator=generator, dtype=torch.float64).to(dtype)[:, 3 : 3 + cols]


@interpreted
@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_column_sums(dtype):
    g = torch.Generator().manual_seed(0)
    x = _strided(150, 70, dtype, g) + 3
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean = x.to(acc).mean(0)
    tol = dict(rtol=1e-12, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(triton_kernels.column_sums(x, acc), x.to(acc).sum(0), **tol)
    torch.testing.assert_close(triton_kernels.column_sums(x, acc, mean), (x.to(acc) - mean).square().sum(0), **tol)


@interpreted
@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_norm_relu(dtype):
    g = torch.Generator().manual_seed(1)
    x = _strided(100, 65, dtype, g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale, shift = torch.randn(65, generator=g, dtype=acc), torch.randn(65, generator=g, dtype=acc)
    out = torch.empty(100, 65, dtype=dtype)
    triton_kernels.norm_relu(x, scale, shift, out)
    expected = (x.to(acc) * scale + shift).relu().to(dtype)
    torch.testing.assert_close(out, expected, rtol=1e-12 if dtype == torch.float64 else 1e-2, atol=1e-12)


@interpreted
@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("with_output", [True, False])
def test_relu_norm_backward_pass(accumulate, with_output):
    g = torch.Generator().manual_seed(2)
    rows, cols = 130, 66
    x, grad = _strided(rows, cols, torch.float64, g), _strided(rows, cols, torch.float64, g)
    scale, shift = torch.randn(cols, generator=g, dtype=torch.float64), torch.randn(cols, generator=g, dtype=torch.float64)
    mean = x.mean(0)
    grad_x = _strided(rows, cols, torch.float64, g)
    expected_grad_x = grad_x.clone()
    output = torch.empty(rows, cols, dtype=torch.float64) if with_output else None

    sum_g, sum_gx = triton_kernels.relu_norm_backward_pass(grad, x, scale, shift, mean, grad_x, accumulate, output)
    pre = x * scale + shift
    masked = torch.where(pre > 0, grad, 0)
    expected_grad_x = expected_grad_x + masked * scale if accumulate else masked * scale
    torch.testing.assert_close(sum_g, masked.sum(0), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(sum_gx, (masked * (x - mean)).sum(0), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(grad_x, expected_grad_x, rtol=1e-12, atol=1e-12)
    if with_output:
        torch.testing.assert_close(output, pre.relu(), rtol=1e-12, atol=1e-12)


@interpreted
@pytest.mark.usefixtures("interpreter")
def test_offsets_past_32_bits():
    # Three rows 2**30 elements apart: the last row starts at element 2**31, past a 32-bit offset (a large
    # batch's block buffer). The storage is 4 GiB of address space, of which only the rows' few elements are written.
    stride, cols = 2**30, 5
    storage = torch.empty(2 * stride + 3 * cols, dtype=torch.bfloat16)
    x, grad, grad_x = (storage.as_strided((3, cols), (stride, 1), k * cols) for k in range(3))
    g = torch.Generator().manual_seed(4)
    values = [torch.randn(3, cols, generator=g).to(torch.bfloat16) for _ in range(3)]
    for t, v in zip((x, grad, grad_x), values):
        for r in range(3):
            t[r] = v[r]
    xv, gv, gxv = (v.float() for v in values)
    mean = xv.mean(0)
    scale, shift = torch.randn(cols, generator=g), torch.randn(cols, generator=g)
    torch.testing.assert_close(triton_kernels.column_sums(x, torch.float32), xv.sum(0))
    torch.testing.assert_close(triton_kernels.column_sums(x, torch.float32, mean), (xv - mean).square().sum(0))
    out = torch.empty(3, cols, dtype=torch.bfloat16)
    triton_kernels.norm_relu(x, scale, shift, out)
    torch.testing.assert_close(out, (xv * scale + shift).relu().to(torch.bfloat16))
    sum_g, sum_gx = triton_kernels.relu_norm_backward_pass(grad, x, scale, shift, mean, grad_x, True)
    masked = torch.where(xv * scale + shift > 0, gv, 0)
    torch.testing.assert_close(sum_g, masked.sum(0))
    torch.testing.assert_close(sum_gx, (masked * (xv - mean)).sum(0))
    torch.testing.assert_close(torch.stack([grad_x[r] for r in range(3)]), (gxv + masked * scale).to(torch.bfloat16))


def _model():
    torch.manual_seed(0)
    return dz.DenseNet(growth_rate=8, block_config=(3, 2), num_init_features=16, small_inputs=True, num_classes=5).train()


@interpreted
@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("strategy", ["fused", "fused_lean"])
def test_model_with_the_kernels_trains_like_normal_mode_in_float64(strategy, monkeypatch):
    calls = []
    real = triton_kernels._launch
    monkeypatch.setattr(triton_kernels, "_launch", lambda name, *a, **k: calls.append(name) or real(name, *a, **k))
    base = _model().double()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(3, 3, 12, 12, generator=g, dtype=torch.float64), torch.randint(0, 5, (3,), generator=g))
            for _ in range(2)]
    normal, ours = copy.deepcopy(base), copy.deepcopy(base).set_memory_efficient(strategy)
    for model in (normal, ours):
        sgd_steps(model, data)
    assert {"column_sums", "norm_relu", "relu_norm_backward"} <= set(calls)  # the kernels ran, not the torch path
    for (name, p), q in zip(normal.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-11, msg=name)
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11, msg=name)
    for (name, a), b in zip(normal.named_buffers(), ours.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=name)


def test_the_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("DENSENET_ZOO_KERNELS", "torch")
    assert not triton_kernels.enabled(torch.zeros(1))
    monkeypatch.setenv("DENSENET_ZOO_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_kernels.enabled(torch.zeros(1))  # a CPU tensor without the interpreter: the torch path
