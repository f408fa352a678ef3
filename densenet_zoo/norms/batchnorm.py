"""BatchNorm written from tensor operations: ``_NormBase`` -> ``_BatchNorm`` -> ``BatchNorm2d``, and a
``SyncBatchNorm`` that synchronises statistics over any ``torch.distributed`` backend (gloo on CPU too).

Forward and backward are explicit (:class:`BatchNormFunction`), not ``F.batch_norm``, with the
arithmetic of :mod:`.bn_math`. Statistics and gradients accumulate in float32 for float16/bfloat16
inputs; outputs keep the input's dtype and memory format (channels_last stays channels_last). The
state dict is that of ``nn.BatchNorm2d``.

>>> bn = BatchNorm2d(64)
>>> bn.load_state_dict(torch.nn.BatchNorm2d(64).state_dict())
<All keys matched successfully>
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.autograd.function import once_differentiable

from .bn_math import acc_dtype, average_factor, inv_std, moments, norm_scale, scale_shift, update_running_stats

#: Whether this torch's ``nn.BatchNorm2d`` takes ``bias=`` (and writes it in its repr).
_TORCH_HAS_BIAS = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters

__all__ = ["BatchNormFunction", "BatchNorm2d", "SyncBatchNorm", "FrozenBatchNorm2d"]

_DIMS = (0, 2, 3)  # every dimension but channels


def _acc(x: Tensor) -> Tensor:
    return x.to(acc_dtype(x.dtype))


def _per_channel(v: Tensor) -> Tensor:
    return v.reshape(1, -1, 1, 1)


def local_stats(x: Tensor) -> Tuple[int, Tensor, Tensor]:
    """Count per channel, mean and sum of squared deviations (M2) of ``x`` over N, H, W, in fp32 or wider.

    Two passes (:func:`~densenet_zoo.norms.bn_math.moments`); an empty batch gives zeros.
    """
    count = x.numel() // x.shape[1] if x.dim() > 1 else 0
    xa = _acc(x)
    if count == 0:
        zeros = xa.new_zeros(x.shape[1])
        return 0, zeros, zeros.clone()
    mean, m2 = moments(xa, _DIMS, channel_shape=(-1, 1, 1))
    return count, mean, m2


def merge_stats(counts: Tensor, means: Tensor, m2s: Tensor) -> Tuple[int, Tensor, Tensor]:
    """Combine per-group (count, mean, M2) rows into one (Chan et al.'s parallel variance); empty rows are fine."""
    total = counts.sum()
    n = int(total.item())
    if n == 0:
        return 0, means[0] * 0, m2s[0] * 0
    weights = (counts / total).unsqueeze(1)
    mean = (weights * means).sum(0)
    m2 = (m2s + counts.unsqueeze(1) * (means - mean).square()).sum(0)
    return n, mean, m2


class BatchNormFunction(torch.autograd.Function):
    """``y = (x - mean) * invstd * weight + bias`` with a hand-written backward.

    ``batch_stats=True`` means ``mean``/``invstd`` were computed from ``x`` itself (training), so
    the backward carries the terms through the statistics; over a process group ``group`` the
    per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` are all-reduced first and ``count`` is the
    global number of values per channel. Otherwise they are constants (running statistics).
    Gradients of ``weight``/``bias`` are the local ones (DDP averages parameter gradients).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                invstd: Tensor, batch_stats: bool, count: int, group: Any = None) -> Tensor:
        xa = _acc(x)
        scale, shift = scale_shift(weight, bias, mean, invstd)
        y = torch.addcmul(_per_channel(shift), xa, _per_channel(scale))
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.batch_stats, ctx.count, ctx.group = batch_stats, count, group
        ctx.has_bias = bias is not None
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dya = dy.to(mean.dtype)
        xmu = _acc(x) - _per_channel(mean)
        sum_dy = dya.sum(_DIMS) if x.numel() else dya.new_zeros(mean.shape)
        sum_dy_xmu = (dya * xmu).sum(_DIMS) if x.numel() else dya.new_zeros(mean.shape)
        grad_w = (sum_dy_xmu * invstd).to(weight.dtype) if need_w and weight is not None else None
        grad_b = sum_dy.to(weight.dtype if weight is not None else dy.dtype) if need_b and ctx.has_bias else None
        grad_x = None
        if need_x or (ctx.batch_stats and ctx.group is not None):
            scale = norm_scale(weight, invstd)
            if ctx.batch_stats:
                if ctx.group is not None:
                    # Every rank joins, even one whose input needs no gradient or is empty.
                    both = torch.cat([sum_dy, sum_dy_xmu])
                    dist.all_reduce(both, group=ctx.group)
                    sum_dy, sum_dy_xmu = both.chunk(2)
                mean_dy = sum_dy / ctx.count
                mean_dy_xmu = sum_dy_xmu / ctx.count
                grad = (dya - _per_channel(mean_dy)) - xmu * _per_channel(invstd.square() * mean_dy_xmu)
                grad_x = (grad * _per_channel(scale)).to(x.dtype)
            else:
                grad_x = (dya * _per_channel(scale)).to(x.dtype)
            if not need_x:
                grad_x = None
        return grad_x, grad_w, grad_b, None, None, None, None, None


class _NormBase(nn.Module):
    """Parameters and buffers shared by the batch norms (``nn.BatchNorm2d``'s state dict layout)."""

    _version = 2

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: Any = None, *, bias: bool = True) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer (the number of channels), got {num_features!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None (cumulative average), got {momentum!r}")
        kw = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **kw))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **kw))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **kw))
            self.register_buffer("running_var", torch.ones(num_features, **kw))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, x: Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        # As the installed torch writes it: ``bias=`` only where its BatchNorm2d has that argument (or it is False).
        bias = f"bias={self.bias is not None}, " if _TORCH_HAS_BIAS or (self.affine and self.bias is None) else ""
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, {bias}"
                f"track_running_stats={self.track_running_stats}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Checkpoints written before num_batches_tracked existed (version < 2) load with a zero count.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = self.num_batches_tracked if self.num_batches_tracked is not None else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class _BatchNorm(_NormBase):
    """Batch statistics in training (running statistics updated), running statistics in eval.

    ``momentum=None`` makes the running statistics a cumulative average; ``track_running_stats=False``
    uses batch statistics always. The running variance is unbiased, normalisation uses the biased one.
    """

    def _batch_stats(self, x: Tensor) -> Tuple[int, Tensor, Tensor]:
        """(count, mean, M2) of this batch; :class:`SyncBatchNorm` makes them global."""
        return local_stats(x)

    def _group(self) -> Any:
        return None

    def _use_batch_stats(self) -> bool:
        return self.training or self.running_mean is None

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        use_batch_stats = self._use_batch_stats()
        factor = average_factor(self) if use_batch_stats and self.training else 0.0
        if not use_batch_stats:
            acc = acc_dtype(x.dtype)
            mean = self.running_mean.to(acc, copy=True)  # saved for backward: not the buffer itself
            invstd = inv_std(self.running_var.to(acc), self.eps)
            return BatchNormFunction.apply(x, self.weight, self.bias, mean, invstd, False, 0, None)
        with torch.no_grad():
            count, mean, m2 = self._batch_stats(x.detach())
        if count <= 1 and (count == 1 or self._group() is not None):
            where = " summed over the process group" if self._group() is not None else ""
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
                             f"{where}; use a larger batch (or more pixels per image) or eval mode")
        if count == 0:  # as nn.BatchNorm2d: an empty batch gives an empty output and leaves the statistics
            return BatchNormFunction.apply(x, self.weight, self.bias, mean, mean + 1, False, 0, None)
        var = m2 / count
        if factor > 0:
            update_running_stats(self, factor, count, mean, m2)
        invstd = inv_std(var, self.eps)
        return BatchNormFunction.apply(x, self.weight, self.bias, mean, invstd, True, count, self._group())


class BatchNorm2d(_BatchNorm):
    """Drop-in for ``nn.BatchNorm2d`` on (N, C, H, W) inputs, with a hand-written backward.

    bf16/fp16 inputs accumulate their statistics in fp32; a channels_last input gives a
    channels_last output.

    Args:
        num_features: channels C of the (N, C, H, W) input.
        eps: added to the variance before the square root.
        momentum: weight of the batch statistics in the running ones; ``None`` for a cumulative
            average over all batches seen.
        affine: whether the layer has a learnable ``weight`` (and ``bias``).
        track_running_stats: whether running statistics are kept and used in eval; without them
            batch statistics are used in every mode.
        device: where the parameters and buffers are created.
        dtype: their dtype.
        bias: with ``affine=True``, ``False`` keeps ``weight`` but no ``bias``.

    Raises:
        ValueError: on an input that is not 4-D or has another number of channels (at forward).

    Example:
        >>> BatchNorm2d(64)(torch.randn(8, 64, 7, 7)).shape
        torch.Size([8, 64, 7, 7])
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects a 4-D input (N, C, H, W), got {x.dim()}-D input of shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got an input with {x.shape[1]} channels; "
                             f"build it with num_features={x.shape[1]} or check the preceding layer")


class SyncBatchNorm(BatchNorm2d):
    """BatchNorm whose training statistics are those of the whole batch across a process group.

    Works on any backend (gloo on CPU, NCCL on CUDA): each rank contributes (count, mean, M2) per
    channel through one all-gather, and backward all-reduces ``sum(dy)`` and ``sum(dy * (x - mean))``.
    Ranks may hold different batch sizes, including none. Outside training, without an initialised
    process group, or on a group of one, it is plain :class:`BatchNorm2d`.

    Args:
        num_features: channels C of the (N, C, H, W) input.
        eps: added to the variance before the square root.
        momentum: weight of the batch statistics in the running ones; ``None`` for a cumulative
            average over all batches seen.
        affine: whether the layer has a learnable ``weight`` (and ``bias``).
        track_running_stats: whether running statistics are kept and used in eval; without them
            batch statistics are used in every mode.
        process_group: the ``torch.distributed`` group to share statistics over; ``None`` for
            every rank.
        device: where the parameters and buffers are created.
        dtype: their dtype.
        bias: with ``affine=True``, ``False`` keeps ``weight`` but no ``bias``.

    Example:
        bn = SyncBatchNorm(64)              # default group: every rank
        ddp = torch.nn.parallel.DistributedDataParallel(model_with_sync_bn)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device: Any = None, dtype: Any = None,
                 *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _group(self) -> Any:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _batch_stats(self, x: Tensor) -> Tuple[int, Tensor, Tensor]:
        group = self._group()
        count, mean, m2 = local_stats(x)
        if group is None:
            return count, mean, m2
        # One row per rank: [count, mean..., M2...], merged without the cancellation of sum/sum-of-squares.
        row = torch.cat([mean.new_tensor([float(count)]), mean, m2])
        rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, row, group=group)
        table = torch.stack(rows)
        c = self.num_features
        return merge_stats(table[:, 0], table[:, 1:1 + c], table[:, 1 + c:])


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine, all stored as buffers: no gradient, no update.

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` in every mode. Loads
    ``nn.BatchNorm2d`` state dicts; ``num_batches_tracked`` is kept as an inert buffer so that converting
    back to BatchNorm loses nothing, and state dicts without it (torchvision's ``FrozenBatchNorm2d``) load too.

    Args:
        num_features: channels C of the (N, C, H, W) input.
        eps: added to the variance before the square root.
        device: where the buffers are created.
        dtype: their dtype.

    Example:
        >>> frozen = FrozenBatchNorm2d(64)
        >>> frozen.load_state_dict(torch.nn.BatchNorm2d(64).state_dict())
        <All keys matched successfully>
    """

    def __init__(self, num_features: int, eps: float = 1e-5, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict[key] = torch.zeros_like(self.num_batches_tracked)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"FrozenBatchNorm2d({self.num_features}) expects (N, {self.num_features}, H, W), got shape {tuple(x.shape)}")
        acc = acc_dtype(x.dtype)
        mean = self.running_mean.to(acc)
        scale, shift = scale_shift(self.weight, self.bias, mean, inv_std(self.running_var.to(acc), self.eps))
        return torch.addcmul(_per_channel(shift), _acc(x), _per_channel(scale)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
