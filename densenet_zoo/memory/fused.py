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

from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..norms.batchnorm import BatchNorm2d as _OwnBatchNorm2d, average_factor, update_running_stats
from .workspace import scratch

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


def _take(flat: Tensor, rows: int, cols: int) -> Tensor:
    """The first ``rows * cols`` elements of a flat scratch tensor as a dense (rows, cols) matrix."""
    return flat[: rows * cols].view(rows, cols)


def _nhwc(t: Tensor, shape: Tuple[int, int, int]) -> Tensor:
    """A (pixels, channels) matrix seen as an (N, C, H, W) channels-last tensor."""
    n, h, w = shape
    return t.view(n, h, w, t.shape[1]).permute(0, 3, 1, 2)


def _matrix(t: Tensor) -> Tensor:
    """An (N, C, H, W) tensor as a (pixels, channels) matrix (a view when it is channels-last)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _wants_grad(p: Optional[Tensor]) -> bool:
    return p is not None and p.requires_grad


def _chunk_rows(cols: int, device: torch.device) -> int:
    """Rows per chunk of the chunked passes: a few MiB on the CPU (cache-sized), 64 MiB elsewhere (few launches)."""
    return max(1024, (1 << 19) // cols) if device.type == "cpu" else max(1, (1 << 24) // cols)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _as_image(t: Tensor) -> Tensor:
    """A dense (rows, channels) matrix as a (1, channels, 1, rows) channels-last image."""
    rows, cols = t.shape
    return t.view(1, 1, rows, cols).permute(0, 3, 1, 2)


def _rows_conv1x1(t: Tensor, weight: Tensor) -> Tensor:
    """A (rows, c_in) matrix through a 1x1 convolution's (c_out, c_in, 1, 1) weight -> (rows, c_out).

    As a convolution rather than a matrix product: on the CPU oneDNN's kernels (normal mode's) are
    several times faster than the BLAS library's on some processors.
    """
    return F.conv2d(_as_image(t), weight).permute(0, 2, 3, 1).reshape(t.shape[0], -1)


def _relu_norm_backward(source: Callable[[int, int], Tensor], x: Tensor, mean: Tensor, invstd: Tensor,
                        weight: Optional[Tensor], bias: Optional[Tensor], grad_x: Tensor, accumulate: bool,
                        on_output: Optional[Callable[[int, int, Tensor], None]] = None) -> Tuple[Tensor, Tensor]:
    """Backward of ``relu(batch_norm(x))`` in training mode: d loss/d x into ``grad_x`` (added or written).

    ``source(start, stop)`` gives those rows of d loss/d output (they may be overwritten); ``x`` may
    be a strided view of the block buffer. The forward's output is recomputed from ``x`` by the
    forward's own operation, chunk by chunk, for the ReLU mask and for ``on_output(start, stop,
    rows)``. The batch norm's backward is the closed form ``native_batch_norm_backward`` computes,
    in row chunks, so that no temporary as large as ``x`` exists. Returns the gradients of the
    norm's weight and bias.
    """
    rows, cols = x.shape
    acc = _stats_dtype(x.dtype)
    step = _chunk_rows(cols, x.device)
    pre_flat, tmp_flat = x.new_empty(step * cols), x.new_empty(step * cols, dtype=acc)
    scale, shift = _affine_of(weight, bias, mean, invstd)
    scale_x, shift_x = scale.to(x.dtype), shift.to(x.dtype)
    k1 = invstd if weight is None else invstd * weight
    sum_g, sum_g_xmu = torch.zeros(cols, dtype=acc, device=x.device), torch.zeros(cols, dtype=acc, device=x.device)
    for r in range(0, rows, step):
        stop = min(r + step, rows)
        gc, xc = source(r, stop), x[r:stop]
        pre = torch.addcmul(shift_x, xc, scale_x, out=_take(pre_flat, *xc.shape))
        aten.threshold_backward.grad_input(gc, pre, 0, grad_input=gc)  # d loss/d norm output
        if on_output is not None:
            on_output(r, stop, pre.relu_())
        sum_g += gc.sum(0, dtype=acc)
        sum_g_xmu += torch.sub(xc, mean, out=_take(tmp_flat, *xc.shape)).mul_(gc).sum(0)
        if accumulate:
            grad_x[r:stop].addcmul_(gc, k1.to(grad_x.dtype))
        else:
            torch.mul(gc, k1, out=grad_x[r:stop])
    k2 = k1 * invstd.square() * sum_g_xmu / -rows
    k3 = k1 * sum_g / -rows
    for r in range(0, rows, step):
        xc = x[r : r + step]
        grad_x[r : r + step].add_(torch.sub(xc, mean, out=_take(tmp_flat, *xc.shape)).mul_(k2).add_(k3))
    return sum_g_xmu * invstd, sum_g


def _conv1(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Tensor) -> Tensor:
    """``out = conv1(relu(x * scale + shift))`` for a (pixels, channels) ``x``, in row chunks: the
    normalised input never exists whole."""
    rows, cols = x.shape
    step = _chunk_rows(cols, x.device)
    tmp = x.new_empty(step * cols)
    for r in range(0, rows, step):
        xc = x[r : r + step]
        out[r : r + step].copy_(_rows_conv1x1(_norm_relu(xc, scale, shift, out=_take(tmp, *xc.shape)), weight))
    return out


def _affine_of(weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor) -> Tuple[Tensor, Tensor]:
    scale = invstd if weight is None else invstd * weight
    return scale, (-mean * scale if bias is None else bias - mean * scale)


class FusedDenseBlock(torch.autograd.Function):
    """``apply(layers, keep_bottleneck, x, *params)`` -> the block output (channels-last)."""

    @staticmethod
    def forward(ctx: Any, layers: List["_DenseLayer"], keep_bottleneck: bool, x: Tensor, *params: Tensor) -> Tensor:
        # Under autocast x already has the autocast dtype; every cast below is explicit, as in backward.
        with torch.autocast(x.device.type, enabled=False):
            return FusedDenseBlock._forward(ctx, layers, keep_bottleneck, x, params)

    @staticmethod
    def _forward(ctx: Any, layers: List["_DenseLayer"], keep_bottleneck: bool, x: Tensor, params: Tuple[Tensor, ...]) -> Tensor:
        n, c0, h, w = x.shape
        pixels, growth, width = n * h * w, layers[0].conv2.out_channels, layers[0].conv1.out_channels
        total = c0 + growth * len(layers)
        out = torch.empty((n, total, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        mat = _matrix(out)
        x_mat = _matrix(x)
        mat[:, :c0].copy_(x_mat)
        means, variances = (x.new_empty(total, dtype=_stats_dtype(x.dtype)) for _ in range(2))
        means[:c0], variances[:c0] = _moments(x_mat)
        del x_mat

        kept: List[Tensor] = []
        norm2_stats: List[Tuple[Tensor, Tensor]] = []
        with scratch(x, [0 if keep_bottleneck else pixels * width, pixels * width]) as (work_z, work_a2):
            for i, layer in enumerate(layers):
                c = c0 + i * growth
                factor = average_factor(layer.norm1)
                if factor:  # 0: no running statistics (or momentum 0: they would not move)
                    update_running_stats(layer.norm1, factor, pixels, means[:c], variances[:c] * pixels)
                scale, shift = _affine(layer.norm1, means[:c], (variances[:c] + layer.norm1.eps).rsqrt())
                z = x.new_empty(pixels, width) if keep_bottleneck else _take(work_z, pixels, width)
                _conv1(mat[:, :c], scale, shift, layer.conv1.weight.to(x.dtype), out=z)
                norm2 = layer.norm2
                mean2, invstd2 = (z.new_empty(width, dtype=_stats_dtype(z.dtype)) for _ in range(2))
                a2 = aten.native_batch_norm.out(
                    z, norm2.weight, norm2.bias, norm2.running_mean, norm2.running_var, True, average_factor(norm2),
                    norm2.eps, out=_take(work_a2, pixels, width), save_mean=mean2, save_invstd=invstd2,
                )[0]
                y = _matrix(F.conv2d(_nhwc(a2.relu_(), (n, h, w)), layer.conv2.weight.to(x.dtype), None, 1, 1))
                mat[:, c : c + growth].copy_(y)
                means[c : c + growth], variances[c : c + growth] = _moments(y)
                norm2_stats.append((mean2, invstd2))
                if keep_bottleneck:
                    kept.append(z)
                del z, a2, y

        ctx.layers, ctx.keep_bottleneck, ctx.shape, ctx.c0 = layers, keep_bottleneck, (n, h, w), c0
        ctx.norm2_stats = norm2_stats
        ctx.save_for_backward(out, means, variances, *kept, *params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        layers: List["_DenseLayer"] = ctx.layers
        n, h, w = ctx.shape
        saved = ctx.saved_tensors
        out, means, variances = saved[:3]
        n_kept = len(layers) if ctx.keep_bottleneck else 0
        kept, params = list(saved[3 : 3 + n_kept]), saved[3 + n_kept :]
        mat = _matrix(out)
        pixels, total = mat.shape
        growth, width = layers[0].conv2.out_channels, layers[0].conv1.out_channels
        param_grads: dict = {}
        sizes = [pixels * total, 0 if ctx.keep_bottleneck else pixels * width, pixels * width, pixels * growth]
        with scratch(mat, sizes) as (grad, *work):
            grad = _take(grad, pixels, total)
            grad.view(n, h, w, -1).copy_(grad_out.permute(0, 2, 3, 1))
            for i in reversed(range(len(layers))):
                layer = layers[i]
                z = kept.pop() if ctx.keep_bottleneck else None
                grads = _layer_backward(layer, mat, grad, means, variances, ctx.norm2_stats[i], ctx.c0 + i * growth, z,
                                        work, (n, h, w))
                for p, g in zip((layer.norm1.weight, layer.norm1.bias, layer.conv1.weight,
                                 layer.norm2.weight, layer.norm2.bias, layer.conv2.weight), grads):
                    if _wants_grad(p):
                        param_grads[id(p)] = g.view(p.shape).to(p.dtype)  # autocast: weights were cast down
            # a copy: the scratch memory is reused by the next block
            grad_x = _nhwc(grad[:, : ctx.c0], (n, h, w)).clone(memory_format=torch.channels_last) if ctx.needs_input_grad[2] else None
        return (None, None, grad_x, *[param_grads.get(id(p)) for p in params])


def _layer_backward(layer: "_DenseLayer", mat: Tensor, grad: Tensor, means: Tensor, variances: Tensor,
                    norm2_stats: Tuple[Tensor, Tensor], c: int, z: Optional[Tensor],
                    work: List[Tensor], shape: Tuple[int, int, int]) -> List[Optional[Tensor]]:
    """One layer's backward: adds its input gradient into ``grad[:, :c]``; returns its parameters' gradients
    (norm1 weight, bias, conv1 weight, norm2 weight, bias, conv2 weight; None where not wanted)."""
    norm1, norm2, conv1, conv2 = layer.norm1, layer.norm2, layer.conv1, layer.conv2
    pixels, width, growth = mat.shape[0], conv1.out_channels, conv2.out_channels
    x = mat[:, :c]
    invstd1 = (variances[:c] + norm1.eps).rsqrt()
    w1 = conv1.weight.to(mat.dtype)
    if z is None:
        z = _conv1(x, *_affine(norm1, means[:c], invstd1), w1, out=_take(work[0], pixels, width))
    mean2, invstd2 = norm2_stats
    a2 = _norm_relu(z, *_affine(norm2, mean2, invstd2), out=_take(work[1], pixels, width))
    grad_y = _take(work[2], pixels, growth).copy_(grad[:, c : c + growth])
    grad_a2, grad_w2, _ = aten.convolution_backward(
        _nhwc(grad_y, shape), _nhwc(a2, shape), conv2.weight.to(mat.dtype), None, [1, 1], [1, 1], [1, 1], False,
        [0, 0], 1, [True, _wants_grad(conv2.weight), False],
    )
    grad_z, grad_a2 = a2, _matrix(grad_a2)  # a2's buffer takes d loss/d z
    grad_g2, grad_b2 = _relu_norm_backward(lambda i, j: grad_a2[i:j], z, mean2, invstd2, norm2.weight, norm2.bias,
                                           grad_z, False)
    del grad_a2, z
    w1_t = w1.transpose(0, 1).contiguous()
    grad_w1 = torch.zeros_like(w1) if _wants_grad(conv1.weight) else None

    def add_weight_grad(i: int, j: int, a: Tensor) -> None:
        grad_w1.add_(aten.convolution_backward(_as_image(grad_z[i:j]), _as_image(a), w1, None, [1, 1], [0, 0], [1, 1],
                                               False, [0, 0], 1, [False, True, False])[1])

    # d loss/d a chunk by chunk, and conv1's weight gradient from the recomputed a: neither exists whole
    grad_g1, grad_b1 = _relu_norm_backward(lambda i, j: _rows_conv1x1(grad_z[i:j], w1_t), x, means[:c], invstd1,
                                           norm1.weight, norm1.bias, grad[:, :c], True,
                                           add_weight_grad if grad_w1 is not None else None)
    return [grad_g1, grad_b1, grad_w1, grad_g2, grad_b2, grad_w2]


def block_parameters(layers: List["_DenseLayer"]) -> List[Tensor]:
    return [p for layer in layers for p in layer.parameters()]


def fused_block_forward(block: "_DenseBlock", x: Tensor, keep_bottleneck: bool) -> Tensor:
    layers = list(block.values())
    return FusedDenseBlock.apply(layers, keep_bottleneck, x, *block_parameters(layers))
