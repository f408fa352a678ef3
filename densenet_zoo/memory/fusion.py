"""What the fused stem, block and transition share (their three modules import this one, not each other).

- when modules can run inside one autograd function: :func:`plain_batchnorm`, :func:`plain_conv`,
  :func:`no_forward_hooks` (a function calls no modules, so their hooks would not fire);
- the dtype they compute in (:func:`compute_dtype`) and the autocast state (:func:`autocast_dtype`,
  :func:`autocast_state`), which the recomputing layers of :mod:`.recompute` read too;
- a batch's statistics and the running-statistics update, once (:func:`batch_statistics`, :func:`record_batch`);
- the parameter gradients in the order autograd expects them (:func:`ordered_grads`).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules import module as torch_module

from ..norms.batchnorm import BatchNorm2d
from ..norms.bn_math import LOW_PRECISION, average_factor, inv_std, update_running_stats
from .kernels import column_moments


def plain_batchnorm(norm: nn.Module) -> bool:
    """A training-mode ``nn.BatchNorm2d`` or our :class:`~densenet_zoo.norms.batchnorm.BatchNorm2d` (same semantics)."""
    return type(norm) in (nn.BatchNorm2d, BatchNorm2d) and norm.training


def plain_conv(conv: nn.Module, kernel: Optional[int] = None, allow_bias: bool = False) -> bool:
    """An ``nn.Conv2d`` whose forward is ``conv2d`` of its own weight: zero padding given as numbers, no
    parametrization, no bias unless ``allow_bias``; with ``kernel``, also a ``kernel`` x ``kernel``
    convolution of stride 1 and one group that keeps the size."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    if (conv.bias is not None and not allow_bias) or nn.utils.parametrize.is_parametrized(conv):
        return False
    return kernel is None or (
        conv.groups == 1 and conv.kernel_size == (kernel, kernel) and conv.stride == (1, 1)
        and conv.dilation == (1, 1) and conv.padding == (kernel // 2, kernel // 2)
    )


def no_forward_hooks(modules: Iterable[nn.Module]) -> bool:
    """No forward hooks on these modules (or on every module): a fused function would not call them."""
    if getattr(torch_module, "_global_forward_hooks", None) or getattr(torch_module, "_global_forward_pre_hooks", None):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def autocast_dtype(device: str) -> Optional[torch.dtype]:
    """The dtype autocast casts to on ``device`` ("cpu" or "cuda"); None where autocast is off."""
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def autocast_state(device: str) -> Dict[str, Any]:
    """``torch.autocast`` arguments that reproduce the current autocast state of ``device``."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return {"device_type": device if device in ("cpu", "cuda") else "cpu", "enabled": False}
    return {"device_type": device, "dtype": dtype, "enabled": True}


def compute_dtype(x: Tensor, casts_input: bool = False) -> Optional[torch.dtype]:
    """The dtype a fused function computes in: ``x``'s float32/float64, or under autocast the autocast
    dtype; None where it cannot run.

    Under autocast normal mode's activations all have the autocast dtype (convolutions cast to it,
    batch norm and ReLU keep it), so the fused block runs when its input has that dtype already;
    with ``casts_input`` (the stem, whose first convolution casts the float32 image) any float input.
    """
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:
        accepted = x.is_floating_point() if casts_input else x.dtype == dtype
        return dtype if dtype in LOW_PRECISION and accepted else None
    return x.dtype if x.dtype in (torch.float32, torch.float64) else None


def record_batch(norm: nn.Module, rows: int, mean: Tensor, var: Tensor) -> Tensor:
    """Update a training-mode batch norm's running statistics once with a batch's mean and biased
    variance over ``rows`` values; returns the batch's 1/std."""
    factor = average_factor(norm)
    if factor:  # 0: no running statistics (or momentum 0: they would not move)
        update_running_stats(norm, factor, rows, mean, var * rows)
    return inv_std(var, norm.eps)


def batch_statistics(norm: nn.Module, mat: Tensor) -> Tuple[Tensor, Tensor]:
    """Batch mean and 1/std of a (pixels, channels) matrix for a training-mode batch norm, whose
    running statistics are updated with them, once."""
    mean, var = column_moments(mat)
    return mean, record_batch(norm, mat.shape[0], mean, var)


def wants_grad(p: Optional[Tensor]) -> bool:
    """Whether ``p`` is a tensor autograd wants a gradient for."""
    return p is not None and p.requires_grad


def ordered_grads(params: Iterable[Tensor], pairs: Iterable[Tuple[Optional[Tensor], Optional[Tensor]]]) -> List[Optional[Tensor]]:
    """The gradients of ``params``, in order, from (parameter, gradient) pairs: shaped and typed like
    each parameter (under autocast they were computed in the cast-down dtype); None for a parameter
    that needs none or has none."""
    found = {id(p): g for p, g in pairs if wants_grad(p) and g is not None}
    return [found[id(p)].view(p.shape).to(p.dtype) if id(p) in found else None for p in params]
