"""A whole dense block as one autograd function: the ``"fused"`` and ``"fused_lean"`` strategies.

Per block, one channels-last buffer holds the input and every layer's new channels; it is also
the block's output, so nothing is concatenated. Seen as a matrix (pixels x channels) every layer
reads a slice of that buffer, and a channel's batch statistics are the same for every later layer
that normalises it: they are computed once, when the channel is written, and shared by all the
``norm1`` layers (each still updates its own running stats).

Kept for backward: the buffer, per-channel statistics and, with ``keep_conv_output``, each
layer's conv1 output. Everything else (norm + ReLU outputs, and conv1 without
``keep_conv_output``) is recomputed in backward from those, without touching running statistics.
The backward runs the layers in reverse, adding each layer's input gradient into one gradient
buffer in place. norm1 + ReLU + conv1, the widest part of a layer, runs in row chunks in both
directions (:mod:`.kernels`), and the per-block temporaries come from a scratch buffer that
lives on between steps (:mod:`.workspace`), so a step's transient memory is a few layer-sized
matrices, whatever C allocator the process runs.

Supported: ``nn.BatchNorm2d``-semantics norms in training mode (torch's or ours), ReLU, the
standard convolutions, no dropout, float32/float64 (or, under autocast, an input in the autocast
dtype: bfloat16 or float16, with float32 statistics and float32 parameter gradients). Under
``torch.compile`` the block runs as an operator (:mod:`.fused_op`). Other blocks run the strategy's
fallback (:mod:`.strategies`).
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..norms.bn_math import LOW_PRECISION, acc_dtype, average_factor, inv_std, scale_shift
from .fusion import compute_dtype, no_forward_hooks, ordered_grads, plain_batchnorm, plain_conv, record_batch
from .kernels import (
    add_centred_affine, aten, column_moments, conv1_chunked, conv1x1_relu_norm_backward, flat_matrix, image_view, matrix,
    norm_relu, relu_norm_backward,
)
from .workspace import scratch


def fused_supported(block: nn.ModuleDict, x: Optional[Tensor] = None) -> bool:
    """Whether :class:`FusedDenseBlock` computes this block (for input ``x``) exactly; else the per-layer path runs."""
    if x is not None and (x.dim() != 4 or compute_dtype(x) is None):
        return False
    return no_forward_hooks(block.modules()) and all(
        layer.drop_rate == 0 and plain_batchnorm(layer.norm1) and plain_batchnorm(layer.norm2)
        and type(layer.relu1) is nn.ReLU and type(layer.relu2) is nn.ReLU
        and plain_conv(layer.conv1, 1) and plain_conv(layer.conv2, 3)
        for layer in block.values()
    )


class BlockSaved(NamedTuple):
    """What the fused block keeps for backward, besides the parameters."""

    out: Tensor  #: the block's output buffer (channels-last), which holds its input too
    means: Tensor  #: per-channel batch mean of the buffer's channels (float32 at least)
    variances: Tensor  #: per-channel biased batch variance
    norm2_means: Tensor  #: (layers, width): each layer's norm2 batch mean
    norm2_invstds: Tensor  #: (layers, width): each layer's norm2 batch 1/std
    kept: List[Tensor]  #: each layer's conv1 output (pixels x width), with ``keep_conv_output``; else empty


def block_forward(layers: Sequence[Any], keep_conv_output: bool, x: Tensor) -> BlockSaved:
    """The block's forward on ``x`` (in its own dtype, autocast off): every norm's running statistics
    are updated once; returns the output buffer and what backward needs.

    ``layers`` are dense layers, or objects with the same attributes (``norm1``, ``conv1``, ``norm2``,
    ``conv2`` and their tensors, :mod:`.fused_op`).
    """
    n, c0, h, w = x.shape
    pixels, growth, width = n * h * w, layers[0].conv2.out_channels, layers[0].conv1.out_channels
    total = c0 + growth * len(layers)
    out = torch.empty((n, total, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    mat = matrix(out)
    x_mat = matrix(x)
    mat[:, :c0].copy_(x_mat)
    acc = acc_dtype(x.dtype)
    means, variances = (x.new_empty(total, dtype=acc) for _ in range(2))
    means[:c0], variances[:c0] = column_moments(x_mat)
    del x_mat
    norm2_means, norm2_invstds = (x.new_empty((len(layers), width), dtype=acc) for _ in range(2))
    kept: List[Tensor] = []
    with scratch(x, [0 if keep_conv_output else pixels * width, pixels * width]) as (work_z, work_a2):
        for i, layer in enumerate(layers):
            c = c0 + i * growth
            invstd1 = record_batch(layer.norm1, pixels, means[:c], variances[:c])
            scale, shift = scale_shift(layer.norm1.weight, layer.norm1.bias, means[:c], invstd1)
            z = x.new_empty(pixels, width) if keep_conv_output else flat_matrix(work_z, pixels, width)
            conv1_chunked(mat[:, :c], scale, shift, layer.conv1.weight.to(x.dtype), out=z)
            norm2 = layer.norm2
            a2 = aten.native_batch_norm.out(
                z, norm2.weight, norm2.bias, norm2.running_mean, norm2.running_var, True, average_factor(norm2),
                norm2.eps, out=flat_matrix(work_a2, pixels, width), save_mean=norm2_means[i],
                save_invstd=norm2_invstds[i],
            )[0]
            y = matrix(F.conv2d(image_view(a2.relu_(), (n, h, w)), layer.conv2.weight.to(x.dtype), None, 1, 1))
            mat[:, c : c + growth].copy_(y)
            means[c : c + growth], variances[c : c + growth] = column_moments(y)
            if keep_conv_output:
                kept.append(z)
            del z, a2, y
    return BlockSaved(out, means, variances, norm2_means, norm2_invstds, kept)


#: The parameters of a dense layer, in the order the fused block's gradients list them.
LAYER_PARAMETERS = ("norm1.weight", "norm1.bias", "conv1.weight", "norm2.weight", "norm2.bias", "conv2.weight")


def layer_parameters(layer: Any) -> List[Optional[Tensor]]:
    """A layer's parameters in :data:`LAYER_PARAMETERS` order (None for a norm without affine parameters)."""
    return [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight, layer.norm2.weight, layer.norm2.bias,
            layer.conv2.weight]


def block_backward(layers: Sequence[Any], saved: BlockSaved, c0: int, grad_out: Tensor, want_input: bool,
                   wants: Sequence[bool]) -> Tuple[Optional[Tensor], List[Optional[Tensor]]]:
    """The block's backward (autocast off): d loss/d input (None unless ``want_input``) and the gradients
    of every layer's parameters, in :data:`LAYER_PARAMETERS` order, layer after layer (float32 at
    least; None where ``wants`` says no)."""
    out, means, variances = saved.out, saved.means, saved.variances
    kept = list(saved.kept)
    n, _, h, w = out.shape
    mat = matrix(out)
    pixels, total = mat.shape
    growth, width = layers[0].conv2.out_channels, layers[0].conv1.out_channels
    grads: List[List[Optional[Tensor]]] = []
    keep = bool(kept)
    sizes = [pixels * total, 0 if keep else pixels * width, pixels * width, pixels * growth]
    with scratch(mat, sizes) as (grad, *work):
        grad = flat_matrix(grad, pixels, total)
        grad.view(n, h, w, -1).copy_(grad_out.permute(0, 2, 3, 1))
        # norm1's backward terms (x - mean) * k2 + k3 of every layer, summed per column (see relu_norm_backward)
        deferred = (torch.zeros_like(means), torch.zeros_like(means))
        for i in reversed(range(len(layers))):
            c = c0 + i * growth
            if i < len(layers) - 1:  # the later layers' terms: column c..c+growth is complete now
                cols = slice(c, c + growth)
                add_centred_affine(grad[:, cols], mat[:, cols], means[cols], deferred[0][cols], deferred[1][cols])
            z = kept.pop() if keep else None
            norm2_stats = saved.norm2_means[i], saved.norm2_invstds[i]
            grads.append(_layer_backward(layers[i], mat, grad, means, variances, norm2_stats, c, z, work, (n, h, w),
                                         deferred, wants[6 * i : 6 * i + 6]))
        grad_x = None
        if want_input:
            first = slice(0, c0)
            add_centred_affine(grad[:, first], mat[:, first], means[first], deferred[0][first], deferred[1][first])
            # a copy: the scratch memory is reused by the next block
            grad_x = image_view(grad[:, first], (n, h, w)).clone(memory_format=torch.channels_last)
    return grad_x, [g for layer_grads in reversed(grads) for g in layer_grads]


class FusedDenseBlock(torch.autograd.Function):
    """``apply(layers, keep_conv_output, x, *params)`` -> the block output (channels-last)."""

    @staticmethod
    def forward(ctx: Any, layers: List[nn.Module], keep_conv_output: bool, x: Tensor, *params: Tensor) -> Tensor:
        # Under autocast x already has the autocast dtype; every cast below is explicit, as in backward.
        with torch.autocast(x.device.type, enabled=False):
            saved = block_forward(layers, keep_conv_output, x)
        ctx.layers, ctx.c0, ctx.n_kept = layers, x.shape[1], len(saved.kept)
        ctx.save_for_backward(*saved[:5], *saved.kept, *params)
        return saved.out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        layers: List[nn.Module] = ctx.layers
        tensors = ctx.saved_tensors
        saved = BlockSaved(*tensors[:5], list(tensors[5 : 5 + ctx.n_kept]))
        params = tensors[5 + ctx.n_kept :]
        wanted = {id(p) for p, needed in zip(params, ctx.needs_input_grad[3:]) if needed}
        layer_params = [p for layer in layers for p in layer_parameters(layer)]
        wants = [p is not None and id(p) in wanted for p in layer_params]
        grad_x, grads = block_backward(layers, saved, ctx.c0, grad_out, ctx.needs_input_grad[2], wants)
        return (None, None, grad_x, *ordered_grads(params, zip(layer_params, grads)))


def _layer_backward(layer: nn.Module, mat: Tensor, grad: Tensor, means: Tensor, variances: Tensor,
                    norm2_stats: Tuple[Tensor, Tensor], c: int, z: Optional[Tensor],
                    work: List[Tensor], shape: Tuple[int, int, int], deferred: Tuple[Tensor, Tensor],
                    wants: Sequence[bool]) -> List[Optional[Tensor]]:
    """One layer's backward: adds its input gradient into ``grad[:, :c]``; returns its parameters' gradients
    (:data:`LAYER_PARAMETERS` order; None where ``wants`` says no)."""
    norm1, norm2, conv1, conv2 = layer.norm1, layer.norm2, layer.conv1, layer.conv2
    pixels, width, growth = mat.shape[0], conv1.out_channels, conv2.out_channels
    x = mat[:, :c]
    invstd1 = inv_std(variances[:c], norm1.eps)
    if z is None:
        z = conv1_chunked(x, *scale_shift(norm1.weight, norm1.bias, means[:c], invstd1), conv1.weight.to(mat.dtype),
                          out=flat_matrix(work[0], pixels, width))
    mean2, invstd2 = norm2_stats
    a2 = norm_relu(z, *scale_shift(norm2.weight, norm2.bias, mean2, invstd2), out=flat_matrix(work[1], pixels, width))
    grad_y = flat_matrix(work[2], pixels, growth).copy_(grad[:, c : c + growth])
    grad_a2, grad_w2, _ = aten.convolution_backward(
        image_view(grad_y, shape), image_view(a2, shape), conv2.weight.to(mat.dtype), None, [1, 1], [1, 1], [1, 1], False,
        [0, 0], 1, [True, wants[5], False],
    )
    grad_a2 = matrix(grad_a2)
    if mat.dtype in LOW_PRECISION:  # one kernel computing in float32 registers; the chunked form converts chunks
        aten.threshold_backward.grad_input(grad_a2, a2, 0, grad_input=grad_a2)
        grad_z, grad_g2, grad_b2 = aten.native_batch_norm_backward(
            grad_a2, z, norm2.weight, None, None, mean2, invstd2, True, norm2.eps,
            [True, wants[3], wants[4]],
        )
    else:  # into a2's buffer: no fresh matrix of this size in every layer (glibc's heap would keep them)
        grad_z = a2
        grad_g2, grad_b2 = relu_norm_backward(grad_a2.__getitem__, z, mean2, invstd2, norm2.weight, norm2.bias,
                                              grad_z, False)
    del grad_a2, z, a2
    grad_g1, grad_b1, grad_w1 = conv1x1_relu_norm_backward(grad_z, x, means[:c], invstd1, norm1, conv1.weight,
                                                           grad[:, :c], True, wants[2], deferred)
    found = [grad_g1, grad_b1, grad_w1, grad_g2, grad_b2, grad_w2]
    return [g if want else None for g, want in zip(found, wants)]


def block_parameters(layers: List[nn.Module]) -> List[Tensor]:
    return [p for layer in layers for p in layer.parameters()]


def fused_block_forward(block: nn.ModuleDict, x: Tensor, keep_conv_output: bool) -> Tensor:
    layers = list(block.values())
    return FusedDenseBlock.apply(layers, keep_conv_output, x, *block_parameters(layers))
