"""Batch-norm arithmetic, once: the accumulation dtype, two-pass moments, scale and shift from
statistics, and the running-statistics update.

Our :class:`~densenet_zoo.norms.batchnorm.BatchNorm2d`, the fused functions of
:mod:`densenet_zoo.memory` and BN folding (:mod:`densenet_zoo.infer.folding`) all compute with these.

>>> import torch
>>> mean, m2 = moments(torch.tensor([[1.0], [3.0]]), (0,))
>>> mean, m2
(tensor([2.]), tensor([2.]))
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

#: The reduced-precision formats whose statistics and reductions run in float32.
LOW_PRECISION = (torch.bfloat16, torch.float16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype batch statistics accumulate in: float32 for float16/bfloat16, the input's own otherwise.

    Args:
        dtype: the dtype of the values normalised.

    Returns:
        ``torch.float32`` or ``dtype``.

    Example::

        acc_dtype(torch.bfloat16)   # torch.float32
    """
    return torch.float32 if dtype in LOW_PRECISION else dtype


def moments(x: Tensor, dims: Sequence[int], step: Optional[int] = None, temp: Optional[Tensor] = None,
            channel_shape: Tuple[int, ...] = ()) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and sum of squared deviations (M2) of ``x`` over ``dims``, two passes, in
    :func:`acc_dtype` of ``x``.

    The mean first, then the squared deviations from it (no cancellation, unlike sum and sum of
    squares). With ``step`` both passes run over slices of ``step`` entries of dimension 0, so that no
    temporary as large as ``x`` exists; ``temp`` (a flat tensor in the accumulation dtype, at least
    one slice large) then holds a slice's deviations.

    Args:
        x: the values, channels in dimension 1 (the one dimension not in ``dims``); not empty.
        dims: the dimensions reduced (``(0,)`` for a (pixels, channels) matrix, ``(0, 2, 3)`` for N, C, H, W).
        step: entries of dimension 0 per slice; None: the whole of ``x`` at once.
        temp: scratch memory for one slice's deviations; None: allocated.
        channel_shape: the shape of the mean as it broadcasts against ``x`` (``(-1, 1, 1)`` for
            N, C, H, W); ``()`` for a (pixels, channels) matrix.

    Returns:
        ``(mean, m2)``, one value per channel.
    """
    acc = acc_dtype(x.dtype)
    count = x.numel() // x.shape[1]
    if step is None:  # one slice: no running totals
        mean = x.sum(dims, dtype=acc) / count
        return mean, centred(x, mean.view(channel_shape) if channel_shape else mean, temp).square_().sum(dims)
    total = torch.zeros(x.shape[1], dtype=acc, device=x.device)
    for r in range(0, x.shape[0], step):
        total += x[r : r + step].sum(dims, dtype=acc)
    mean = total / count
    total = torch.zeros_like(total)
    centre = mean.view(channel_shape) if channel_shape else mean
    for r in range(0, x.shape[0], step):
        total += centred(x[r : r + step], centre, temp).square_().sum(dims)
    return mean, total


def centred(x: Tensor, mean: Tensor, temp: Optional[Tensor] = None) -> Tensor:
    """``x - mean`` in ``mean``'s dtype, in ``temp`` (flat, dense, at least as large as ``x``) when given.

    Args:
        x: the values.
        mean: per-channel means, shaped to broadcast against ``x``.
        temp: flat scratch memory in ``mean``'s dtype; None: a new tensor laid out like ``x``.

    Returns:
        The deviations, dense.
    """
    if temp is None:
        return (x if x.dtype == mean.dtype else x.to(mean.dtype)) - mean
    out = temp[: x.numel()].view(x.shape)
    return torch.sub(x, mean, out=out) if x.dtype == out.dtype else out.copy_(x).sub_(mean)


def inv_std(var: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(var + eps)``: what a batch norm multiplies the centred values by.

    Example::

        inv_std(torch.ones(3), 1e-5)
    """
    return (var + eps).rsqrt()


def scale_shift(weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor) -> Tuple[Tensor, Tensor]:
    """``(scale, shift)`` with ``batch_norm(x) == x * scale + shift`` for these statistics and affine parameters.

    Args:
        weight: the norm's weight (None: 1), cast to ``mean``'s dtype.
        bias: the norm's bias (None: 0), cast to ``mean``'s dtype.
        mean: per-channel mean the norm subtracts.
        invstd: per-channel ``1 / sqrt(var + eps)``.

    Returns:
        Per-channel scale and shift in ``mean``'s dtype.

    Example::

        scale, shift = scale_shift(norm.weight, norm.bias, norm.running_mean, inv_std(norm.running_var, norm.eps))
    """
    scale = norm_scale(weight, invstd)
    return scale, (-mean * scale if bias is None else bias.to(mean.dtype) - mean * scale)


def norm_scale(weight: Optional[Tensor], invstd: Tensor) -> Tensor:
    """What a batch norm multiplies ``x - mean`` by: ``invstd * weight`` (``weight`` cast to ``invstd``'s dtype).

    Example::

        norm_scale(norm.weight, inv_std(norm.running_var, norm.eps))
    """
    return invstd if weight is None else invstd * weight.to(invstd.dtype)


def average_factor(norm: nn.Module) -> float:
    """What ``nn.BatchNorm2d`` does in training before it normalises: count the batch in
    ``num_batches_tracked`` and return the weight of this batch in the running statistics.

    Args:
        norm: a batch norm in training mode.

    Returns:
        ``momentum``, or ``1 / num_batches_tracked`` for a cumulative average; 0 for a norm without
        running statistics.

    Example::

        factor = average_factor(norm)   # before update_running_stats(norm, factor, ...)
    """
    if not norm.track_running_stats or norm.running_mean is None:
        return 0.0
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
    return 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum


@torch.no_grad()
def update_running_stats(norm: nn.Module, factor: float, count: int, mean: Tensor, m2: Tensor) -> None:
    """Move the running mean towards ``mean`` and the running variance towards the unbiased
    ``m2 / (count - 1)`` by ``factor``, computed in the statistics' precision.

    Args:
        norm: the batch norm whose ``running_mean`` and ``running_var`` change.
        factor: the weight of this batch (:func:`average_factor`).
        count: values per channel in the batch.
        mean: the batch's per-channel mean.
        m2: the batch's per-channel sum of squared deviations.

    Example::

        update_running_stats(norm, average_factor(norm), count, mean, m2)
    """
    rm, rv = norm.running_mean, norm.running_var
    rm.copy_((rm.to(mean.dtype) * (1 - factor) + mean * factor).to(rm.dtype))
    rv.copy_((rv.to(mean.dtype) * (1 - factor) + m2 / (count - 1) * factor).to(rv.dtype))
