"""The Triton source of the fused block's kernels (wrapped and launched by :mod:`.triton_kernels`).

Imported only where the kernels run (a CUDA tensor, or Triton's interpreter), so a process that
never reaches them never imports Triton. Triton decides at import whether to interpret
(``TRITON_INTERPRET=1``) or compile.

Every kernel works on one ``BLOCK_R`` x ``BLOCK_C`` tile of a (rows, cols) matrix of any strides;
:func:`tile` and :func:`load_tile` are their shared prologue. Arithmetic runs in the dtype of the
per-column vectors (float32, or float64 for float64 tensors).
"""

import triton
import triton.language as tl


@triton.jit
def tile(rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's row and column indices, the in-bounds mask of the tile and of its columns.

    The indices are 64-bit: ``row * row_stride`` passes 2**31 elements in a large batch (the block
    buffer of DenseNet-121's first block at about 2,700 images of 224x224), where 32-bit offsets wrap.
    """
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    return r, c, (r[:, None] < rows) & (c[None, :] < cols), c < cols


@triton.jit
def load_tile(ptr, r, c, stride_r, stride_c, inside, dtype: tl.constexpr):
    """The tile of a strided matrix, as ``dtype``; zero outside the matrix."""
    return tl.load(ptr + r[:, None] * stride_r + c[None, :] * stride_c, mask=inside, other=0.0).to(dtype)


@triton.jit
def column_sums_kernel(x_ptr, mean_ptr, out_ptr, rows, cols, stride_r, stride_c,
                       CENTRED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row ``program_id(0)`` of ``out``: the tile's column sums of ``x`` (or, ``CENTRED``, of ``(x - mean)**2``)."""
    r, c, inside, in_cols = tile(rows, cols, BLOCK_R, BLOCK_C)
    v = load_tile(x_ptr, r, c, stride_r, stride_c, inside, out_ptr.dtype.element_ty)
    if CENTRED:
        mean = tl.load(mean_ptr + c, mask=in_cols, other=0.0)
        v = tl.where(inside, v - mean[None, :], 0.0)
        v = v * v
    tl.store(out_ptr + tl.program_id(0) * cols + c, tl.sum(v, axis=0), mask=in_cols)


@triton.jit
def norm_relu_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, rows, cols, stride_r, stride_c,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``out = relu(x * scale + shift)``, ``out`` dense."""
    r, c, inside, in_cols = tile(rows, cols, BLOCK_R, BLOCK_C)
    scale = tl.load(scale_ptr + c, mask=in_cols, other=0.0)
    shift = tl.load(shift_ptr + c, mask=in_cols, other=0.0)
    x = load_tile(x_ptr, r, c, stride_r, stride_c, inside, scale.dtype)
    y = tl.maximum(x * scale[None, :] + shift[None, :], 0.0)
    tl.store(out_ptr + r[:, None] * cols + c[None, :], y.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def relu_norm_backward_kernel(g_ptr, x_ptr, gx_ptr, out_ptr, scale_ptr, shift_ptr, mean_ptr, sums_ptr,
                              rows, cols, stride_gr, stride_gc, stride_xr, stride_xc, stride_gxr, stride_gxc,
                              ACCUMULATE: tl.constexpr, WRITE_OUTPUT: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The ReLU-masked gradient ``g'``; its two batch-norm sums into row ``program_id(0)`` of ``sums``;
    ``gx (+)= g' * scale``; with ``WRITE_OUTPUT``, the forward's output into the dense ``out``."""
    r, c, inside, in_cols = tile(rows, cols, BLOCK_R, BLOCK_C)
    scale = tl.load(scale_ptr + c, mask=in_cols, other=0.0)
    shift = tl.load(shift_ptr + c, mask=in_cols, other=0.0)
    mean = tl.load(mean_ptr + c, mask=in_cols, other=0.0)
    x = load_tile(x_ptr, r, c, stride_xr, stride_xc, inside, scale.dtype)
    g = load_tile(g_ptr, r, c, stride_gr, stride_gc, inside, scale.dtype)
    pre = x * scale[None, :] + shift[None, :]
    g = tl.where(inside & (pre > 0.0), g, 0.0)
    if WRITE_OUTPUT:  # the norm + ReLU output, for the convolution's weight gradient
        tl.store(out_ptr + r[:, None] * cols + c[None, :], tl.maximum(pre, 0.0).to(out_ptr.dtype.element_ty), mask=inside)
    row = sums_ptr + tl.program_id(0) * 2 * cols
    tl.store(row + c, tl.sum(g, axis=0), mask=in_cols)
    tl.store(row + cols + c, tl.sum(g * (x - mean[None, :]), axis=0), mask=in_cols)
    gx = g * scale[None, :]
    if ACCUMULATE:
        gx += load_tile(gx_ptr, r, c, stride_gxr, stride_gxc, inside, scale.dtype)
    tl.store(gx_ptr + r[:, None] * stride_gxr + c[None, :] * stride_gxc, gx.to(gx_ptr.dtype.element_ty), mask=inside)
