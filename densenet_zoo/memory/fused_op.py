"""The fused dense block as two operators of ``torch.library``, so that ``torch.compile`` keeps it.

The compiler cannot trace the fused block's autograd function (it calls modules, reuses scratch
memory and updates running statistics in place), and a graph break there would split the model. As
the operators ``densenet_zoo::fused_dense_block`` and ``densenet_zoo::fused_dense_block_backward``
(with a registered autograd formula and shape functions) the block is one opaque node in the
compiled graph: the compiler saves for backward what the operator returns (the block's output
buffer, batch statistics and, for ``fused``, conv1's outputs), exactly what the eager function
keeps, and compiles everything around it.

Operators must be functional to have an autograd formula: the forward returns the new running
statistics and :func:`fused_block_op_forward` copies them into the norms' buffers, once.
Supported: blocks whose norms all have affine parameters and running statistics (every
torchvision and timm DenseNet); others run the strategy's fallback.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..norms.bn_math import acc_dtype
from .fused_block import LAYER_PARAMETERS, BlockSaved, block_backward, block_forward, layer_parameters

_PER_LAYER = len(LAYER_PARAMETERS)
_NO_MOMENTUM = -1.0  # a norm with ``momentum=None`` (cumulative average): float lists cannot hold None


def op_supported(block: nn.ModuleDict) -> bool:
    """Whether the operator form can run this block: every norm has affine parameters and running statistics."""
    return all(
        norm.affine and norm.track_running_stats and norm.running_mean is not None and norm.num_batches_tracked is not None
        for layer in block.values() for norm in (layer.norm1, layer.norm2)
    )


def _norms(block_layers: Sequence[nn.Module]) -> List[nn.Module]:
    return [norm for layer in block_layers for norm in (layer.norm1, layer.norm2)]


def _proxy_layers(params: Sequence[Tensor], stats: Sequence[Tensor], eps: Sequence[float],
                  momentum: Sequence[float]) -> List[SimpleNamespace]:
    """Objects with a dense layer's attributes (what :func:`block_forward` reads) over the operator's tensors."""

    def norm(i: int, weight: Tensor, bias: Tensor) -> SimpleNamespace:
        return SimpleNamespace(weight=weight, bias=bias, running_mean=stats[3 * i], running_var=stats[3 * i + 1],
                               num_batches_tracked=stats[3 * i + 2], eps=eps[i], track_running_stats=True,
                               momentum=None if momentum[i] == _NO_MOMENTUM else momentum[i])

    def conv(weight: Tensor) -> SimpleNamespace:
        return SimpleNamespace(weight=weight, out_channels=weight.shape[0])

    layers = []
    for i in range(len(params) // _PER_LAYER):
        w = params[_PER_LAYER * i : _PER_LAYER * (i + 1)]
        layers.append(SimpleNamespace(norm1=norm(2 * i, w[0], w[1]), conv1=conv(w[2]), norm2=norm(2 * i + 1, w[3], w[4]),
                                      conv2=conv(w[5])))
    return layers


@torch.library.custom_op("densenet_zoo::fused_dense_block", mutates_args=())
def fused_dense_block(x: Tensor, params: List[Tensor], stats: List[Tensor], eps: List[float], momentum: List[float],
                      keep_conv_output: bool) -> List[Tensor]:
    """The fused block's forward. ``params``: every layer's parameters (:data:`LAYER_PARAMETERS`
    order); ``stats``: every norm's running mean, running variance and batch count, norm1 then norm2,
    layer after layer; ``eps`` and ``momentum`` per norm, in the same order.

    Returns ``[out, means, variances, norm2_means, norm2_invstds, *conv1_outputs, *new_stats]``.
    """
    new_stats = [s.clone() for s in stats]
    with torch.autocast(x.device.type, enabled=False):
        saved = block_forward(_proxy_layers(params, new_stats, eps, momentum), keep_conv_output, x)
    return [*saved[:5], *saved.kept, *new_stats]


@fused_dense_block.register_fake
def _(x: Tensor, params: List[Tensor], stats: List[Tensor], eps: List[float], momentum: List[float],
      keep_conv_output: bool) -> List[Tensor]:
    n, c0, h, w = x.shape
    layers = len(params) // _PER_LAYER
    width, growth = params[2].shape[0], params[5].shape[0]
    total = c0 + growth * layers
    acc = acc_dtype(x.dtype)
    out = torch.empty((n, total, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    statistics = [x.new_empty(total, dtype=acc), x.new_empty(total, dtype=acc),
                  x.new_empty((layers, width), dtype=acc), x.new_empty((layers, width), dtype=acc)]
    kept = [x.new_empty((n * h * w, width)) for _ in range(layers)] if keep_conv_output else []
    return [out, *statistics, *kept, *(torch.empty_like(s) for s in stats)]


@torch.library.custom_op("densenet_zoo::fused_dense_block_backward", mutates_args=())
def fused_dense_block_backward(grad_out: Tensor, saved: List[Tensor], params: List[Tensor], eps: List[float],
                               want_input: bool, wants: List[bool]) -> List[Tensor]:
    """The fused block's backward: ``[grad_input, *parameter_grads]``; an empty tensor where a
    gradient is not wanted. ``saved``: the forward's ``out, means, variances, norm2_means,
    norm2_invstds, *conv1_outputs``."""
    layers = _proxy_layers(params, [None] * (len(eps) * 3), eps, [0.0] * len(eps))
    out = saved[0]
    c0 = out.shape[1] - sum(layer.conv2.out_channels for layer in layers)
    with torch.autocast(grad_out.device.type, enabled=False):
        grad_x, grads = block_backward(layers, BlockSaved(*saved[:5], list(saved[5:])), c0, grad_out, want_input, wants)
    return [_empty(grad_out) if grad_x is None else grad_x,
            *(_empty(grad_out) if g is None else _like(g, p) for g, p in zip(grads, params))]


def _empty(like: Tensor) -> Tensor:
    """A fresh empty tensor where a gradient is not wanted: an operator's outputs must not alias one another."""
    return like.new_empty(0)


def _like(grad: Tensor, param: Tensor) -> Tensor:
    """``grad`` with ``param``'s shape, dtype and strides (what the shape function promises)."""
    grad = grad.view(param.shape).to(param.dtype)
    return grad if grad.stride() == param.stride() else torch.empty_like(param).copy_(grad)


@fused_dense_block_backward.register_fake
def _(grad_out: Tensor, saved: List[Tensor], params: List[Tensor], eps: List[float], want_input: bool,
      wants: List[bool]) -> List[Tensor]:
    out = saved[0]
    n, total, h, w = out.shape
    c0 = total - sum(params[_PER_LAYER * i + 5].shape[0] for i in range(len(params) // _PER_LAYER))
    grad_x = (torch.empty((n, c0, h, w), dtype=out.dtype, device=out.device, memory_format=torch.channels_last)
              if want_input else _empty(grad_out))
    return [grad_x, *(torch.empty_like(p) if want else _empty(grad_out) for p, want in zip(params, wants))]


def _setup_context(ctx: Any, inputs: Tuple[Any, ...], output: List[Tensor]) -> None:
    x, params, stats, eps, _, keep_conv_output = inputs
    layers = len(params) // _PER_LAYER
    saved = output[: 5 + (layers if keep_conv_output else 0)]
    ctx.mark_non_differentiable(*output[1:])
    ctx.eps, ctx.n_saved, ctx.want_input = eps, len(saved), x.requires_grad
    ctx.wants = [p.requires_grad for p in params]
    ctx.save_for_backward(*saved, *params)


def _backward(ctx: Any, grads: List[Tensor]) -> Tuple[Any, ...]:
    tensors = ctx.saved_tensors
    saved, params = list(tensors[: ctx.n_saved]), list(tensors[ctx.n_saved :])
    result = fused_dense_block_backward(grads[0], saved, params, ctx.eps, ctx.want_input, ctx.wants)
    grad_x = result[0] if ctx.want_input else None
    param_grads = [g if want else None for g, want in zip(result[1:], ctx.wants)]
    return grad_x, param_grads, [None] * (len(ctx.eps) * 3), None, None, None


fused_dense_block.register_autograd(_backward, setup_context=_setup_context)


def fused_block_op_forward(block: nn.ModuleDict, x: Tensor, keep_conv_output: bool) -> Tensor:
    """The fused block through the operator (what runs under ``torch.compile``): its output, and every
    norm's running statistics updated once. The block must pass :func:`op_supported`."""
    layers = list(block.values())
    norms = _norms(layers)
    stats = [t for norm in norms for t in (norm.running_mean, norm.running_var, norm.num_batches_tracked)]
    params = [p for layer in layers for p in layer_parameters(layer)]
    eps = [float(norm.eps) for norm in norms]
    momentum = [_NO_MOMENTUM if norm.momentum is None else float(norm.momentum) for norm in norms]
    result = fused_dense_block(x, params, stats, eps, momentum, keep_conv_output)
    with torch.no_grad():
        for buffer, value in zip(stats, result[len(result) - len(stats) :]):
            buffer.copy_(value)
    return result[0]
