"""The chunked matrix kernels of the fused stem, block and transition, on (pixels x channels) matrices.

A channels-last (N, C, H, W) tensor is a (pixels, channels) matrix without a copy, and a slice of
the block buffer's columns is a strided matrix. The chunked kernels work through a matrix a few
thousand rows at a time, so that a layer's normalised input and its gradient never exist whole:
those are the largest temporaries of a dense layer. The batch-norm arithmetic they chunk is that
of :mod:`densenet_zoo.norms.bn_math`. On CUDA the element-wise passes and their reductions are
one Triton kernel each (:mod:`.triton_kernels`) where Triton is installed; convolutions are cuDNN's.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..norms.bn_math import acc_dtype, centred, moments, scale_shift
from . import triton_kernels
from .workspace import scratch

aten = torch.ops.aten


def column_moments(t: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-column mean and biased variance of a (pixels, channels) matrix (two-pass, in float32 at least),
    in row chunks: no temporary as large as ``t``."""
    rows, cols = t.shape
    if triton_kernels.enabled(t):  # two launches, the whole matrix each
        mean = triton_kernels.column_sums(t, acc_dtype(t.dtype)) / rows
        return mean, triton_kernels.column_sums(t, acc_dtype(t.dtype), mean) / rows
    step = chunk_rows(cols, t)
    with scratch(t, [min(step, rows) * cols], acc_dtype(t.dtype), "chunks") as (tmp,):
        mean, m2 = moments(t, (0,), step, tmp)
    return mean, m2 / rows


def norm_relu(x: Tensor, scale: Tensor, shift: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``relu(x * scale + shift)`` per column of a (pixels, channels) matrix, into ``out`` (dense) when given."""
    if out is not None and triton_kernels.enabled(x):
        return triton_kernels.norm_relu(x, scale, shift, out)
    return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype), out=out).relu_()


def flat_matrix(flat: Tensor, rows: int, cols: int) -> Tensor:
    """The first ``rows * cols`` elements of a flat scratch tensor as a dense (rows, cols) matrix."""
    return flat[: rows * cols].view(rows, cols)


def image_view(t: Tensor, shape: Tuple[int, int, int]) -> Tensor:
    """An (N, C, H, W) view (channels-last in memory) of a (pixels, channels) matrix; ``shape`` is (N, H, W)."""
    n, h, w = shape
    return t.view(n, h, w, t.shape[1]).permute(0, 3, 1, 2)


def matrix(t: Tensor) -> Tensor:
    """An (N, C, H, W) tensor as a (pixels, channels) matrix (a view when it is channels-last)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def chunk_rows(cols: int, like: Tensor) -> int:
    """Rows per chunk of the chunked passes: about 2 MiB on the CPU (cache-sized), 64 MiB elsewhere (few launches)."""
    if like.device.type == "cpu":
        return max(1024, (1 << 21) // (cols * like.element_size()))
    return max(1, (1 << 26) // (cols * like.element_size()))


def row_image(t: Tensor) -> Tensor:
    """A dense (rows, channels) matrix as a (1, channels, 1, rows) channels-last image."""
    rows, cols = t.shape
    return t.view(1, 1, rows, cols).permute(0, 3, 1, 2)


def rows_conv1x1(t: Tensor, weight: Tensor) -> Tensor:
    """A (rows, c_in) matrix through a 1x1 convolution's (c_out, c_in, 1, 1) weight -> (rows, c_out).

    As a convolution rather than a matrix product: on the CPU oneDNN's kernels (normal mode's) are
    several times faster than the BLAS library's on some processors.
    """
    return F.conv2d(row_image(t), weight).permute(0, 2, 3, 1).reshape(t.shape[0], -1)


def conv1_chunked(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Tensor) -> Tensor:
    """``out = conv1(relu(x * scale + shift))`` for a (pixels, channels) ``x``, in row chunks: the
    normalised input never exists whole."""
    rows, cols = x.shape
    step = chunk_rows(cols, x)
    with scratch(x, [min(step, rows) * cols], slot="chunks") as (tmp,):
        for r in range(0, rows, step):
            xc = x[r : r + step]
            out[r : r + step].copy_(rows_conv1x1(norm_relu(xc, scale, shift, out=flat_matrix(tmp, *xc.shape)), weight))
    return out


def add_centred_affine(grad_x: Tensor, x: Tensor, mean: Tensor, k2: Tensor, k3: Tensor) -> None:
    """``grad_x += (x - mean) * k2 + k3`` (per column), in row chunks."""
    rows, cols = x.shape
    step = chunk_rows(cols, x)
    with scratch(x, [min(step, rows) * cols], acc_dtype(x.dtype), "chunks") as (tmp,):
        for r in range(0, rows, step):
            grad_x[r : r + step].add_(centred(x[r : r + step], mean, tmp).mul_(k2).add_(k3))


@contextlib.contextmanager
def _chunk_temps(x: Tensor, acc: torch.dtype, n: int) -> Iterator[List[Tensor]]:
    """Three chunk temporaries of ``n`` elements: one in ``x``'s dtype, two in ``acc``."""
    if acc == x.dtype:
        with scratch(x, [n, n, n], slot="chunks") as temps:
            yield temps
    else:
        with scratch(x, [n], slot="chunks") as (pre,), scratch(x, [n, n], acc, "chunks") as (g, xs):
            yield [pre, g, xs]


def relu_norm_backward(source: Callable[[slice], Tensor], x: Tensor, mean: Tensor, invstd: Tensor,
                       weight: Optional[Tensor], bias: Optional[Tensor], grad_x: Tensor, accumulate: bool,
                       on_output: Optional[Callable[[slice, Tensor], None]] = None,
                       deferred: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """Backward of ``relu(batch_norm(x))`` in training mode: d loss/d x into ``grad_x`` (added or written).

    ``source(rows)`` gives those rows (a slice) of d loss/d output (they may be overwritten); ``x`` may
    be a strided view of the block buffer. The forward's output is recomputed from ``x`` by the
    forward's own operation, chunk by chunk, for the ReLU mask and for ``on_output(rows, output)``.
    The batch norm's backward is the closed form ``native_batch_norm_backward`` computes, in row
    chunks, so that no temporary as large as ``x`` exists:
    ``d loss/d x = g * k1 + (x - mean) * k2 + k3`` per column, with ``g`` the masked gradient.
    With ``deferred = (K2, K3)`` (and ``accumulate``) the last two terms are not added but their
    coefficients are added into ``K2[:cols]`` and ``K3[:cols]``: in a dense block every layer's
    terms of one column share ``mean``, so they are applied once, summed (:func:`add_centred_affine`).
    Returns the gradients of the norm's weight and bias.
    """
    rows, cols = x.shape
    acc = acc_dtype(x.dtype)
    step = chunk_rows(cols, x)
    k1, shift = scale_shift(weight, bias, mean, invstd)  # k1: the norm's scale, which is also d out/d x's first term
    k1_x, shift_x = k1.to(x.dtype), shift.to(x.dtype)
    sum_g, sum_g_xmu = torch.zeros(cols, dtype=acc, device=x.device), torch.zeros(cols, dtype=acc, device=x.device)
    n = min(step, rows) * cols
    fused_pass = triton_kernels.enabled(x)
    with _chunk_temps(x, acc, n) as (pre_flat, g_flat, x_flat):
        for r in range(0, rows, step):
            part = slice(r, min(r + step, rows))
            if fused_pass:  # one launch per chunk: mask, both reductions and grad_x
                output = None if on_output is None else flat_matrix(pre_flat, part.stop - r, cols)
                sums = triton_kernels.relu_norm_backward_pass(source(part), x[part], k1, shift, mean, grad_x[part],
                                                              accumulate, output)
                sum_g += sums[0]
                sum_g_xmu += sums[1]
                if on_output is not None:
                    on_output(part, output)
                continue
            gc, xc = source(part), x[part]
            pre = torch.addcmul(shift_x, xc, k1_x, out=flat_matrix(pre_flat, *xc.shape))
            aten.threshold_backward.grad_input(gc, pre, 0, grad_input=gc)  # d loss/d norm output
            if on_output is not None:
                on_output(part, pre.relu_())
            g_acc = gc if gc.dtype == acc else flat_matrix(g_flat, *gc.shape).copy_(gc)
            sum_g += g_acc.sum(0)
            sum_g_xmu += centred(xc, mean, x_flat).mul_(g_acc).sum(0)
            if accumulate:
                grad_x[part].addcmul_(gc, k1_x)
            else:
                torch.mul(gc, k1_x, out=grad_x[part])
    k2 = k1 * invstd.square() * sum_g_xmu / -rows
    k3 = k1 * sum_g / -rows
    if deferred is not None and accumulate:
        deferred[0][:cols] += k2
        deferred[1][:cols] += k3
    else:
        add_centred_affine(grad_x, x, mean, k2, k3)
    return sum_g_xmu * invstd, sum_g


def conv1x1_relu_norm_backward(grad_z: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, norm: nn.Module,
                               conv_weight: Tensor, grad_x: Tensor, accumulate: bool, want_weight_grad: bool,
                               deferred: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Backward of ``z = conv1x1(relu(norm(x)))`` (training-mode batch norm with these statistics), given
    d loss/d z (dense, pixels x c_out): d loss/d x into ``grad_x`` (added or written), in row chunks.

    Returns the gradients of the norm's weight and bias and of the convolution's weight (float32 at
    least; None when not wanted). Neither relu(norm(x)) nor its gradient ever exists whole.
    """
    w = conv_weight.to(x.dtype)
    w_t = w.transpose(0, 1).contiguous()
    grad_w = torch.zeros_like(w, dtype=acc_dtype(w.dtype)) if want_weight_grad else None

    def add_weight_grad(rows: slice, a: Tensor) -> None:
        grad_w.add_(aten.convolution_backward(row_image(grad_z[rows]), row_image(a), w, None, [1, 1], [0, 0], [1, 1],
                                              False, [0, 0], 1, [False, True, False])[1])

    grad_g, grad_b = relu_norm_backward(lambda rows: rows_conv1x1(grad_z[rows], w_t), x, mean, invstd, norm.weight,
                                        norm.bias, grad_x, accumulate, add_weight_grad if want_weight_grad else None,
                                        deferred)
    return grad_g, grad_b, grad_w
