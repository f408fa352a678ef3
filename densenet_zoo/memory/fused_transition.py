"""A transition (norm -> ReLU -> 1x1 conv -> 2x2 average pool) as one autograd function, for the fused strategies.

Normal autograd keeps the normalised input (as large as the block output before it) and the
convolution's output for backward, and its backward creates two more gradients of the block
output's size. This function keeps only its input, which the block before keeps anyway (the same
tensor), and the batch statistics; forward and backward run norm + ReLU + conv in row chunks
(:mod:`.kernels`), so the normalised input never exists whole and backward creates one gradient
of the input's size: the one it returns. Running statistics are updated once, in forward.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..norms.bn_math import scale_shift
from .fusion import batch_statistics, compute_dtype, no_forward_hooks, ordered_grads, plain_batchnorm, plain_conv
from .kernels import aten, conv1_chunked, conv1x1_relu_norm_backward, image_view, matrix


def _plain_pool(pool: nn.Module) -> bool:
    return (type(pool) is nn.AvgPool2d and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2))
            and pool.padding in (0, (0, 0)) and not pool.ceil_mode and pool.count_include_pad
            and pool.divisor_override is None)


def transition_supported(modules: List[nn.Module], x: Tensor) -> bool:
    """Whether ``modules`` are a standard transition that :class:`FusedTransition` computes exactly for ``x``."""
    if len(modules) != 4:
        return False
    norm, relu, conv, pool = modules
    return (
        plain_batchnorm(norm) and type(relu) is nn.ReLU and plain_conv(conv, 1) and _plain_pool(pool)
        and no_forward_hooks(modules) and x.dim() == 4 and compute_dtype(x) is not None and x.is_contiguous(memory_format=torch.channels_last)
    )


class FusedTransition(torch.autograd.Function):
    """``apply(norm, conv, x, *params)`` -> ``avg_pool2d(conv(relu(norm(x))), 2)`` (channels-last)."""

    @staticmethod
    def forward(ctx: Any, norm: nn.Module, conv: nn.Module, x: Tensor, *params: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # x has the autocast dtype already; casts are explicit
            n, c, h, w = x.shape
            x_mat = matrix(x)
            mean, invstd = batch_statistics(norm, x_mat)
            z = x.new_empty(x_mat.shape[0], conv.out_channels)
            conv1_chunked(x_mat, *scale_shift(norm.weight, norm.bias, mean, invstd), conv.weight.to(x.dtype), out=z)
            out = F.avg_pool2d(image_view(z, (n, h, w)), 2, 2)
        ctx.norm, ctx.conv, ctx.z_shape = norm, conv, (n, conv.out_channels, h, w)
        ctx.save_for_backward(x, mean, invstd, *params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, mean, invstd, *params = ctx.saved_tensors
        norm, conv = ctx.norm, ctx.conv
        # the pool's backward reads only the shape and layout of its input: an untouched placeholder
        shape_only = torch.empty(ctx.z_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        grad_z = aten.avg_pool2d_backward(grad_out.to(x.dtype), shape_only, [2, 2], [2, 2], [0, 0], False, True, None)
        del shape_only
        grad_z = matrix(grad_z.contiguous(memory_format=torch.channels_last))
        grad_x = torch.empty_like(x, memory_format=torch.channels_last)
        grad_g, grad_b, grad_w = conv1x1_relu_norm_backward(
            grad_z, matrix(x), mean, invstd, norm, conv.weight, matrix(grad_x), False, conv.weight.requires_grad,
        )
        param_grads = ordered_grads(params, [(norm.weight, grad_g), (norm.bias, grad_b), (conv.weight, grad_w)])
        return (None, None, grad_x if ctx.needs_input_grad[2] else None, *param_grads)


def fused_transition_forward(modules: List[nn.Module], x: Tensor) -> Tensor:
    norm, _, conv, _ = modules
    params = [p for p in (norm.weight, norm.bias, conv.weight) if p is not None]
    return FusedTransition.apply(norm, conv, x, *params)
