"""The ImageNet stem (conv0 -> norm0 -> relu0 -> max-pool0) as one autograd function, for the fused strategies.

Normal autograd keeps conv0's output, its normalised copy and the pool's indices (two full-resolution
maps and an int64 one: the largest tensors of the network), and its backward creates three more maps
of that size. This function keeps the input image and the batch statistics, plus conv0's output
with ``keep_conv_output``; norm + ReLU + pool run a few images at a time, and backward turns one
gradient map into conv0's output gradient in place. Running statistics are updated once, in forward.
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
from .kernels import aten, matrix, norm_relu, relu_norm_backward

_IMAGE_BYTES = 1 << 23  # images per chunk of the per-image passes: about 8 MiB of conv0 output


def stem_supported(modules: List[nn.Module], x: Tensor) -> bool:
    """Whether ``modules`` are conv0, a training-mode batch norm, ReLU and a max-pool that :class:`FusedStem` runs exactly."""
    if len(modules) != 4 or x.dim() != 4 or compute_dtype(x, casts_input=True) is None:
        return False
    if not x.is_contiguous(memory_format=torch.channels_last):  # the blocks do not all run fused: normal mode
        return False
    conv, norm, relu, pool = modules
    return (
        plain_conv(conv) and plain_batchnorm(norm) and type(relu) is nn.ReLU
        and type(pool) is nn.MaxPool2d and not pool.return_indices and no_forward_hooks(modules)
    )


def _pool_args(pool: nn.MaxPool2d) -> Tuple[List[int], ...]:
    def pair(v: Any) -> List[int]:
        return list(v) if isinstance(v, (tuple, list)) else [v, v]

    return pair(pool.kernel_size), pair(pool.stride or pool.kernel_size), pair(pool.padding), pair(pool.dilation)


def _images_per_chunk(z: Tensor) -> int:
    return max(1, _IMAGE_BYTES // max(1, z[0].numel() * z.element_size())) if z.device.type == "cpu" else z.shape[0]


class FusedStem(torch.autograd.Function):
    """``apply(modules, keep_conv_output, x, *params)`` -> ``pool0(relu0(norm0(conv0(x))))`` (channels-last)."""

    @staticmethod
    def forward(ctx: Any, modules: List[nn.Module], keep_conv_output: bool, x: Tensor, *params: Tensor) -> Tensor:
        conv, norm, _, pool = modules
        dtype = compute_dtype(x, casts_input=True)
        with torch.autocast(x.device.type, enabled=False):  # the casts autocast would make, made here
            xc = x.to(dtype).contiguous(memory_format=torch.channels_last)
            z = F.conv2d(xc, conv.weight.to(dtype), None, conv.stride, conv.padding, conv.dilation, conv.groups)
            z = z.contiguous(memory_format=torch.channels_last)
            mean, invstd = batch_statistics(norm, matrix(z))
            scale, shift = scale_shift(norm.weight, norm.bias, mean, invstd)
            step, pieces, pool_args = _images_per_chunk(z), [], _pool_args(pool)
            for i in range(0, z.shape[0], step):
                pieces.append(F.max_pool2d(norm_relu(z[i : i + step], scale.view(-1, 1, 1), shift.view(-1, 1, 1)),
                                           *pool_args, ceil_mode=pool.ceil_mode))
            out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        ctx.modules, ctx.keep_conv_output, ctx.input_dtype = modules, keep_conv_output, x.dtype
        ctx.save_for_backward(xc, mean, invstd, z if keep_conv_output else None, *params)
        return out.contiguous(memory_format=torch.channels_last)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        conv, norm, _, pool = ctx.modules
        xc, mean, invstd, z, *params = ctx.saved_tensors
        w = conv.weight.to(xc.dtype)
        if z is None:
            z = F.conv2d(xc, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
            z = z.contiguous(memory_format=torch.channels_last)
        scale, shift = scale_shift(norm.weight, norm.bias, mean, invstd)
        grad = torch.empty_like(z, memory_format=torch.channels_last)
        grad_out = grad_out.to(z.dtype)
        step, pool_args = _images_per_chunk(z), _pool_args(pool)
        for i in range(0, z.shape[0], step):  # the pool's gradient, a few images at a time
            a = norm_relu(z[i : i + step], scale.view(-1, 1, 1), shift.view(-1, 1, 1))
            _, indices = F.max_pool2d(a, *pool_args, ceil_mode=pool.ceil_mode, return_indices=True)
            aten.max_pool2d_with_indices_backward.grad_input(grad_out[i : i + step], a, *pool_args, pool.ceil_mode,
                                                             indices, grad_input=grad[i : i + step])
        grad_mat = matrix(grad)  # relu0 and norm0's backward, in place: grad becomes d loss/d conv0 output
        grad_g, grad_b = relu_norm_backward(grad_mat.__getitem__, matrix(z), mean, invstd, norm.weight, norm.bias,
                                            grad_mat, False)
        del z
        grad_x, grad_w, _ = aten.convolution_backward(
            grad, xc, w, None, list(conv.stride), list(conv.padding), list(conv.dilation), False, [0, 0], conv.groups,
            [ctx.needs_input_grad[2], conv.weight.requires_grad, False],
        )
        param_grads = ordered_grads(params, [(conv.weight, grad_w), (norm.weight, grad_g), (norm.bias, grad_b)])
        return (None, None, None if grad_x is None else grad_x.to(ctx.input_dtype), *param_grads)


def fused_stem_forward(modules: List[nn.Module], x: Tensor, keep_conv_output: bool) -> Tensor:
    conv, norm = modules[0], modules[1]
    params = [p for p in (conv.weight, norm.weight, norm.bias) if p is not None]
    return FusedStem.apply(modules, keep_conv_output, x, *params)
