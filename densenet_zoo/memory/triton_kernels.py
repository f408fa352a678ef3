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

The kernels' source is :mod:`.triton_jit`; arithmetic runs in float32 (float64 for float64
tensors), the dtype of the statistics. Triton's interpreter runs the same kernels on CPU tensors
(``TRITON_INTERPRET=1``, read when Triton is imported): the tests do so on small shapes. ``DENSENET_ZOO_KERNELS=torch`` turns the kernels off (the torch-operation path runs).
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


def _kernel(name: str) -> object:
    """Kernel ``name`` of :mod:`.triton_jit`, imported when first launched (importing Triton is not free)."""
    from . import triton_jit

    return getattr(triton_jit, f"{name}_kernel")


def _grid(rows: int, cols: int) -> Tuple[int, int]:
    return (-(-rows // BLOCK_ROWS), -(-cols // BLOCK_COLS))


def _launch(name: str, grid: Tuple[int, int], *args: object, **constants: object) -> None:
    kernel = _kernel(name)
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
