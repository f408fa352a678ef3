"""What the evaluation-only network accepts: float inputs in its dtype, and no gradients."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import UnsupportedError, UsageError, UsageTypeError

_INFERENCE_ONLY = ("the optimized network is inference-only (its folded weights have no backward); "
                   "train or take gradients with the DenseNet it was made from, then optimize_for_inference again")


def require_eval(model: nn.Module, what: str) -> None:
    """A one-line error unless ``model`` is in eval mode (folding uses running statistics)."""
    if model.training:
        raise UsageError(f"{what} needs a model in eval mode (it uses running statistics); call model.eval() first")


def refuse_training(mode: bool) -> None:
    """``FastDenseNet.train(True)``: there is nothing to train in a folded network."""
    if mode:
        raise UnsupportedError(_INFERENCE_ONLY)


def prepare_input(net: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` cast to the network's ``dtype`` (fp32 or fp64 into a bf16 network, ...).

    Integer images (uint8 straight from a decoder) are refused: they need the model's
    preprocessing (scale to [0, 1], normalise), which a cast would silently skip.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise UsageTypeError(f"the optimized network expects a float image batch normalised with the model's mean/std, got {got}; "
                        "preprocess it first (e.g. x.float() / 255, then normalise)")
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in net.parameters())):
        raise UnsupportedError(_INFERENCE_ONLY)
    return x if x.dtype == dtype else x.to(dtype)
