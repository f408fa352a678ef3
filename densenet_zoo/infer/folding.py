"""BN folding: an eval-mode BatchNorm as a per-channel affine map, folded into the convolution before it.

``conv0 -> norm0`` and ``conv1 -> norm2`` fold exactly (:func:`fold_bn`); what the other norms do is
in :mod:`.fast`.
"""

from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..models.densenet import DenseNet, DenseLayer
from ..norms.bn_math import inv_std, scale_shift
from .inputs import require_eval as _require_eval

__all__ = ["fold_bn", "norm_as_affine"]


def norm_as_affine(norm: nn.Module, num_features: int) -> Optional[Tuple[Tensor, Tensor]]:
    """Per-channel ``(scale, shift)`` in float64 with ``norm(x) == scale * x + shift`` in eval, or None.

    Example::

        scale, shift = norm_as_affine(model.features.norm0, 64)

    BatchNorm-like modules (running statistics, ``eps``) are read directly; otherwise, or when
    that reading does not reproduce the module, the module is probed. Either way the result is
    checked against the module's own output on a random input, so a norm whose eval output is
    not a per-channel affine map (GroupNorm, BN using batch statistics) gives None.
    """
    if norm.training:
        return None
    if isinstance(norm, nn.Identity):
        return torch.ones(num_features, dtype=torch.float64), torch.zeros(num_features, dtype=torch.float64)
    ref = next(iter(list(norm.parameters()) + list(norm.buffers())), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    x = torch.randn(3, num_features, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    with torch.no_grad():
        try:
            got = norm(x.to(device, dtype)).double().cpu()
        except Exception:  # a module that cannot run on this input is not usable as an affine map
            return None
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
        for candidate in (_read_bn, _probe):
            affine = candidate(norm, num_features, device, dtype)
            if affine is None:
                continue
            scale, shift = affine[0].cpu(), affine[1].cpu()
            expected = x * scale[:, None, None] + shift[:, None, None]
            if got.shape == expected.shape and torch.allclose(got, expected, rtol=tol, atol=tol * float(expected.abs().max().clamp_min(1))):
                return scale, shift
    return None


def _read_bn(norm: nn.Module, num_features: int, device: torch.device, dtype: torch.dtype) -> Optional[Tuple[Tensor, Tensor]]:
    """BatchNorm semantics read from ``running_mean``/``running_var``/``eps``/``weight``/``bias``."""
    mean, var, eps = (getattr(norm, k, None) for k in ("running_mean", "running_var", "eps"))
    if not (isinstance(mean, Tensor) and isinstance(var, Tensor) and eps is not None and getattr(norm, "track_running_stats", True)):
        return None
    weight, bias = (getattr(norm, k, None) for k in ("weight", "bias"))
    weight = weight.double() if isinstance(weight, Tensor) else None
    bias = bias.double() if isinstance(bias, Tensor) else None
    return scale_shift(weight, bias, mean.double(), inv_std(var.double(), float(eps)))


def _probe(norm: nn.Module, num_features: int, device: torch.device, dtype: torch.dtype) -> Optional[Tuple[Tensor, Tensor]]:
    """The module's outputs for constant inputs 0 and 1 (an affine map is determined by those)."""
    probe = torch.stack([torch.zeros(num_features), torch.ones(num_features)]).to(device, dtype)
    try:
        out = norm(probe[:, :, None, None].expand(2, num_features, 2, 2).contiguous()).double()
    except Exception:
        return None
    return out[1, :, 0, 0] - out[0, :, 0, 0], out[0, :, 0, 0]


def _fold_into_conv(conv: nn.Conv2d, norm: nn.Module) -> Optional[nn.Conv2d]:
    """A conv equal to ``norm(conv(x))`` (eval), or None when ``norm`` is not a per-channel affine."""
    affine = norm_as_affine(norm, conv.out_channels)
    if affine is None:
        return None
    scale, shift = affine
    w = conv.weight
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(w.double() * scale.to(w.device)[:, None, None, None])
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(shift).to(w.device)
        fused.bias.copy_(bias * scale.to(w.device) + shift.to(w.device))
    return fused


def fold_bn(model: DenseNet, inplace: bool = False) -> DenseNet:
    """Fold ``norm0`` into ``conv0`` and every ``norm2`` into its ``conv1`` (exact in eval).

    The folded norms become ``nn.Identity`` and the convolutions get a bias; the model stays a
    :class:`DenseNet` in eval mode. A norm that is not a per-channel affine in eval (GroupNorm...)
    is left in place. See the module docstring for why ``norm1``, transition norms and ``norm5``
    cannot be folded.

    Args:
        model: a densenet_zoo :class:`DenseNet`.
        inplace: fold into ``model`` itself instead of a copy.

    Returns:
        The folded model, in eval mode.

    Example:
        folded = fold_bn(densenet121().eval())   # same outputs, 59 fewer norm layers
    """
    _require_eval(model, "fold_bn")
    if not inplace:
        model = copy.deepcopy(model)
    feats = model.features
    if hasattr(feats, "norm0") and not isinstance(feats.norm0, nn.Identity):
        fused = _fold_into_conv(feats.conv0, feats.norm0)
        if fused is not None:
            feats.conv0, feats.norm0 = fused, nn.Identity()
    for layer in model.modules():
        if isinstance(layer, DenseLayer) and not isinstance(layer.norm2, nn.Identity):
            fused = _fold_into_conv(layer.conv1, layer.norm2)
            if fused is not None:
                layer.conv1, layer.norm2 = fused, nn.Identity()
    return model


# ---------------------------------------------------------------------------------------------
# The fast evaluation-only network
# ---------------------------------------------------------------------------------------------
