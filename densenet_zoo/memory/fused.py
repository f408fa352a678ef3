"""A whole dense block as one autograd function: the ``"fused"`` and ``"fused_lean"`` strategies.

Per block, one channels-last buffer holds the input and every layer's new channels; it is also
the block's output, so nothing is concatenated. Seen as a matrix (pixels x channels) a 1x1
convolution is one matrix product on a slice of that buffer, and a channel's batch statistics
are the same for every later layer that normalises it: they are computed once, when the channel
is written, and shared by all the ``norm1`` layers (each still updates its own running stats).

Kept for backward: the buffer, per-channel statistics and, with ``keep_bottleneck``, each
layer's conv1 output. Everything else (norm + ReLU outputs, and conv1 without
``keep_bottleneck``) is recomputed in backward from those, without touching running statistics.
The backward runs the layers in reverse, adding each layer's input gradient into one gradient
buffer in place.

Supported: ``nn.BatchNorm2d``-semantics norms in training mode (torch's or ours), ReLU, the
standard convolutions, no dropout, float32/float64 (or, under autocast, an input in the autocast
dtype: bfloat16 or float16, with float32 statistics and float32 parameter gradients) and no
``torch.compile``. Other blocks run the per-layer strategy the fused one derives from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..allocator import release_freed_memory
from ..norms.batchnorm import BatchNorm2d as _OwnBatchNorm2d, average_factor, update_running_stats

if TYPE_CHECKING:  # pragma: no cover
    from ..models.densenet import _DenseBlock, _DenseLayer

aten = torch.ops.aten


def _plain_batchnorm(norm: nn.Module) -> bool:
    return type(norm) in (nn.BatchNorm2d, _OwnBatchNorm2d) and norm.training


def _plain_conv(conv: nn.Module, kernel: int) -> bool:
    return (
        type(conv) is nn.Conv2d and conv.bias is None and conv.groups == 1 and conv.padding_mode == "zeros"
        and conv.kernel_size == (kernel, kernel) and conv.stride == (1, 1) and conv.dilation == (1, 1)
        and conv.padding == (kernel // 2, kernel // 2) and not nn.utils.parametrize.is_parametrized(conv)
    )


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _compute_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype the block computes in: ``x``'s float32/float64, or under autocast the autocast dtype.

    Under autocast normal mode's activations all have the autocast dtype (convolutions cast to it,
    batch norm and ReLU keep it), so the fused block runs when its input has that dtype already.
    """
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return dtype if dtype in _LOW_PRECISION and x.dtype == dtype else None
    return x.dtype if x.dtype in (torch.float32, torch.float64) else None


def fused_supported(block: "_DenseBlock", x: Optional[Tensor] = None) -> bool:
    """Whether :class:`FusedDenseBlock` computes this block (for input ``x``) exactly; else the per-layer path runs."""
    if x is not None and (x.dim() != 4 or _compute_dtype(x) is None):
        return False
    if torch.compiler.is_compiling():
        return False
    return all(
        layer.drop_rate == 0 and _plain_batchnorm(layer.norm1) and _plain_batchnorm(layer.norm2)
        and type(layer.relu1) is nn.ReLU and type(layer.relu2) is nn.ReLU
        and _plain_conv(layer.conv1, 1) and _plain_conv(layer.conv2, 3)
        for layer in block.values()
    )


def _input_grad(grad: Tensor, shape: Tuple[int, int, int]) -> Tensor:
    """The block input's gradient, from the first columns of the gradient buffer, in channels-last."""
    return _nhwc(grad, shape).contiguous(memory_format=torch.channels_last)


def _moments(t: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-column mean and biased variance of a (pixels, channels) matrix (two-pass, in float32 at least)."""
    if t.dtype in _LOW_PRECISION:
        t = t.float()
    mean = t.mean(0)
    return mean, (t - mean).square_().mean(0)


def _affine(norm: nn.Module, mean: Tensor, invstd: Tensor) -> Tuple[Tensor, Tensor]:
    """``norm(x) == x * scale + shift`` for the given batch statistics."""
    scale = invstd if norm.weight is None else invstd * norm.weight
    shift = -mean * scale if norm.bias is None else norm.bias - mean * scale
    return scale, shift


def _norm_relu(x: Tensor, scale: Tensor, shift: Tensor, out: Optional[Tensor] = None) -> Tensor:
    return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype), out=out).relu_()


class _Workspace:
    """One allocation reused for a per-layer (pixels, channels) temporary whose width changes each layer.

    Widths grow layer by layer in the forward: fresh allocations would each be too large for the
    block freed before, and glibc's heap would keep every one of them.
    """

    def __init__(self, like: Tensor, rows: int, max_cols: int) -> None:
        self.flat = like.new_empty(rows * max_cols)
        self.rows = rows

    def take(self, cols: int) -> Tensor:
        return self.flat[: self.rows * cols].view(self.rows, cols)


def _nhwc(t: Tensor, shape: Tuple[int, int, int]) -> Tensor:
    """A (pixels, channels) matrix seen as an (N, C, H, W) channels-last tensor."""
    n, h, w = shape
    return t.view(n, h, w, t.shape[1]).permute(0, 3, 1, 2)


def _matrix(t: Tensor) -> Tensor:
    """An (N, C, H, W) tensor as a (pixels, channels) matrix (a view when it is channels-last)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _wants_grad(p: Optional[Tensor]) -> bool:
    return p is not None and p.requires_grad


class FusedDenseBlock(torch.autograd.Function):
    """``apply(layers, keep_bottleneck, x, *params)`` -> the block output (channels-last)."""

    @staticmethod
    def forward(ctx: Any, layers: List["_DenseLayer"], keep_bottleneck: bool, x: Tensor, *params: Tensor) -> Tensor:
        # Under autocast x already has the autocast dtype; every cast below is explicit, as in backward.
        with torch.autocast(x.device.type, enabled=False):
            return FusedDenseBlock._forward(ctx, layers, keep_bottleneck, x, params)

    @staticmethod
    def _forward(ctx: Any, layers: List["_DenseLayer"], keep_bottleneck: bool, x: Tensor, params: Tuple[Tensor, ...]) -> Tensor:
        release_freed_memory(x)  # what the stem or the transition before freed
        n, c0, h, w = x.shape
        pixels, growth = n * h * w, layers[0].conv2.out_channels
        total = c0 + growth * len(layers)
        out = torch.empty((n, total, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        mat = _matrix(out)
        x_mat = _matrix(x)
        mat[:, :c0].copy_(x_mat)
        stats_dtype = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
        means, variances = x.new_empty(total, dtype=stats_dtype), x.new_empty(total, dtype=stats_dtype)
        means[:c0], variances[:c0] = _moments(x_mat)
        del x_mat

        work = _Workspace(x, pixels, total - growth)
        kept: List[Tensor] = []
        norm2_stats: List[Tuple[Tensor, Tensor]] = []
        for i, layer in enumerate(layers):
            c = c0 + i * growth
            factor = average_factor(layer.norm1)
            if factor:  # 0: no running statistics (or momentum 0: they would not move)
                update_running_stats(layer.norm1, factor, pixels, means[:c], variances[:c] * pixels)
            scale, shift = _affine(layer.norm1, means[:c], (variances[:c] + layer.norm1.eps).rsqrt())
            a = _norm_relu(mat[:, :c], scale, shift, out=work.take(c))
            z = torch.mm(a, layer.conv1.weight.reshape(-1, c).to(x.dtype).t())
            del a
            norm2 = layer.norm2
            factor = average_factor(norm2)
            a2, mean2, invstd2 = aten.native_batch_norm(
                z, norm2.weight, norm2.bias, norm2.running_mean, norm2.running_var, True, factor, norm2.eps
            )
            y = F.conv2d(_nhwc(a2.relu_(), (n, h, w)), layer.conv2.weight.to(x.dtype), None, 1, 1)
            del a2
            y_mat = _matrix(y)
            mat[:, c : c + growth].copy_(y_mat)
            means[c : c + growth], variances[c : c + growth] = _moments(y_mat)
            norm2_stats.append((mean2, invstd2))
            if keep_bottleneck:
                kept.append(z)
            del z, y, y_mat

        ctx.layers, ctx.keep_bottleneck, ctx.shape, ctx.c0 = layers, keep_bottleneck, (n, h, w), c0
        ctx.norm2_stats = norm2_stats
        ctx.save_for_backward(out, means, variances, *kept, *params)
        release_freed_memory(out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        release_freed_memory(grad_out)
        layers: List["_DenseLayer"] = ctx.layers
        n, h, w = ctx.shape
        saved = ctx.saved_tensors
        out, means, variances = saved[:3]
        n_kept = len(layers) if ctx.keep_bottleneck else 0
        kept, params = list(saved[3 : 3 + n_kept]), saved[3 + n_kept :]
        mat = _matrix(out)
        grad = torch.empty_like(mat)
        grad.view(n, h, w, -1).copy_(grad_out.permute(0, 2, 3, 1))
        growth = layers[0].conv2.out_channels
        param_grads: dict = {}
        widest = ctx.c0 + growth * (len(layers) - 1)
        work_x, work_a = _Workspace(mat, mat.shape[0], widest), _Workspace(mat, mat.shape[0], widest)
        want = _wants_grad
        for i in reversed(range(len(layers))):
            layer = layers[i]
            norm1, norm2, conv1, conv2 = layer.norm1, layer.norm2, layer.conv1, layer.conv2
            c = ctx.c0 + i * growth
            x = work_x.take(c).copy_(mat[:, :c])  # the kernels below are much faster on a dense matrix
            invstd1 = (variances[:c] + norm1.eps).rsqrt()
            scale1, shift1 = _affine(norm1, means[:c], invstd1)
            a = _norm_relu(x, scale1, shift1, out=work_a.take(c))
            w1 = conv1.weight.reshape(-1, c).to(mat.dtype)
            z = kept.pop() if ctx.keep_bottleneck else torch.mm(a, w1.t())
            mean2, invstd2 = ctx.norm2_stats[i]
            a2 = _norm_relu(z, *_affine(norm2, mean2, invstd2))

            grad_y = _nhwc(grad[:, c : c + growth].contiguous(), (n, h, w))
            grad_a2, grad_w2, _ = aten.convolution_backward(
                grad_y, _nhwc(a2, (n, h, w)), conv2.weight.to(mat.dtype), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                [True, want(conv2.weight), False],
            )
            grad_a2 = aten.threshold_backward(_matrix(grad_a2), a2, 0)
            del a2, grad_y
            grad_z, grad_g2, grad_b2 = aten.native_batch_norm_backward(
                grad_a2, z, norm2.weight, None, None, mean2, invstd2, True, norm2.eps,
                [True, want(norm2.weight), want(norm2.bias)],
            )
            del grad_a2, z
            grad_w1 = torch.mm(grad_z.t(), a).view(conv1.weight.shape) if want(conv1.weight) else None
            grad_a = aten.threshold_backward(torch.mm(grad_z, w1), a, 0)
            del grad_z, a
            grad_x, grad_g1, grad_b1 = aten.native_batch_norm_backward(
                grad_a, x, norm1.weight, None, None, means[:c], invstd1, True, norm1.eps,
                [True, want(norm1.weight), want(norm1.bias)],
            )
            del grad_a, x
            grad[:, :c].add_(grad_x)
            del grad_x
            for p, g in ((norm1.weight, grad_g1), (norm1.bias, grad_b1), (conv1.weight, grad_w1),
                         (norm2.weight, grad_g2), (norm2.bias, grad_b2), (conv2.weight, grad_w2)):
                if want(p):
                    param_grads[id(p)] = g.view(p.shape).to(p.dtype)  # autocast: weights were cast down

        grad_x = _input_grad(grad[:, : ctx.c0], (n, h, w)) if ctx.needs_input_grad[2] else None
        del grad, mat, out, work_x, work_a
        release_freed_memory(grad_out)
        return (None, None, grad_x, *[param_grads.get(id(p)) for p in params])


def block_parameters(layers: List["_DenseLayer"]) -> List[Tensor]:
    return [p for layer in layers for p in layer.parameters()]


def fused_block_forward(block: "_DenseBlock", x: Tensor, keep_bottleneck: bool) -> Tensor:
    layers = list(block.values())
    return FusedDenseBlock.apply(layers, keep_bottleneck, x, *block_parameters(layers))
