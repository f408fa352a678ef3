"""Caffe's BatchNorm: a normalisation-only ``BatchNorm`` layer followed by a separate ``Scale`` layer.

Caffe splits what PyTorch calls BatchNorm in two layers. ``BatchNorm`` normalises with no affine
and stores three blobs: ``mean * f``, ``variance * f`` and the moving-average factor ``f`` (the
statistics are the first two divided by the third; ``f == 0`` means zero statistics). ``Scale``
holds gamma and beta. :class:`CaffeBatchNorm2d` keeps that split as two sub-layers and Caffe's
``use_global_stats`` switch, yet its state dict is that of ``nn.BatchNorm2d`` (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``), so torchvision weights load into it.
:func:`caffe_blobs_to_state_dict` turns Caffe blobs into that state dict.

Example::

    layer = CaffeBatchNorm2d(64, use_global_stats=True)     # frozen statistics even in training
    layer.load_state_dict(caffe_blobs_to_state_dict(bn_blobs, scale_blobs))
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .batchnorm import BatchNorm2d, _acc, _per_channel

__all__ = ["CaffeBatchNorm2d", "CaffeNorm2d", "Scale", "caffe_blobs_to_state_dict"]

# state-dict key of nn.BatchNorm2d -> sub-layer holding it
_FLAT_KEYS = {
    "weight": "scale.weight",
    "bias": "scale.bias",
    "running_mean": "bn.running_mean",
    "running_var": "bn.running_var",
    "num_batches_tracked": "bn.num_batches_tracked",
}


class CaffeNorm2d(BatchNorm2d):
    """Normalisation-only BatchNorm with Caffe's ``use_global_stats``.

    ``None`` (Caffe's default): batch statistics in training, stored ones in eval. ``True``: stored
    statistics always, never updated (Caffe's usual fine-tuning setting). ``False``: batch statistics
    always; the stored ones are updated in training only.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 use_global_stats: Optional[bool] = None, device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine=False, device=device, dtype=dtype)
        self.use_global_stats = use_global_stats

    def _use_batch_stats(self) -> bool:
        if self.use_global_stats is None:
            return self.training
        return not self.use_global_stats

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, use_global_stats={self.use_global_stats}"


class Scale(nn.Module):
    """Caffe's Scale layer: ``y = x * weight + bias`` per channel (``bias_term=False`` drops the bias)."""

    def __init__(self, num_features: int, bias_term: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype)) if bias_term else None

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        xa = _acc(x)
        w = _per_channel(self.weight.to(xa.dtype))
        y = xa * w if self.bias is None else torch.addcmul(_per_channel(self.bias.to(xa.dtype)), xa, w)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, bias_term={self.bias is not None}"


def _flatten_state(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook: ``bn.running_mean`` -> ``running_mean``, ``scale.weight`` -> ``weight``, ..."""
    for flat, nested in _FLAT_KEYS.items():
        if prefix + nested in state_dict:
            state_dict[prefix + flat] = state_dict.pop(prefix + nested)


class CaffeBatchNorm2d(nn.Module):
    """Caffe's ``BatchNorm`` + ``Scale`` pair as one norm layer with ``nn.BatchNorm2d``'s state dict.

    Args:
        num_features: channels C of the (N, C, H, W) input.
        eps: added to the variance before the square root.
        momentum: weight of the batch statistics in the running ones, as for ``nn.BatchNorm2d``.
        use_global_stats: Caffe's switch: ``True`` normalises with the stored statistics even in
            training, ``False`` with batch statistics even in eval, ``None`` follows the mode.
        bias_term: whether the Scale layer has a bias (Caffe's ``bias_term``).
        device: where the parameters and buffers are created.
        dtype: their dtype.

    Example:
        >>> layer = CaffeBatchNorm2d(64)
        >>> layer.load_state_dict(torch.nn.BatchNorm2d(64).state_dict())
        <All keys matched successfully>
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 use_global_stats: Optional[bool] = None, bias_term: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.num_features = num_features
        self.bn = CaffeNorm2d(num_features, eps, momentum, use_global_stats, device=device, dtype=dtype)
        self.scale = Scale(num_features, bias_term, device=device, dtype=dtype)
        self.register_state_dict_post_hook(_flatten_state)

    # Attributes of nn.BatchNorm2d, so that code reading them (and convert_norm) treats this layer alike.
    eps = property(lambda self: self.bn.eps, lambda self, v: setattr(self.bn, "eps", v))
    momentum = property(lambda self: self.bn.momentum, lambda self, v: setattr(self.bn, "momentum", v))
    use_global_stats = property(lambda self: self.bn.use_global_stats, lambda self, v: setattr(self.bn, "use_global_stats", v))
    weight = property(lambda self: self.scale.weight)
    bias = property(lambda self: self.scale.bias)
    running_mean = property(lambda self: self.bn.running_mean)
    running_var = property(lambda self: self.bn.running_var)
    num_batches_tracked = property(lambda self: self.bn.num_batches_tracked)

    def reset_parameters(self) -> None:
        self.bn.reset_parameters()
        self.scale.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # The sub-layers read their keys from this dict after this call: give them their nested names.
        for flat, nested in _FLAT_KEYS.items():
            if prefix + flat in state_dict:
                state_dict[prefix + nested] = state_dict.pop(prefix + flat)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale(self.bn(x))


def _flat(blob: Any, what: str) -> np.ndarray:
    arr = blob.detach().cpu().numpy() if isinstance(blob, Tensor) else np.asarray(blob)
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"Caffe blob {what} must hold numbers, got dtype {arr.dtype}")
    return arr.astype(np.float64).reshape(-1)


def caffe_blobs_to_state_dict(bn_blobs: Sequence[Any], scale_blobs: Optional[Sequence[Any]] = None,
                              dtype: torch.dtype = torch.float32) -> Dict[str, Tensor]:
    """Caffe ``BatchNorm`` and ``Scale`` blobs -> an ``nn.BatchNorm2d`` state dict.

    The result loads into ``CaffeBatchNorm2d``, ``BatchNorm2d``, ``nn.BatchNorm2d``...

    Args:
        bn_blobs: Caffe's ``BatchNorm`` blobs ``[mean * f, variance * f, f]``: numpy arrays, tensors
            or lists, of shape ``(C,)`` or Caffe's legacy ``(1, 1, 1, C)``; the factor ``f`` has one
            element (``f == 0`` means zero statistics).
        scale_blobs: the ``Scale`` blobs ``[gamma, beta]``; without them gamma is 1 and beta 0.
        dtype: dtype of the returned tensors.

    Returns:
        ``weight``, ``bias``, ``running_mean``, ``running_var`` and ``num_batches_tracked``.

    Example:
        sd = caffe_blobs_to_state_dict([mean_f, var_f, [f]], [gamma, beta])
    """
    if len(bn_blobs) != 3:
        raise ValueError(f"Caffe BatchNorm has 3 blobs (mean*factor, variance*factor, factor), got {len(bn_blobs)}")
    mean_f, var_f, factor = (_flat(b, name) for b, name in zip(bn_blobs, ("mean", "variance", "factor")))
    c = mean_f.size
    if var_f.size != c or factor.size != 1:
        raise ValueError(f"Caffe BatchNorm blobs have sizes {mean_f.size}, {var_f.size}, {factor.size}; "
                         "expected C, C and 1 (mean*factor, variance*factor, factor)")
    # Caffe: scale_factor = factor == 0 ? 0 : 1 / factor
    inv = 0.0 if factor[0] == 0 else 1.0 / factor[0]
    sd = {
        "weight": np.ones(c), "bias": np.zeros(c),
        "running_mean": mean_f * inv, "running_var": var_f * inv,
    }
    if scale_blobs is not None:
        if not 1 <= len(scale_blobs) <= 2:
            raise ValueError(f"Caffe Scale has 1 or 2 blobs (gamma[, beta]), got {len(scale_blobs)}")
        for key, blob in zip(("weight", "bias"), scale_blobs):
            sd[key] = _flat(blob, f"Scale {key}")
            if sd[key].size != c:
                raise ValueError(f"Caffe Scale {key} has {sd[key].size} values but BatchNorm has {c} channels")
    out = {k: torch.from_numpy(v).to(dtype) for k, v in sd.items()}
    out["num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out
