"""Batch-norm arithmetic (densenet_zoo.norms.bn_math) against independent references: float64
``torch.var_mean`` and ``nn.BatchNorm2d``."""

import pytest
import torch
import torch.nn as nn

from densenet_zoo.norms.bn_math import acc_dtype, average_factor, inv_std, moments, scale_shift, update_running_stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("step", [None, 1, 3, 7])
@pytest.mark.parametrize("layout", ["matrix", "nchw", "channels_last"])
def test_moments_match_a_float64_reference_whatever_the_slices(dtype, step, layout):
    torch.manual_seed(0)
    x = (torch.randn(7, 5, 4, 3) * 3 + 100).to(dtype)  # a large mean: one-pass sums of squares would cancel
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "matrix":
        x = x.permute(0, 2, 3, 1).reshape(-1, 5)
        dims, shape, temp = (0,), (), torch.empty(x.numel(), dtype=acc_dtype(dtype))
    else:
        dims, shape, temp = (0, 2, 3), (-1, 1, 1), None
    mean, m2 = moments(x, dims, step, temp, channel_shape=shape)
    count = x.numel() // x.shape[1]
    var_ref, mean_ref = torch.var_mean(x.double(), dims, correction=0)
    assert mean.dtype == m2.dtype == acc_dtype(dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(mean.double(), mean_ref, rtol=tol, atol=0)
    assert torch.allclose(m2.double() / count, var_ref, rtol=1e-4 if dtype != torch.float64 else 1e-10, atol=0)


def test_accumulation_dtype():
    assert acc_dtype(torch.float16) == acc_dtype(torch.bfloat16) == torch.float32
    assert acc_dtype(torch.float32) == torch.float32 and acc_dtype(torch.float64) == torch.float64


@pytest.mark.parametrize("affine", [True, False])
def test_scale_shift_reproduces_batchnorm_in_eval(affine):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6, affine=affine).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.1, 3)
        if affine:
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    scale, shift = scale_shift(bn.weight, bn.bias, bn.running_mean, inv_std(bn.running_var, bn.eps))
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    assert torch.allclose(x * scale.view(-1, 1, 1) + shift.view(-1, 1, 1), bn(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stat_update_matches_batchnorm(momentum):
    torch.manual_seed(0)
    ref, ours = nn.BatchNorm2d(4, momentum=momentum).double(), nn.BatchNorm2d(4, momentum=momentum).double()
    for _ in range(3):
        x = torch.randn(5, 4, 3, 3, dtype=torch.float64) * 2 + 1
        ref(x)
        mean, m2 = moments(x, (0, 2, 3), channel_shape=(-1, 1, 1))
        update_running_stats(ours, average_factor(ours), x.numel() // 4, mean, m2)
    assert torch.equal(ref.num_batches_tracked, ours.num_batches_tracked)
    assert torch.allclose(ref.running_mean, ours.running_mean, rtol=1e-12, atol=1e-14)
    assert torch.allclose(ref.running_var, ours.running_var, rtol=1e-12, atol=1e-14)


def test_no_running_stats_no_update():
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    assert average_factor(bn) == 0.0
