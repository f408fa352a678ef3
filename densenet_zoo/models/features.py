"""Multi-scale features of a DenseNet: which taps ``features_only`` and ``forward_intermediates`` return,
and pruning the layers after the last one.

Feature taps follow timm's DenseNet: index 0 is the stem (after ``norm0`` + ReLU, before the
max-pool; ``conv0`` for ``small_inputs`` models), indices 1..n-1 the outputs of the dense blocks
before their transitions, and the last index the final features after ``norm5`` + ReLU (module
``final_act``; what ``forward_features`` returns). ``model.feature_info[i]`` gives ``num_chs``,
``reduction`` and ``module`` (the module whose output it is) of tap ``i``.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch.nn as nn
from torch import Tensor

from .._utils import UsageError, UsageTypeError
from .tracing import call_norm

Indices = Union[None, int, Sequence[int]]
OUTPUT_FORMATS = ("NCHW", "NHWC")


def feature_indices(num_taps: int, indices: Indices) -> List[int]:
    """Sorted tap indices: ``None`` all, an int ``n`` the last ``n``, or a sequence (negatives count from the end).

    >>> feature_indices(5, (1, 2, 3, 4)), feature_indices(5, 2)
    ([1, 2, 3, 4], [3, 4])
    """
    if indices is None:
        return list(range(num_taps))
    if isinstance(indices, bool):
        raise UsageTypeError(f"feature indices must be None, an int or a sequence of ints, got {indices!r}")
    if isinstance(indices, int):
        if not 1 <= indices <= num_taps:
            raise UsageError(f"asked for the last {indices} feature maps; this model has {num_taps} (indices 0..{num_taps - 1})")
        return list(range(num_taps - indices, num_taps))
    picked = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not -num_taps <= i < num_taps:
            raise UsageError(f"feature index {i!r} is out of range; this model has {num_taps} feature maps (indices 0..{num_taps - 1})")
        picked.append(i % num_taps)
    if not picked:
        raise UsageError("out_indices is empty; give at least one feature index, e.g. (1, 2, 3, 4)")
    if len(set(picked)) != len(picked):
        raise UsageError(f"feature indices {tuple(indices)} repeat an index")
    return sorted(picked)


def forward_intermediates(
    model: nn.Module,
    x: Tensor,
    indices: Indices = None,
    norm: bool = False,
    stop_early: bool = False,
    output_fmt: str = "NCHW",
    intermediates_only: bool = False,
) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
    """Run ``model.features`` and collect the feature maps of ``indices`` (see the module docstring).

    Example::

        final, maps = model.forward_intermediates(x, indices=(1, 2, 3, 4))

    Returns ``(final_features, maps)``, or only ``maps`` when ``intermediates_only``;
    ``stop_early`` stops after the last requested tap (``final_features`` is then that tap).
    ``output_fmt`` ``"NHWC"`` returns the maps channels-last (``final_features`` stays NCHW, as in
    timm). ``norm`` is accepted for timm's interface: the final norm (``norm5``) belongs to the last
    tap, and the other taps have other widths, so there is nothing to apply.
    """
    if output_fmt not in OUTPUT_FORMATS:
        raise UsageError(f"output_fmt must be one of {OUTPUT_FORMATS}, got {output_fmt!r}")
    x = model.check_input(x)
    info = model.feature_info
    taps = feature_indices(len(info), indices)
    tap_of = {entry["module"]: i for i, entry in enumerate(info)}
    last = taps[-1] if stop_early else len(info) - 1
    modules = [(f"features.{name}", m) for name, m in model.features.named_children()] + [("final_act", model.final_act)]
    maps: List[Tensor] = []
    for name, module in modules:
        x = call_norm(module, x) if name.startswith("features.norm") else module(x)
        i = tap_of.get(name)
        if i is None:
            continue
        if i in taps:
            maps.append(x.permute(0, 2, 3, 1) if output_fmt == "NHWC" else x)
        if i == last:
            break
    return maps if intermediates_only else (x, maps)


def prune_intermediate_layers(model: nn.Module, indices: Indices = 1, prune_head: bool = True) -> List[int]:
    """Drop the modules after the last tap of ``indices``; returns the kept tap indices (absolute).

    ``model.feature_info`` then lists only the taps that remain. The classifier and pooling are
    removed when ``prune_head`` is set or when the final features were pruned away (the head
    was sized for them).
    """
    taps = feature_indices(len(model.feature_info), indices)
    last = taps[-1]
    if last < len(model.feature_info) - 1:
        keep = model.feature_info[last]["module"].split(".", 1)[1]
        names = list(model.features._modules)
        for name in names[names.index(keep) + 1:]:
            delattr(model.features, name)
        model.feature_info = model.feature_info[: last + 1]
        model.final_act = nn.Identity()
        model.num_features = model.head_hidden_size = model.feature_info[last]["num_chs"]
        model.out_indices = [i for i in model.out_indices if i <= last] or [last]
        prune_head = True
    if prune_head:
        model.reset_classifier(0, "")
    return taps
