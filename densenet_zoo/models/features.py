"""Multi-scale features of a DenseNet: ``features_only`` models and ``forward_intermediates``.

Feature taps follow timm's DenseNet: index 0 is the stem (after ``norm0`` + ReLU, before the
max-pool; ``conv0`` for ``small_inputs`` models), indices 1..n-1 the outputs of the dense blocks
before their transitions, and the last index the final features after ``norm5`` + ReLU (what
``forward_features`` returns). ``model.feature_info[i]`` gives ``num_chs``, ``reduction`` and
``module`` of tap ``i``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

Indices = Union[None, int, Sequence[int]]


def take_indices(num_taps: int, indices: Indices) -> List[int]:
    """Sorted tap indices: ``None`` all, an int ``n`` the last ``n``, or a sequence (negatives count from the end).

    >>> take_indices(5, (1, 2, 3, 4))
    [1, 2, 3, 4]
    """
    if indices is None:
        return list(range(num_taps))
    if isinstance(indices, bool):
        raise TypeError(f"feature indices must be None, an int or a sequence of ints, got {indices!r}")
    if isinstance(indices, int):
        if not 1 <= indices <= num_taps:
            raise ValueError(f"asked for the last {indices} feature maps; this model has {num_taps} (indices 0..{num_taps - 1})")
        return list(range(num_taps - indices, num_taps))
    picked = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not -num_taps <= i < num_taps:
            raise ValueError(f"feature index {i!r} is out of range; this model has {num_taps} feature maps (indices 0..{num_taps - 1})")
        picked.append(i % num_taps)
    if not picked:
        raise ValueError("out_indices is empty; give at least one feature index, e.g. (1, 2, 3, 4)")
    if len(set(picked)) != len(picked):
        raise ValueError(f"feature indices {tuple(indices)} repeat an index")
    return sorted(picked)


def forward_intermediates(
    model: nn.Module,
    x: Tensor,
    indices: Indices = None,
    *,
    stop_early: bool = False,
    intermediates_only: bool = False,
) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
    """Run ``model.features`` and collect the feature maps of ``indices`` (see the module docstring).

    >>> final, maps = model.forward_intermediates(x, indices=(1, 2, 3, 4))

    Returns ``(final_features, maps)``, or only ``maps`` when ``intermediates_only``;
    ``stop_early`` stops after the last requested tap (``final_features`` is then that tap).
    """
    model.check_input(x)
    info = model.feature_info
    take = take_indices(len(info), indices)
    # position (child name) of each tap inside model.features
    tap_of = {entry["module"].split(".", 1)[1]: i for i, entry in enumerate(info)}
    last = take[-1] if stop_early else len(info) - 1
    maps: List[Tensor] = []
    for name, module in model.features.named_children():
        x = module(x)
        if name == "norm5":
            x = F.relu(x, inplace=True)
        i = tap_of.get(name)
        if i is None:
            continue
        if i in take:
            maps.append(x)
        if i == last:
            break
    return maps if intermediates_only else (x, maps)
