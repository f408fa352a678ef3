"""Freezing the first part of a network for fine-tuning: no gradients, and its norms keep their statistics."""

from __future__ import annotations

from typing import List

import torch.nn as nn

from .._utils import UsageError


def apply_freeze(model: nn.Module, freeze: str) -> List[nn.Module]:
    """Stop gradients to ``"features"`` or to everything up to and including ``"blockN"``
    (and its transition); returns the frozen modules, whose norm layers stay in eval mode
    (running statistics of a frozen part are not updated). ``"none"`` freezes nothing.

    Example::

        apply_freeze(model, "block2")
    """
    if freeze == "none":
        return []
    features = getattr(model, "features", None)
    if features is None:
        raise UsageError(f"--freeze {freeze} needs a model with a 'features' part")
    names = list(features._modules)
    if freeze == "features":
        chosen = names
    else:
        n = int(freeze[5:])
        blocks = [x for x in names if x.startswith("denseblock")]
        if not 1 <= n <= len(blocks):
            raise UsageError(f"--freeze {freeze}: this model has {len(blocks)} dense blocks; use none, features or block1..block{len(blocks)}")
        end = names.index(f"denseblock{n}") + 1
        if end < len(names) and names[end].startswith("transition"):
            end += 1
        chosen = names[:end]
    frozen = [features._modules[x] for x in chosen]
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    return frozen


def set_train_mode(model: nn.Module, frozen: List[nn.Module]) -> None:
    model.train()
    for m in frozen:
        m.eval()
