"""Triton kernels of the fused block's chunked passes, for CUDA tensors.

On a GPU a chunked pass written with torch operations is a string of small kernels per chunk (a
multiply-add, a ReLU, a cast, two reductions, ...), each reading and writing the whole chunk:
the step is bound by launches and memory traffic, not arithmetic. Each kernel here does one pass
in one launch, reading the block buffer's strided columns directly:

- :func:`column_sums`: per-column sums, or sums of squared deviations from a given mean (the two
  passes of a channel's statistics), as per-tile partial sums that torch adds up in a fixed order
  (deterministic, unlike atomics);
- :func:`norm_relu`: ``relu(x * scale + shift)`` into a dense matrix, where the 1x1 convolution reads it;
- :func:`relu_norm_backward_pass`: the ReLU mask recomputed from ``x``, the masked gradient, the two
  closed-form batch-norm reductions and ``grad_x (+)= g * scale``, in one pass.

Arithmetic runs in float32 (float64 for float64 tensors), the dtype of the statistics. Triton's
interpreter runs the same kernels on CPU tensors (``TRITON_INTERPRET=1``): the tests do so on small
shapes. ``DENSENET_ZOO_KERNELS=torch`` turns the kernels off (the torch-operation path runs).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

BLOCK_ROWS, BLOCK_COLS = 64, 64


@functools.lru_cache(maxsize=None)
def _triton() -> Optional[object]:
    try:
        import triton
    except ImportError:
        return None
    return triton


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``): the kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def enabled(t: Tensor) -> bool:
    """Whether the fused passes on ``t`` run as these kernels: a CUDA tensor (or any under the
    interpreter), Triton installed, and not turned off with ``DENSENET_ZOO_KERNELS=torch``."""
    if not (t.is_cuda or interpreting()) or os.environ.get("DENSENET_ZOO_KERNELS", "triton") == "torch":
        return False
    return _triton() is not None


@functools.lru_cache(maxsize=None)
def _kernel(name: str, interpret: bool) -> object:
    """Kernel ``name``, decorated when first used (Triton reads ``TRITON_INTERPRET`` when it decorates;
    ``interpret`` is part of the cache key only)."""
    return _BUILDERS[name]()


def _build_column_sums() -> object:
    import triton
    import triton.language as tl

    @triton.jit
    def column_sums_kernel(x_ptr, mean_ptr, out_ptr, rows, cols, stride_r, stride_c,
                           CENTRED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_r, pid_c = tl.program_id(0), tl.program_id(1)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = (r[:, None] < rows) & (c[None, :] < cols)
        acc = out_ptr.dtype.element_ty
        v = tl.load(x_ptr + r[:, None] * stride_r + c[None, :] * stride_c, mask=inside, other=0.0).to(acc)
        if CENTRED:
            mean = tl.load(mean_ptr + c, mask=c < cols, other=0.0)
            v = tl.where(inside, v - mean[None, :], 0.0)
            v = v * v
        tl.store(out_ptr + pid_r * cols + c, tl.sum(v, axis=0), mask=c < cols)

    return column_sums_kernel


def _build_norm_relu() -> object:
    import triton
    import triton.language as tl

    @triton.jit
    def norm_relu_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, rows, cols, stride_r, stride_c,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_r, pid_c = tl.program_id(0), tl.program_id(1)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = (r[:, None] < rows) & (c[None, :] < cols)
        scale = tl.load(scale_ptr + c, mask=c < cols, other=0.0)
        shift = tl.load(shift_ptr + c, mask=c < cols, other=0.0)
        x = tl.load(x_ptr + r[:, None] * stride_r + c[None, :] * stride_c, mask=inside, other=0.0).to(scale.dtype)
        y = tl.maximum(x * scale[None, :] + shift[None, :], 0.0)
        tl.store(out_ptr + r[:, None] * cols + c[None, :], y.to(out_ptr.dtype.element_ty), mask=inside)

    return norm_relu_kernel


def _build_relu_norm_backward() -> object:
    import triton
    import triton.language as tl

    @triton.jit
    def relu_norm_backward_kernel(g_ptr, x_ptr, gx_ptr, out_ptr, scale_ptr, shift_ptr, mean_ptr, sums_ptr,
                                  rows, cols, stride_gr, stride_gc, stride_xr, stride_xc, stride_gxr, stride_gxc,
                                  ACCUMULATE: tl.constexpr, WRITE_OUTPUT: tl.constexpr,
                                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_r, pid_c = tl.program_id(0), tl.program_id(1)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = (r[:, None] < rows) & (c[None, :] < cols)
        scale = tl.load(scale_ptr + c, mask=c < cols, other=0.0)
        shift = tl.load(shift_ptr + c, mask=c < cols, other=0.0)
        mean = tl.load(mean_ptr + c, mask=c < cols, other=0.0)
        x = tl.load(x_ptr + r[:, None] * stride_xr + c[None, :] * stride_xc, mask=inside, other=0.0).to(scale.dtype)
        dense = r[:, None] * cols + c[None, :]
        g = tl.load(g_ptr + r[:, None] * stride_gr + c[None, :] * stride_gc, mask=inside, other=0.0).to(scale.dtype)
        pre = x * scale[None, :] + shift[None, :]
        g = tl.where(inside & (pre > 0.0), g, 0.0)
        if WRITE_OUTPUT:  # the norm + ReLU output, for the convolution's weight gradient
            tl.store(out_ptr + dense, tl.maximum(pre, 0.0).to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(sums_ptr + pid_r * 2 * cols + c, tl.sum(g, axis=0), mask=c < cols)
        tl.store(sums_ptr + pid_r * 2 * cols + cols + c, tl.sum(g * (x - mean[None, :]), axis=0), mask=c < cols)
        gx_at = gx_ptr + r[:, None] * stride_gxr + c[None, :] * stride_gxc
        gx = g * scale[None, :]
        if ACCUMULATE:
            gx += tl.load(gx_at, mask=inside, other=0.0).to(scale.dtype)
        tl.store(gx_at, gx.to(gx_ptr.dtype.element_ty), mask=inside)

    return relu_norm_backward_kernel


_BUILDERS = {"column_sums": _build_column_sums, "norm_relu": _build_norm_relu,
             "relu_norm_backward": _build_relu_norm_backward}


def _grid(rows: int, cols: int) -> Tuple[int, int]:
    return (-(-rows // BLOCK_ROWS), -(-cols // BLOCK_COLS))


def _launch(name: str, grid: Tuple[int, int], *args: object, **constants: object) -> None:
    kernel = _kernel(name, interpreting())
    with contextlib.nullcontext() if interpreting() else torch.cuda.device(args[0].device):
        kernel[grid](*args, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS, **constants)


def column_sums(x: Tensor, acc: torch.dtype, mean: Optional[Tensor] = None) -> Tensor:
    """Per-column sums of a (rows, cols) matrix (any strides) in ``acc``; with ``mean``, sums of
    squared deviations from it."""
    rows, cols = x.shape
    grid = _grid(rows, cols)
    partial = torch.empty((grid[0], cols), dtype=acc, device=x.device)
    centre = partial if mean is None else mean.to(acc).contiguous()  # not read without CENTRED
    _launch("column_sums", grid, x, centre, partial, rows, cols, x.stride(0), x.stride(1), CENTRED=mean is not None)
    return partial.sum(0)


def norm_relu(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> Tensor:
    """``out = relu(x * scale + shift)`` (per column; computed in ``scale``'s dtype) for a (rows, cols)
    ``x`` of any strides; ``out`` is dense."""
    rows, cols = x.shape
    _launch("norm_relu", _grid(rows, cols), x, scale.contiguous(), shift.to(scale.dtype).contiguous(), out, rows, cols,
            x.stride(0), x.stride(1))
    return out


def relu_norm_backward_pass(g: Tensor, x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, grad_x: Tensor,
                            accumulate: bool, output: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One pass of the backward of ``relu(x * scale + shift)`` followed by a batch norm's closed form.

    ``g`` is d loss/d output; ``grad_x`` gets ``g' * scale`` written or added,
    with ``g'`` the ReLU-masked ``g`` (``g``, ``x``, ``grad_x``: any strides); ``output`` (dense), when given, gets the forward's output.
    Returns the per-column sums of ``g'`` and of ``g' * (x - mean)``, in ``scale``'s dtype.
    """
    rows, cols = x.shape
    grid = _grid(rows, cols)
    sums = torch.empty((grid[0], 2, cols), dtype=scale.dtype, device=x.device)
    _launch("relu_norm_backward", grid, g, x, grad_x, g if output is None else output, scale.contiguous(),
            shift.to(scale.dtype).contiguous(), mean.to(scale.dtype).contiguous(), sums, rows, cols, g.stride(0), g.stride(1),
            x.stride(0), x.stride(1), grad_x.stride(0), grad_x.stride(1), ACCUMULATE=accumulate, WRITE_OUTPUT=output is not None)
    total = sums.sum(0)
    return total[0], total[1]
