"""What lets ``torch.fx`` (torchvision's ``create_feature_extractor``, timm's ``feature_cls="fx"``) trace a DenseNet:
telling a traced value from a tensor, and recording each norm as one module call."""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from torch import Tensor
from torch.fx import Proxy


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a ``torch.fx`` proxy: the model is being traced, values and shapes are unknown."""
    return isinstance(x, Proxy)


def call_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(x)``; under ``torch.fx`` tracing, one ``call_module`` node, as ``torch.nn``'s norms give.

    The norms of this package check shapes and branch on batch statistics in Python, which symbolic
    tracing cannot follow. Recorded as a call of the module (through the tracer, so node names are
    the module paths), the traced graph runs each norm exactly as the model does.
    """
    if not is_traced(x):
        return norm(x)
    tracer = x.tracer

    def as_node(*args: Any, **kwargs: Any) -> Proxy:
        return tracer.create_proxy("call_module", tracer.path_of_module(norm), args, kwargs)

    return tracer.call_module(norm, as_node, (x,), {})


def run_children(container: nn.Module, x: Tensor) -> Tensor:
    """Apply the children of ``container`` in order, the norms through :func:`call_norm`."""
    for name, module in container.named_children():
        x = call_norm(module, x) if name.startswith("norm") else module(x)
    return x
