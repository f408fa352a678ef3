"""The optimizer and its schedule: parameter groups with layer-wise learning rates, warm-up then cosine decay."""

from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
import torch.nn as nn

from .._utils import UsageError


def _stages(model: nn.Module) -> List[List[str]]:
    """Children of ``model.features`` grouped as stem, (block 1 + transition 1), ..., norm5."""
    names = list(getattr(model, "features", nn.Module())._modules)
    stages: List[List[str]] = [[]]
    for name in names:
        if name.startswith("denseblock"):
            stages.append([name])
        elif name == "norm5":
            stages.append([name])
        else:
            stages[-1].append(name)
    return stages


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0) -> List[Dict[str, Any]]:
    """Optimizer groups of the trainable parameters.

    Discriminative learning rates: with ``layer_decay`` d < 1 the head (norm5 + classifier) gets
    ``lr``, dense block k of n (with its transition) ``lr * d**(n - k + 1)``, the stem
    ``lr * d**(n + 1)``. Biases and norm parameters (1-D) get no weight decay.

    Example::

        torch.optim.SGD(param_groups(model, 0.1, 1e-4, layer_decay=0.7), lr=0.1)
    """
    stages = _stages(model)
    n_blocks = sum(1 for s in stages if s and s[0].startswith("denseblock"))
    mult: Dict[str, float] = {}
    for i, stage in enumerate(stages):
        is_head = stage == ["norm5"]
        for name in stage:
            mult[f"features.{name}."] = 1.0 if is_head else layer_decay ** (n_blocks + 1 - i)
    groups: Dict[tuple, Dict[str, Any]] = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = next((v for k, v in mult.items() if pname.startswith(k)), 1.0)
        wd = 0.0 if p.ndim <= 1 else weight_decay
        g = groups.setdefault((m, wd), {"params": [], "lr": lr * m, "weight_decay": wd})
        g["params"].append(p)
    if not groups:
        raise UsageError("no trainable parameters left; use a smaller --freeze")
    return [groups[k] for k in sorted(groups)]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def make_optimizer(name: str, groups: List[Dict[str, Any]], lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """``"sgd"`` (Nesterov when ``momentum`` > 0) or ``"adamw"`` over ``groups``: ``make_optimizer("sgd", param_groups(model, 0.1, 1e-4), 0.1)``."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)
